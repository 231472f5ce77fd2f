"""CodeCarbon: the energy and CO2 of the training, measured offline into ``<output_dir>/emissions.csv``.

Environment: ``CODECARBON_COUNTRY`` (ISO 3166 alpha-3 code of the grid's country, default "USA"). The offline
tracker never calls a web service; without readable RAPL counters CodeCarbon estimates CPU power from its TDP table.
"""

from __future__ import annotations

import logging
import os

from ._common import TrackerCallback, logger


class CodeCarbonCallback(TrackerCallback):
    """Starts an OfflineEmissionsTracker when training begins and stops it (one emissions.csv row) when it ends."""

    integration_name = "codecarbon"
    required_modules = ("codecarbon",)
    pip_extra = "codecarbon"

    def __init__(self) -> None:
        super().__init__()
        self.tracker = None

    def setup(self, args, state, model, **kwargs) -> None:
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

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._ensure_setup(args, state, model):
            self.tracker.start()

    def on_train_end(self, args, state, control, **kwargs):
        if self.tracker is None:
            return
        emissions = self.tracker.stop()
        logger.info("CodeCarbon: training emitted %s kg CO2eq (details in %s)", emissions, args.output_dir)
        self.tracker = None
        self._initialized = False

    def on_integration_error(self, event: str, error: BaseException) -> None:
        tracker, self.tracker = self.tracker, None
        self._initialized = False
        if tracker is not None:
            tracker.stop()
