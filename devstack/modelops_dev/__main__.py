"""``python -m modelops_dev up|down|status|restart <service>|supervise``: the stack of ``make demo``;
``python -m modelops_dev stack up|down|status``: the production-shaped one of ``make stack``.

``up``, ``down`` and ``status`` are the driver's; ``restart`` and ``supervise`` (the supervisor itself,
started by ``up``) are :mod:`modelops_dev.supervision`'s, and ``status`` ends with the supervisor's view.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from modelops_dev import supervision


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["stack"]:
        from modelops_dev import prodstack

        return prodstack.main(args[1:])
    if args[:1] and args[0] in supervision.COMMANDS:
        # The supervisor runs for as long as the stack: it does not import the driver's dependencies.
        return supervision.main(args)
    from modelops_dev import driver, processes, stack

    code = driver.main(args)
    if args == ["status"] and code == 0:
        for line in supervision.status_lines(processes.default_run_dir(), stack.SERVICE_NAMES):
            print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
