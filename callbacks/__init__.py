"""Tracker integrations for trainer_lib, one module per tracker; each imports its tracker lazily.

``from callbacks import MLflowCallback`` imports only ``callbacks.mlflow`` (and mlflow itself only once the
callback sets up): ``import callbacks`` stays free of every tracker package.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "TensorBoardCallback": "tensorboard",
    "WandbCallback": "wandb",
    "CometCallback": "comet",
    "MLflowCallback": "mlflow",
    "NeptuneCallback": "neptune",
    "AzureMLCallback": "azureml",
    "CodeCarbonCallback": "codecarbon",
    "ClearMLCallback": "clearml",
    "DagsHubCallback": "dagshub",
    "FlyteCallback": "flyte",
    "DVCLiveCallback": "dvclive",
}

__all__ = list(_MODULES)


def __getattr__(name: str):
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'callbacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
