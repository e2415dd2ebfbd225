"""Scoring gateway latency and throughput over real HTTP, against a real MLflow registry.

Trains the project's pipeline (``modelops.stages.training.build_pipeline`` with the spec of the platform's
default model, include/models/) on synthetic clicks, logs and registers it in a SQLite MLflow registry under
a temporary folder, sets the ``champion`` alias, starts ``python -m modelops.serving`` (default model:
``MODELOPS_DEFAULT_MODEL``) on a free loopback port and
sends sequential requests with httpx: 500 of 1 row, then 100 of 100 rows (after a short warm-up). Every
call is also written to the prediction log (SQLite), so the latency includes that write.

    .venv/bin/python benchmarks/bench_gateway.py

``--log-writer`` measures the prediction log's write path alone instead (no model, no HTTP):
``PredictionLog.record`` (one synchronous commit per call, what the gateway does today) against
``BatchedPredictionWriter.submit`` (queued, committed in batches by one thread), sequentially and from
8 threads, with 1-row and 100-row records, on a fresh SQLite file per case. Latency is the time the
caller spends in ``record``/``submit``; throughput counts calls until the last one is durable (the
writer's ``close()`` is inside the clock).

    .venv/bin/python benchmarks/bench_gateway.py --log-writer [--calls 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path

from _common import header  # benchmarks/ is on sys.path when a script runs

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRAIN_ROWS = 5_000
WARMUP_REQUESTS = 20
SINGLE_ROW_REQUESTS = 500
BATCH_REQUESTS = 100
BATCH_ROWS = 100
START_TIMEOUT_SECONDS = 120
REQUEST_TIMEOUT_SECONDS = 30


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def register_champion(tracking_uri: str, artifacts: Path) -> tuple[str, str, list[str]]:
    """Train, log and register a version of the default model; alias it champion. (name, version, features)"""
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from modelops.data.synthetic import generate_clicks
    from modelops.settings import load_catalog
    from modelops.stages.training import build_pipeline, split_frame, untrusted_types
    from modelops.vocabulary import Alias

    catalog = load_catalog()
    spec = catalog.model(catalog.platform.default_model)
    frame = generate_clicks(TRAIN_ROWS, seed=11)
    missing = sorted({*spec.features, spec.target} - set(frame.columns))
    if missing:
        raise SystemExit(
            f"the default model {spec.name!r} is not a clicks model (synthetic clicks lack {missing})"
        )
    x_train, _, y_train, _ = split_frame(frame, spec)
    model = build_pipeline(spec).fit(x_train, y_train)
    unreviewed = untrusted_types(model, spec.skops_trusted_types)
    if unreviewed:
        raise SystemExit(f"model has types not in skops_trusted_types: {unreviewed}")

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = client.create_experiment("bench-gateway", artifact_location=artifacts.as_uri())
    example = x_train.head(5)
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            registered_model_name=spec.name,
            signature=infer_signature(example, model.predict_proba(example)),
            input_example=example,
            pyfunc_predict_fn="predict_proba",
            skops_trusted_types=spec.skops_trusted_types,
            # Explicit requirements skip MLflow's inference (a subprocess that re-imports the model).
            pip_requirements=["scikit-learn", "skops"],
        )
    version = str(info.registered_model_version)
    client.set_registered_model_alias(spec.name, Alias.CHAMPION, version)
    return spec.name, version, spec.features


def wait_until_serving(client, process: subprocess.Popen[bytes], log: Path) -> float:
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < START_TIMEOUT_SECONDS:
        if process.poll() is not None:
            raise SystemExit(f"gateway exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if client.get("/health").status_code == 200:  # 200 only once the champion is loaded
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"gateway not healthy within {START_TIMEOUT_SECONDS} s:\n{log.read_text()[-3000:]}")


def timed_requests(client, count: int, payload: dict) -> tuple[list[float], float]:
    latencies = []
    t_start = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        response = client.post("/invocations", json=payload)
        latencies.append(time.perf_counter() - t0)
        if response.status_code != 200:
            raise SystemExit(f"gateway answered {response.status_code}: {response.text[:500]}")
    return latencies, time.perf_counter() - t_start


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def report(label: str, rows: int, latencies: list[float], wall: float) -> None:
    ms = [value * 1000 for value in latencies]
    print(
        f"{label:<18} {len(ms):>5} {percentile(ms, 50):>8.1f} {percentile(ms, 95):>8.1f} "
        f"{percentile(ms, 99):>8.1f} {max(ms):>8.1f} {statistics.mean(ms):>8.1f} {len(ms) / wall:>8.1f} {len(ms) * rows / wall:>9.0f}"
    )


LOG_WRITER_THREADS = 8


def log_records(count: int, rows: int) -> list:
    """``count`` prediction records of ``rows`` clicks rows each, as the gateway logs them."""
    from modelops.data.synthetic import generate_clicks
    from modelops.serving.prediction_log import PredictionRecord

    inputs = generate_clicks(rows, seed=5).to_dict(orient="records")
    outputs = [[0.75, 0.25]] * rows
    now = datetime.now(UTC)
    return [
        PredictionRecord(
            request_id=uuid.uuid4().hex,
            received_at=now,
            caller_id="bench",
            model_name="ctr_clicks",
            model_version="1",
            status_code=200,
            latency_ms=1.0,
            n_rows=rows,
            inputs=inputs,
            outputs=outputs,
        )
        for _ in range(count)
    ]


def timed_calls(call, records: list, threads: int) -> tuple[list[float], float]:
    """Per-call latency of ``call(record)`` over ``records`` split across ``threads``; and wall time."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)

    def worker(index: int) -> None:
        mine, out = records[index::threads], latencies[index]
        start.wait()
        for record in mine:
            t0 = time.perf_counter()
            call(record)
            out.append(time.perf_counter() - t0)

    workers = [threading.Thread(target=worker, args=(index,)) for index in range(threads)]
    for thread in workers:
        thread.start()
    start.wait()
    t_start = time.perf_counter()
    for thread in workers:
        thread.join()
    return [value for out in latencies for value in out], t_start


def bench_log_writer(calls: int) -> int:
    header("prediction log write path: PredictionLog.record per call vs BatchedPredictionWriter (SQLite)")
    sys.path.insert(0, str(PROJECT_ROOT / "plugins"))
    from modelops.serving.log_writer import BatchedPredictionWriter
    from modelops.serving.prediction_log import PredictionLog

    settings = {"max_queue": 10_000, "max_batch": 500, "flush_interval_s": 0.05}
    print(f"# {calls} calls per case; writer {settings}; latency = time in record()/submit()")
    print(
        f"{'path':<10} {'threads':>7} {'rows':>5} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'logged':>7}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-log-writer-") as tmp_name:
        case = 0
        for rows in (1, 100):
            for threads in (1, LOG_WRITER_THREADS):
                for path in ("record", "batched"):
                    case += 1
                    log = PredictionLog(f"sqlite:///{tmp_name}/case-{case}.db")
                    records = log_records(calls, rows)
                    log.record(log_records(1, rows)[0])  # warm: connection, statement cache
                    if path == "record":
                        latencies, t_start = timed_calls(log.record, records, threads)
                    else:
                        writer = BatchedPredictionWriter(log, **settings)
                        latencies, t_start = timed_calls(writer.submit, records, threads)
                        writer.close()  # durable: the queue drained
                    wall = time.perf_counter() - t_start
                    with log.engine.connect() as conn:
                        logged = conn.exec_driver_sql(
                            "SELECT count(*) FROM modelops_predictions"
                        ).scalar_one()
                    log.dispose()
                    ms = [value * 1000 for value in latencies]
                    print(
                        f"{path:<10} {threads:>7} {rows:>5} {calls / wall:>9.0f} {percentile(ms, 50):>8.3f} "
                        f"{percentile(ms, 99):>8.3f} {max(ms):>8.2f} {logged - 1:>7}"
                    )
                    if logged - 1 != calls:
                        raise SystemExit(f"{path}: {logged - 1} of {calls} calls logged")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-writer",
        action="store_true",
        help="measure the prediction log write path alone (record per call vs the batched writer)",
    )
    parser.add_argument("--calls", type=int, default=2_000, help="calls per case with --log-writer")
    args = parser.parse_args(argv)
    if args.log_writer:
        return bench_log_writer(args.calls)
    return bench_gateway()


def bench_gateway() -> int:
    header("scoring gateway: sequential HTTP latency (loopback, 1 uvicorn worker, SQLite registry and log)")
    # HistGradientBoosting predicts with OpenMP threads; on a busy machine they dominate the tail.
    print(f"# OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset (all cores)')} for the gateway")
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["MODELOPS_HOME"] = str(tmp / "modelops")
        os.environ["AIRFLOW_HOME"] = str(tmp / "airflow")
        os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
        os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        sys.path.insert(0, str(PROJECT_ROOT / "plugins"))
        # skops walks module attributes, tripping Airflow's deprecated-import shims once per name.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
        predictions_url = f"sqlite:///{tmp / 'predictions.db'}"

        t0 = time.perf_counter()
        name, version, features = register_champion(tracking_uri, tmp / "artifacts")
        print(
            f"registered {name} v{version} as champion ({TRAIN_ROWS} training rows): {time.perf_counter() - t0:.1f} s"
        )

        import httpx
        import sqlalchemy as sa

        from modelops.data.synthetic import generate_clicks

        port = free_loopback_port()
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MODELOPS_PREDICTIONS_URL": predictions_url,
            "MODELOPS_DEFAULT_MODEL": name,
            "PYTHONPATH": str(PROJECT_ROOT / "plugins"),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        # The gateway refuses to start without team keys and an admin token; the bench calls as the
        # model's own team, so authentication is part of what is measured.
        from modelops.serving.access import key_entry, new_key
        from modelops.settings import load_catalog

        api_key = new_key()
        env["MODELOPS_GATEWAY_KEYS"] = json.dumps(
            {"bench": key_entry(load_catalog().model(name).team, api_key)}
        )
        env["MODELOPS_GATEWAY_ADMIN_TOKEN"] = secrets.token_urlsafe(32)
        log = tmp / "gateway.log"
        command = [sys.executable, "-m", "modelops.serving", "--host", "127.0.0.1", "--port", str(port)]
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [*command, "--log-level", "warning"],
                env=env,
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                timeout=REQUEST_TIMEOUT_SECONDS,
                trust_env=False,
                headers={"Authorization": f"Bearer {api_key}"},
            ) as client:
                ready = wait_until_serving(client, process, log)
                print(
                    f"gateway on 127.0.0.1:{port} serving v{version} after {ready:.1f} s (process start + model load)"
                )
                rows = generate_clicks(BATCH_ROWS, seed=5)[features]
                one_row = {"dataframe_split": rows.head(1).to_dict(orient="split", index=False)}
                batch = {"dataframe_split": rows.to_dict(orient="split", index=False)}
                timed_requests(client, WARMUP_REQUESTS, one_row)

                print()
                print(
                    f"{'requests':<18} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8} {'req/s':>8} {'rows/s':>9}"
                )
                report("1 row each", 1, *timed_requests(client, SINGLE_ROW_REQUESTS, one_row))
                report(f"{BATCH_ROWS} rows each", BATCH_ROWS, *timed_requests(client, BATCH_REQUESTS, batch))
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)

        engine = sa.create_engine(predictions_url)
        with engine.connect() as conn:
            logged = conn.execute(
                sa.text("SELECT n_rows, latency_ms FROM modelops_predictions ORDER BY received_at")
            ).all()
        engine.dispose()
        expected = WARMUP_REQUESTS + SINGLE_ROW_REQUESTS + BATCH_REQUESTS
        print()
        print(
            f"prediction log: {len(logged)} calls, {sum(row.n_rows for row in logged)} scored rows "
            f"(sent {expected} calls incl. {WARMUP_REQUESTS} warm-up, "
            f"{WARMUP_REQUESTS + SINGLE_ROW_REQUESTS + BATCH_REQUESTS * BATCH_ROWS} rows)"
        )
        # latency_ms is measured by the gateway around parsing + predict, before the log write: the gap to
        # the client's figure is HTTP, the prediction-log write (an SQLite commit) and scheduling.
        measured = logged[WARMUP_REQUESTS:]
        print("server-side scoring time (latency_ms in the log, excludes the log write and HTTP):")
        for label, rows in (("1 row each", 1), (f"{BATCH_ROWS} rows each", BATCH_ROWS)):
            ms = [row.latency_ms for row in measured if row.n_rows == rows]
            print(
                f"  {label:<16} p50 {percentile(ms, 50):.1f} ms, p95 {percentile(ms, 95):.1f} ms, "
                f"p99 {percentile(ms, 99):.1f} ms, max {max(ms):.1f} ms"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
