"""``python -m modelops_dev up|down|status``: the local stack behind ``make demo``."""

from __future__ import annotations

import sys

from modelops_dev.driver import main

if __name__ == "__main__":
    sys.exit(main())
