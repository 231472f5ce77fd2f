"""Data loading: the default collator and a seeded, resumable batch sampler.

The training order of epoch ``e`` is a pure function of ``(seed, e)``, so a resumed run sees exactly the order
of the uninterrupted one, and the batches already trained are skipped by index: their data is never loaded.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler


def default_data_collator(features: list[Any]) -> dict[str, torch.Tensor]:
    """Stack a list of dict samples into a dict of batched tensors (a batch already collated passes through)."""
    if isinstance(features, Mapping):
        return dict(features)
    first = features[0]
    if not isinstance(first, Mapping):
        raise TypeError(f"datasets must return dicts of tensors, got a {type(first).__name__}")
    batch = {}
    for key, value in first.items():
        if value is None:
            continue
        values = [f[key] for f in features]
        if isinstance(value, torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.as_tensor(values)
    return batch


def make_loader(dataset, batch_sampler, collate_fn, num_workers: int, *, pin_memory: bool, seed: int) -> DataLoader:
    """A loader over ``batch_sampler`` with its own generator: creating an iterator must not draw from the global
    torch RNG, or a resumed run would see a different random stream than the uninterrupted one."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=num_workers,
                      pin_memory=pin_memory, generator=generator, persistent_workers=False)


def iterate_batches(loader: DataLoader) -> Iterator[Any]:
    """The batches of ``loader``, in its order.

    A plain single-process ``DataLoader`` over a map-style dataset (what the Trainer builds with
    ``dataloader_num_workers=0``) is read directly: the batch sampler's indices, ``__getitems__`` (or one
    ``__getitem__`` per index) and the collator, exactly what its iterator does per batch, without the iterator's
    bookkeeping and profiler ranges (~20 µs a batch in training, ~3 % of a small model's step). Any other loader
    (workers, pinned memory, an iterable dataset, a DataLoader subclass) is iterated as it is.
    """
    direct = (
        type(loader) is DataLoader
        and loader.num_workers == 0
        and not loader.pin_memory
        and loader.batch_sampler is not None
        and not isinstance(loader.dataset, IterableDataset)
    )
    return _read_batches(loader) if direct else _iterate(loader)


def _iterate(loader) -> Iterator[Any]:
    # lazily: the loader's iterator (its workers, its seed draw) is made at the first batch, where a for loop over
    # the loader makes it (after on_epoch_begin)
    yield from loader


def batches_per_epoch(loader: DataLoader) -> int:
    """The training loader's length; a loader without one (an iterable dataset) is refused, named."""
    try:
        return len(loader)
    except TypeError:
        raise ValueError(
            f"get_train_dataloader() returned a {type(loader).__name__} without a length: the Trainer needs the "
            "number of batches per epoch (a map-style dataset)"
        ) from None


def epoch_batches(loader: DataLoader, epoch: int, skip: int, seed: int) -> Iterator[Any]:
    """Epoch ``epoch``'s batches of a training loader, from batch ``skip`` on (a resumed epoch).

    The Trainer's own loader picks the epoch's order and skips by index (the skipped batches are never loaded).
    Any other loader (a ``get_train_dataloader`` override) gets ``set_epoch(epoch)`` where its sampler has one (a
    ``DistributedSampler``, say) and its first ``skip`` batches are read and dropped: a resumed epoch then sees the
    batches the interrupted one would have if the loader's order depends only on the epoch.
    """
    sampler = getattr(loader, "batch_sampler", None)
    if isinstance(sampler, ResumableBatchSampler):
        sampler.set_epoch(epoch, skip)
        if loader.generator is not None:  # creating its iterator draws from it, never from the global RNG
            loader.generator.manual_seed(seed + epoch)
        return iterate_batches(loader)
    for part in (sampler, getattr(sampler, "sampler", None), getattr(loader, "sampler", None)):
        if callable(getattr(part, "set_epoch", None)):
            part.set_epoch(epoch)
            break
    return itertools.islice(iterate_batches(loader), skip, None)


def _read_batches(loader: DataLoader) -> Iterator[Any]:
    dataset, collate = loader.dataset, loader.collate_fn
    getitems = getattr(dataset, "__getitems__", None)  # torch's fetcher uses it when present, as here
    for indices in loader.batch_sampler:
        yield collate(getitems(indices) if getitems else [dataset[i] for i in indices])


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields index batches for one epoch in a seeded order; ``set_epoch`` picks the epoch, ``skip`` the start.

    With ``num_replicas`` > 1 each rank takes its own interleaved share of the same permutation (DDP).
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if dataset_size <= 0:
            raise ValueError("the training dataset is empty")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip_batches = skip_batches

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=g).tolist()
        else:
            order = list(range(self.dataset_size))
        if self.num_replicas > 1:
            per_rank = -(-self.dataset_size // self.num_replicas)
            order += order[: per_rank * self.num_replicas - len(order)]  # pad so every rank has as many
            order = order[self.rank :: self.num_replicas]
        return order

    def _num_samples(self) -> int:
        if self.num_replicas > 1:
            return -(-self.dataset_size // self.num_replicas)
        return self.dataset_size

    def __len__(self) -> int:
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._indices()
        total = len(self)
        for b in range(self.skip_batches, total):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]
