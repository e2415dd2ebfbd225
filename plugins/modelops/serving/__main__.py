"""``python -m modelops.serving --host 127.0.0.1 --port 8008``: run the scoring gateway with uvicorn.

Configuration comes from the environment (see :meth:`GatewayConfig.from_env`). One worker: loaded
models and the staged version live in the process's memory.
"""

from __future__ import annotations

import os

# Before numpy/scikit-learn load: with one OpenMP thread per scoring call, single-row latency on a
# 2-core machine fell from p99 1.4 s to 17 ms (benchmarks/bench_gateway.py); requests already run
# concurrently in the threadpool, so more threads per call only contend. Override by setting it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402

import uvicorn  # noqa: E402

from modelops.serving.gateway import GatewayConfig, create_app  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modelops.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8008, help="port to listen on (default: 8008)")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    args = parser.parse_args(argv)
    app = create_app(GatewayConfig.from_env())
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level=args.log_level)


if __name__ == "__main__":
    main()
