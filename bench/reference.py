"""Row 3: the reference trainers (Hugging Face transformers, Lightning) on row 1's work, when installed.

They are never dependencies of flytrain; install them yourself to get this row.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time

import torch

from .core import BATCH, LOG_EVERY, LR, digits_dataset, hand_loop, new_model, paired


class _HFWrapped(torch.nn.Module):
    """Row 1's model with the config object the reference Trainer reads (it is a plain dict here)."""

    def __init__(self):
        super().__init__()
        import types

        self.inner = new_model()
        self.config = types.SimpleNamespace(use_cache=False, to_dict=lambda: {})

    def forward(self, x, labels=None):  # an explicit signature: the reference then passes no extra kwargs
        return self.inner(x=x, labels=labels)


def _transformers(steps: int, sink) -> float:
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
            weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=LOG_EVERY,
            save_strategy="no", eval_strategy="no", disable_tqdm=True, report_to="none",
            remove_unused_columns=False, use_cpu=True, dataloader_pin_memory=False,
        )
        trainer = transformers.Trainer(model=_HFWrapped(), args=args, train_dataset=digits_dataset(),
                                       data_collator=lambda batch: batch)
        with contextlib.redirect_stdout(sink):
            start = time.perf_counter()
            trainer.train()
            return steps / (time.perf_counter() - start)


def _lightning(steps: int, sink) -> float:
    import lightning as L

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = new_model()

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch)["loss"]
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0)

    loader = torch.utils.data.DataLoader(digits_dataset(), batch_size=BATCH, shuffle=True, collate_fn=lambda b: b)
    with tempfile.TemporaryDirectory() as out:
        trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, log_every_n_steps=LOG_EVERY, accelerator="cpu",
                            devices=1, default_root_dir=out)
        module = Module()
        with contextlib.redirect_stdout(sink):
            start = time.perf_counter()
            trainer.fit(module, loader)
            return steps / (time.perf_counter() - start)


def compare(name: str, steps: int = 2000, repeats: int = 7) -> dict[str, float]:
    run = _transformers if name == "transformers" else _lightning
    with open(os.devnull, "w") as sink:
        hand_loop(200, sink)
        run(200, sink)
        r = paired(lambda: hand_loop(steps, sink), lambda: run(steps, sink), repeats)
    return {"hand_steps_per_s": r["a"], "theirs_steps_per_s": r["b"], "ratio": r["ratio"]}
