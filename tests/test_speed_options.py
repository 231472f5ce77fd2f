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


class _Tied(torch.nn.Module):
    """Nested and shared modules, a parameter slot set to None, a frozen parameter."""

    def __init__(self):
        super().__init__()
        shared = torch.nn.Linear(4, 4)
        self.a = torch.nn.Sequential(shared, torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(4, 4)))
        self.b = shared
        self.frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)
        self.register_parameter("absent", None)

    def forward(self, x):
        return (self.b(self.a(x)) * self.frozen).sum()


def test_release_gradients_clears_what_module_zero_grad_clears():
    from trainer_lib.optim import release_gradients

    model = _Tied()
    model(torch.ones(2, 4)).backward()
    model.frozen.grad = torch.ones(4)  # a gradient set by hand is released too, as zero_grad does
    assert sum(p.grad is not None for p in model.parameters()) == 5
    release_gradients(model)
    assert all(p.grad is None for p in model.parameters())
    # the tree is walked anew each time: a module added after a first call is included
    release_gradients(model)
    model.extra = torch.nn.Sequential(torch.nn.Linear(4, 1))
    (model(torch.ones(2, 4)) + model.extra(torch.ones(1, 4)).sum()).backward()
    release_gradients(model)
    assert all(p.grad is None for p in model.parameters())


def test_release_gradients_keeps_a_model_s_own_zero_grad():
    from trainer_lib.optim import release_gradients

    class Counting(_Tied):
        calls = 0

        def zero_grad(self, set_to_none: bool = True):
            Counting.calls += 1
            super().zero_grad(set_to_none)

    model = Counting()
    release_gradients(model)
    assert Counting.calls == 1


class GradProbe(TrainerCallback):
    """The gradient of a parameter the optimizer does not update, seen before each optimizer step."""

    def __init__(self):
        self.seen = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.seen.append(float(model.offset.grad.sum()))


def test_every_model_gradient_is_released_after_each_step(tmp_path):
    """As the reference's model.zero_grad(): a parameter outside the optimizer does not accumulate gradients."""
    model = make_model(dropout=0.0)
    model.offset = torch.nn.Parameter(torch.zeros(10))
    forward = model.forward

    def with_offset(x, labels=None):
        out = forward(x, labels)
        out["loss"] = out["loss"] + model.offset.sum()  # d loss / d offset = 1 at every step
        return out

    model.forward = with_offset
    optimizer = torch.optim.SGD(model.net.parameters(), lr=0.1)
    data, _ = digits(64, 8)
    probe = GradProbe()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=5,
                             disable_tqdm=True, save_strategy="no", max_grad_norm=0)  # no clipping: the raw gradient
    Trainer(model, args, train_dataset=data, callbacks=[probe], optimizers=(optimizer, None)).train()
    assert probe.seen == [10.0] * 5


class _Batched(torch.utils.data.Dataset):
    """A map-style dataset that reads a whole batch at once (``__getitems__``) and says so in the batch."""

    def __init__(self, n=37):
        self.x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "one_by_one": torch.tensor(1)}

    def __getitems__(self, indices):
        index = torch.as_tensor(indices)
        return {"x": self.x[index], "one_by_one": torch.zeros(len(indices), dtype=torch.long)}


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("batched", [True, False])
def test_direct_batches_equal_the_data_loader_s(batched):
    from trainer_lib.data import ResumableBatchSampler, default_data_collator, iterate_batches, make_loader

    data, _ = digits(37, 1)
    dataset = _Batched() if batched else data
    sampler = ResumableBatchSampler(len(dataset), 8, shuffle=True, seed=3)
    loader = make_loader(dataset, sampler, default_data_collator, 0, pin_memory=False, seed=3)
    for epoch, skip in ((0, 0), (1, 2)):
        sampler.set_epoch(epoch, skip)
        direct = iterate_batches(loader)
        assert not isinstance(direct, torch.utils.data.dataloader._BaseDataLoaderIter)  # read directly
        _same_batches(list(direct), list(loader))
    if batched:  # __getitems__ is used as torch's fetcher uses it
        assert all(int(b["one_by_one"].sum()) == 0 for b in iterate_batches(loader))


def test_other_loaders_are_iterated_as_they_are():
    from trainer_lib.data import iterate_batches

    class Shifted(torch.utils.data.DataLoader):
        iterated = False

        def __iter__(self):
            Shifted.iterated = True
            inner = super().__iter__()  # the DataLoader's own iterator, made now
            return ({"x": batch["x"] + 1000} for batch in inner)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter({"x": torch.tensor([float(i)])} for i in range(5))

    shifted = Shifted(_Batched(), batch_size=4, collate_fn=lambda batch: batch)
    batches = iterate_batches(shifted)
    assert not Shifted.iterated  # its iterator (workers, a seed draw) is made at the first batch, as a for loop would
    assert all(float(b["x"].min()) >= 1000 for b in batches)
    stream = torch.utils.data.DataLoader(Stream(), batch_size=2)
    assert [b["x"].flatten().tolist() for b in iterate_batches(stream)] == [[0.0, 1.0], [2.0, 3.0], [4.0]]
