"""The MLflow Model of a flytrain classifier, as MLflow "models from code": this file is stored with the model and
run on load, so nothing project-specific is pickled (a PythonModel *object* would be cloudpickled).

The weights load from the model folder's safetensors (artifact ``model``); input is the prepared features (float32,
standardised as in the prepare stage), output the class names the evaluate stage reports.
"""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class FlytrainClassifier(PythonModel):
    """Loads config.json + model.safetensors + meta.json (the class names) and predicts class names."""

    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        from workflows.models import MLPClassifier

        folder = context.artifacts["model"]
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            self.classes = np.asarray(json.load(f)["classes"])
        self.model = MLPClassifier(config["n_features"], config["n_classes"], config["hidden_sizes"], config["dropout"])
        self.model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
        self.model.eval()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import torch

        values = model_input.to_numpy() if hasattr(model_input, "to_numpy") else np.asarray(model_input)
        with torch.no_grad():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))["logits"]
        return self.classes[logits.argmax(-1).numpy()]


mlflow.models.set_model(FlytrainClassifier())
