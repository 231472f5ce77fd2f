"""CodeCarbon: the energy and CO2 of the training, measured offline into ``<output_dir>/emissions.csv``.

Environment: ``CODECARBON_COUNTRY`` (ISO 3166 alpha-3 code of the grid's country, default "USA"). The offline
tracker never calls a web service; without readable RAPL counters CodeCarbon estimates CPU power from its TDP table.
"""

from __future__ import annotations

import logging
import os

from ._common import TrackerCallback

logger = logging.getLogger(__name__)


class CodeCarbonCallback(TrackerCallback):
    """Starts an OfflineEmissionsTracker when training begins and stops it (one emissions.csv row) when it ends."""

    integration_name = "codecarbon"
    required_modules = ("codecarbon",)
    pip_extra = "codecarbon"

    def __init__(self) -> None:
        super().__init__()
        self.tracker = None
        self._output_dir = ""

    def _open(self, args, state, model) -> None:
        from codecarbon import OfflineEmissionsTracker

        # log_level applies only once the tracker exists; its constructor already logs INFO/WARNING lines
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        os.makedirs(args.output_dir, exist_ok=True)
        self.tracker = OfflineEmissionsTracker(
            country_iso_code=os.environ.get("CODECARBON_COUNTRY", "").strip().upper() or "USA",
            output_dir=args.output_dir,
            project_name=os.path.basename(os.path.normpath(args.run_name or args.output_dir)),
            log_level="error",
            # codecarbon's default lock lets one tracker run per machine; trainings side by side must each measure
            allow_multiple_runs=True,
        )
        self.tracker.start()

    def _is_open(self) -> bool:
        return self.tracker is not None

    def on_log(self, args, state, control, **kwargs):
        """Nothing to log: emissions are measured over training only (evaluate after training adds no row)."""

    def _finish(self, args, state, model) -> None:
        self._output_dir = args.output_dir

    def _close(self, failed: bool) -> None:
        tracker, self.tracker = self.tracker, None
        if tracker is None:
            return
        emissions = tracker.stop()
        if not failed:
            logger.info("CodeCarbon: training emitted %s kg CO2eq (details in %s)", emissions, self._output_dir)
