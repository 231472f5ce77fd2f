"""A run's identity and the pipeline's version, importable without torch (a cached Flyte rerun needs only these).

The fingerprint is the config without the settings that only observe a run (where results are reported, what the
run is called): the same digest the checkpoints' resume check and Flyte's train cache key on.
"""

from __future__ import annotations

import hashlib
import json

from .config import PipelineConfig

#: the version of what prepare/train/evaluate produce from the same inputs: bump it with any change that alters
#: their outputs (a split, a metric, the training loop). Flyte's task cache versions derive from it.
PIPELINE_VERSION = 1

#: config keys that do not change what is trained (where results are reported, what the run is called)
NOT_TRAINING = {"training": ("report_to", "run_name", "strict_integrations"),
                "model": ("registered_name", "registered_alias")}


def config_digest(config: PipelineConfig) -> str:
    """SHA-256 of the config's training-relevant settings."""
    relevant = dict(config.to_dict())
    for section, keys in NOT_TRAINING.items():
        relevant[section] = {k: v for k, v in relevant[section].items() if k not in keys}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()
