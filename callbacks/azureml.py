"""Azure ML (azureml-core, the v1 SDK): numeric logs sent to the run this process executes in.

Needs the ``azure_ml`` extra (``pip install 'flytrain[azure_ml]'``). Inside an Azure ML job ``Run.get_context()`` is
that job's run; elsewhere it is an offline run that only prints. ``report_to="all"`` skips it when MLflow is there.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

from ._common import TrackerCallback, numeric_items

logger = logging.getLogger(__name__)


class AzureMLCallback(TrackerCallback):
    """Logs every numeric value of ``on_log`` with ``run.log(name, value, description=name)``.

    ``azureml_run``: the run to log to; by default ``azureml.core.run.Run.get_context()`` at setup.
    """

    integration_name = "azure_ml"
    required_modules = ("azureml",)
    pip_extra = "azure_ml"

    def __init__(self, azureml_run: Any = None) -> None:
        super().__init__()
        self.azureml_run = azureml_run

    @classmethod
    def is_available(cls) -> bool:
        """``azureml`` is a namespace other Azure packages share: azureml-core's ``core/run.py`` must be in it.

        Looked up on disk, not imported: importing azureml.core costs seconds.
        """
        spec = importlib.util.find_spec("azureml")
        locations = (spec.submodule_search_locations or []) if spec is not None else []
        return any(os.path.isfile(os.path.join(folder, "core", "run.py")) for folder in locations)

    def _open(self, args, state, model) -> None:
        if self.azureml_run is None:
            from azureml.core.run import Run

            self.azureml_run = Run.get_context()

    def _is_open(self) -> bool:
        return self.azureml_run is not None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._ensure_setup(args, state, model)

    def _send(self, events: list[tuple[int, dict[str, Any]]]) -> None:
        for _, logs in events:
            numbers, skipped = numeric_items(logs)
            if skipped:
                logger.debug("Azure ML: not logging non-numeric values %s", skipped)
            for name, value in numbers.items():
                self.azureml_run.log(name, value, description=name)
