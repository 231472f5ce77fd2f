"""Options that trade nothing for speed: async checkpoints, bf16 autocast, torch.compile (CPU path)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import digits, make_model
from trainer_lib import Trainer, TrainerCallback, TrainingArguments
from trainer_lib.checkpoint import load_weights


def train(out, **kwargs):
    data, _ = digits(128, 8)
    values = dict(output_dir=str(out), per_device_train_batch_size=16, max_steps=12, save_steps=4,
                  learning_rate=1e-2, disable_tqdm=True, logging_steps=4)
    values.update(kwargs)
    trainer = Trainer(make_model(dropout=0.0), TrainingArguments(**values), train_dataset=data)
    trainer.train()
    return trainer


class SaveOrder(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_save(self, args, state, control, **kwargs):
        import os

        names = [n for n in os.listdir(args.output_dir) if n.startswith("checkpoint-")]
        self.seen.append(sorted(names, key=lambda n: int(n.split("-")[1])))


def test_async_checkpoints_equal_sync_ones(tmp_path):
    sync = train(tmp_path / "sync")
    order = SaveOrder()
    data, _ = digits(128, 8)
    args = TrainingArguments(output_dir=str(tmp_path / "async"), per_device_train_batch_size=16, max_steps=12,
                             save_steps=4, learning_rate=1e-2, disable_tqdm=True, logging_steps=4,
                             async_checkpointing=True)
    asynchronous = Trainer(make_model(dropout=0.0), args, train_dataset=data, callbacks=[order])
    asynchronous.train()
    for step in (4, 8, 12):
        a = load_weights(str(tmp_path / "sync" / f"checkpoint-{step}"))
        b = load_weights(str(tmp_path / "async" / f"checkpoint-{step}"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # on_save fires only once the folder is complete and in place
    assert [s[-1] for s in order.seen] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert sync.state.log_history[:-1] == asynchronous.state.log_history[:-1]


class DtypeProbe(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.dtypes = []
        model.net[0].register_forward_hook(lambda m, i, o: self.dtypes.append(o.dtype))


def test_bf16_autocast_on_cpu(tmp_path):
    probe = DtypeProbe()
    data, _ = digits(64, 8)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=4, bf16=True,
                             disable_tqdm=True, save_strategy="no")
    trainer = Trainer(make_model(), args, train_dataset=data, callbacks=[probe])
    out = trainer.train()
    assert probe.dtypes and all(d == torch.bfloat16 for d in probe.dtypes)
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32


@pytest.mark.slow
def test_torch_compile_gives_the_same_training(tmp_path):
    eager = train(tmp_path / "eager", save_strategy="no")
    compiled = train(tmp_path / "compiled", save_strategy="no", torch_compile=True)
    for key, value in eager.model.state_dict().items():
        assert torch.allclose(value, compiled.model.state_dict()[key], atol=1e-5), key
