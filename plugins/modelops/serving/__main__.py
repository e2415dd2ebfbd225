"""``python -m modelops.serving --host 127.0.0.1 --port 8008``: run the scoring gateway with uvicorn.

Configuration comes from the environment and include/ (see :meth:`GatewayConfig.from_env`): every model
is scored at ``/models/<name>/invocations``, the default model also at ``/invocations``. One worker:
loaded models and the staged versions live in the process's memory.
"""

from __future__ import annotations

import os

# Before numpy/scikit-learn load: with one OpenMP thread per scoring call, single-row latency on a
# 2-core machine fell from p99 1.4 s to 17 ms (benchmarks/bench_gateway.py); requests already run
# concurrently in the threadpool, so more threads per call only contend. Override by setting it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402

import uvicorn  # noqa: E402

from modelops.errors import ModelOpsError  # noqa: E402
from modelops.serving.gateway import GatewayConfig, create_app  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modelops.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8008, help="port to listen on (default: 8008)")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log a line per HTTP request (off by default: every scoring call is in the prediction log, "
        "with its caller and status, and refused calls get a line of their own)",
    )
    args = parser.parse_args(argv)
    try:
        config = GatewayConfig.from_env()
    except ModelOpsError as exc:  # a missing variable or an invalid settings file: say which, no traceback
        raise SystemExit(f"python -m modelops.serving: {exc}") from exc
    app = create_app(config)
    # loop and http stay "auto": uvloop and httptools, which the lock installs (uvicorn[standard], through
    # fastapi[standard] and evidently), else asyncio and h11.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        workers=1,
        log_level=args.log_level,
        access_log=args.access_log,
    )


if __name__ == "__main__":
    main()
