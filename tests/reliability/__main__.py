"""``python -m tests.reliability``: the same as ``python -m tests.reliability.report``."""

import sys

from tests.reliability.report import main

sys.exit(main())
