"""Row 3: the reference trainers (Hugging Face transformers, Lightning) on row 1's work, when installed.

They are never dependencies of flytrain; install them yourself to get this row. Each is timed like row 1's sides:
from the start of its first epoch (setup excluded) to the end of its ``on_train_end``, logging the mean loss every
LOG_EVERY steps as one printed line, with no progress bar (row 1's no-terminal case).
"""

from __future__ import annotations

import logging
import tempfile
import time

import torch

from .core import BATCH, LOG_EVERY, LR, console, digits_dataset, hand_loop, new_model, paired


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

    class Clock(transformers.TrainerCallback):
        start = end = None

        def on_epoch_begin(self, args, state, control, **kwargs):
            if self.start is None:
                self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

    transformers.logging.set_verbosity_error()
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
            weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=LOG_EVERY,
            save_strategy="no", eval_strategy="no", disable_tqdm=True, report_to="none",
            remove_unused_columns=False, use_cpu=True, dataloader_pin_memory=False,
        )
        trainer = transformers.Trainer(model=_HFWrapped(), args=args, train_dataset=digits_dataset(),
                                       data_collator=lambda batch: batch, callbacks=[clock])
        trainer.train()  # its PrinterCallback prints a dict per log event to stdout
    return steps / (clock.end - clock.start)


def _lightning(steps: int, sink) -> float:
    import lightning as L

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    class Clock(L.Callback):
        start = end = None

        def on_train_epoch_start(self, trainer, module):
            if self.start is None:
                self.start = time.perf_counter()

        def on_train_end(self, trainer, module):
            self.end = time.perf_counter()

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = new_model()
            self.running = torch.zeros(())

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch)["loss"]
            self.running += loss.detach()
            if (self.global_step + 1) % LOG_EVERY == 0:  # the same logging interval as the other sides
                mean = self.running.item() / LOG_EVERY
                self.log("loss", mean)
                print({"loss": mean, "step": self.global_step + 1}, file=sink)
                self.running.zero_()
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0)

    clock = Clock()
    loader = torch.utils.data.DataLoader(digits_dataset(), batch_size=BATCH, shuffle=True, collate_fn=lambda b: b)
    with tempfile.TemporaryDirectory() as out:
        trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, log_every_n_steps=LOG_EVERY, accelerator="cpu",
                            devices=1, default_root_dir=out, callbacks=[clock])
        trainer.fit(Module(), loader)
    return steps / (clock.end - clock.start)


def compare(name: str, steps: int = 2000, repeats: int = 7) -> dict[str, float]:
    run = _transformers if name == "transformers" else _lightning
    with console(terminal=False) as sink:
        hand_loop(200, sink)
        run(200, sink)
        r = paired(lambda: hand_loop(steps, sink), lambda: run(steps, sink), repeats)
    return {"hand_steps_per_s": r["a"], "theirs_steps_per_s": r["b"], "ratio": r["ratio"]}
