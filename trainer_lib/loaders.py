"""The Trainer's data loaders: a seeded, resumable order for training and a fixed, cached one for evaluation."""

from __future__ import annotations

from torch.utils.data import DataLoader

from .data import ResumableBatchSampler, make_loader


class DataLoaderMixin:
    """``get_train_dataloader`` / ``get_eval_dataloader`` / ``get_test_dataloader`` as the reference names them;
    mixed into Trainer (uses its args, dist, device, data_collator and datasets)."""

    def _loader(self, dataset, batch_sampler) -> DataLoader:
        return make_loader(dataset, batch_sampler, self.data_collator, self.args.dataloader_num_workers,
                           pin_memory=self.device.type == "cuda", seed=self.args.seed)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset")
        size, args = len(self.train_dataset), self.args
        sampler = ResumableBatchSampler(
            size, args.per_device_train_batch_size, shuffle=True, drop_last=args.dataloader_drop_last,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            num_replicas=self.dist.world_size, rank=self.dist.rank,
        )
        if len(sampler) == 0:
            raise ValueError(
                f"the training dataset has {size} samples: fewer than one batch of "
                f"per_device_train_batch_size={args.per_device_train_batch_size} with dataloader_drop_last"
            )
        return self._loader(self.train_dataset, sampler)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset")
        # The evaluation order is fixed, so the loader of the same dataset (same length, batch size and collator)
        # is reused from one evaluation to the next; the cache holds the dataset, so its id cannot be recycled.
        key = (id(dataset), len(dataset), self.args.per_device_eval_batch_size, id(self.data_collator),
               self.args.dataloader_num_workers)
        cached = self._eval_loaders.get(key)
        if cached is None:
            if len(self._eval_loaders) >= 4:
                self._eval_loaders.pop(next(iter(self._eval_loaders)))
            cached = self._eval_loaders[key] = (dataset, self._sequential_loader(dataset))
        return cached[1]

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        return self._sequential_loader(test_dataset)

    def _sequential_loader(self, dataset) -> DataLoader:
        if len(dataset) == 0:
            raise ValueError("the evaluation dataset is empty")
        sampler = ResumableBatchSampler(len(dataset), self.args.per_device_eval_batch_size, shuffle=False,
                                        num_replicas=self.dist.world_size, rank=self.dist.rank)
        return self._loader(dataset, sampler)
