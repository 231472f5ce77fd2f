"""Small real training jobs for tests: scikit-learn's bundled digits with a tiny MLP."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i):
        return {"x": self.features[i], "labels": self.labels[i]}


class TinyMLP(torch.nn.Module):
    def __init__(self, hidden: int = 32, dropout: float = 0.1):
        super().__init__()
        self.config = {"hidden": hidden, "dropout": dropout}
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(hidden, 10)
        )

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


def digits(n_train: int = 256, n_eval: int = 64):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    return DictDataset(x[:n_train], y[:n_train]), DictDataset(x[n_train : n_train + n_eval], y[n_train : n_train + n_eval])


def accuracy(pred) -> dict[str, float]:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def make_model(seed: int = 0, **kwargs) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(**kwargs)


def make_trainer(out, *, report_to=(), callbacks=None, n_train: int = 256, n_eval: int = 64, model_seed: int = 0,
                 args_cls=None, shuffled_data: bool = False, model_kwargs: dict | None = None, **overrides):
    """The tracker and resume tests' trainer: the digits MLP, 20 steps logging every 5, a checkpoint and an
    evaluation every 10, a failing integration is fatal (``strict_integrations``). ``overrides`` are
    TrainingArguments fields. ``shuffled_data`` stores the same samples in another order, so the same seeded
    batch order draws other batches: a resumed run then logs values no uninterrupted run would, while its run
    fingerprint (which does not hash the data in the plain API) still matches the checkpoint's."""
    from trainer_lib import Trainer, TrainingArguments

    train, evaluation = digits(n_train, n_eval)
    if shuffled_data:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(7))
        train = DictDataset(train.features[order], train.labels[order])
    values = dict(
        output_dir=str(out), max_steps=20, logging_steps=5, save_steps=10, eval_strategy="steps", eval_steps=10,
        per_device_train_batch_size=16, report_to=report_to if isinstance(report_to, str) else list(report_to),
        disable_tqdm=True, strict_integrations=True,
    )
    values.update(overrides)
    args = (args_cls or TrainingArguments)(**values)
    return Trainer(make_model(model_seed, **(model_kwargs or {})), args, train_dataset=train, eval_dataset=evaluation,
                   compute_metrics=accuracy, callbacks=callbacks)
