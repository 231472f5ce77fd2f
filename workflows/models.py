"""The pipeline's model: a multi-layer perceptron classifier following the reference model convention."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig


class MLPClassifier(nn.Module):
    """``forward(x, labels=None)`` returns ``{"logits"}`` and, with labels, ``{"loss"}`` (cross-entropy)."""

    def __init__(self, n_features: int, n_classes: int, hidden_sizes: list[int], dropout: float = 0.0):
        super().__init__()
        self.config = {
            "n_features": n_features,
            "n_classes": n_classes,
            "hidden_sizes": list(hidden_sizes),
            "dropout": dropout,
        }
        layers: list[nn.Module] = []
        width = n_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def build_model(config: ModelConfig, n_features: int, n_classes: int) -> MLPClassifier:
    return MLPClassifier(n_features, n_classes, config.hidden_sizes, config.dropout)
