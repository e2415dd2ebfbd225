"""What every benchmark prints first: the machine and how busy it was."""

from __future__ import annotations

import os
import platform


def header(title: str) -> None:
    print(f"# {title}")
    print(
        f"# machine: nproc {len(os.sched_getaffinity(0))}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )
    # Figures from a shared or busy machine are noisy, tails most of all: the load says how busy it was.
    print("# load average (1/5/15 min) at start: " + " / ".join(f"{value:.2f}" for value in os.getloadavg()))
