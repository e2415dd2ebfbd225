"""Scoring gateway against MLflow's own scoring server and an in-process predict, interleaved.

Trains the project's pipeline (``modelops.stages.training.build_pipeline`` with the spec of the platform's
default model, include/models/) on synthetic clicks, logs and registers it in a SQLite MLflow registry under
a temporary folder, writes the audit record that authorises it (a promotion, signed with a throw-away
keyring) and sets the ``champion`` alias. Then one run measures the same version three ways:

* ``ours``: ``python -m modelops.serving`` as deployed (team-key auth, input screening, the batched
  prediction log on SQLite), 1 uvicorn worker;
* ``mlflow``: ``mlflow models serve -m models:/<name>@champion --env-manager local -w 1``;
* ``inproc``: ``mlflow.pyfunc.load_model(...).predict(frame)`` in this process, no HTTP.

``OMP_NUM_THREADS=1`` for all three. Cases: sequential 1-row and 100-row calls; 8 concurrent clients
(threads, each with its own ``httpx.Client``) with 1-row and 100-row calls. Every round runs a slice of
every case against all three, the order rotating per round, so machine load hits all three alike. After
the load the gateway is stopped with SIGTERM and the prediction log must hold exactly one row per call
sent to it (warm-up included).

    .venv/bin/python benchmarks/bench_gateway.py [--rounds 6] [--scale 1.0]

``--log-writer`` measures the prediction log's write path alone instead (no model, no HTTP):
``PredictionLog.record`` (one synchronous commit per call) against ``BatchedPredictionWriter.submit``
(queued, committed in batches by one thread), sequentially and from 8 threads, with 1-row and 100-row
records, on a fresh SQLite file per case. Latency is the time the caller spends in ``record``/``submit``;
throughput counts calls until the last one is durable (the writer's ``close()`` is inside the clock).

    .venv/bin/python benchmarks/bench_gateway.py --log-writer [--calls 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
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
BATCH_ROWS = 100
CLIENT_THREADS = 8
WARMUP_CALLS = 20
# Calls per target per round for each case, before --scale: (label, rows, threads, calls per round).
CASES = (
    ("seq 1 row", 1, 1, 80),
    (f"seq {BATCH_ROWS} rows", BATCH_ROWS, 1, 20),
    (f"{CLIENT_THREADS} clients 1 row", 1, CLIENT_THREADS, 160),
    (f"{CLIENT_THREADS} clients {BATCH_ROWS} rows", BATCH_ROWS, CLIENT_THREADS, 40),
)
TARGETS = ("ours", "mlflow", "inproc")
START_TIMEOUT_SECONDS = 120
REQUEST_TIMEOUT_SECONDS = 30
# HistGradientBoosting predicts with OpenMP threads; on a busy machine they dominate the tail. One thread
# for this process (the in-process predict) and both servers, set before numpy is first imported.
os.environ["OMP_NUM_THREADS"] = "1"


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


def record_promotion(audit_url: str, keyring, tracking_uri: str, name: str, version: str) -> None:
    """The deployment's promotion record of ``name`` v``version`` (its files' hashes): what the gateway
    needs before it serves a version."""
    from modelops.audit import AuditStore
    from modelops.evidence import CHAMPION_FIELD, evidence_summary, version_file_hashes
    from modelops.registry import ModelRegistry
    from modelops.vocabulary import AuditAction, Decision, model_subject

    files = version_file_hashes(ModelRegistry(tracking_uri), name, version)
    store = AuditStore(audit_url, keyring=keyring)
    store.append(
        actor="bench",
        action=AuditAction.MODEL_DEPLOYED,
        subject=model_subject(name, version),
        decision=Decision.PROMOTED,
        details={CHAMPION_FIELD: version, **evidence_summary(files)},
    )
    store.dispose()


def wait_until_serving(client, process: subprocess.Popen[bytes], log: Path) -> float:
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < START_TIMEOUT_SECONDS:
        if process.poll() is not None:
            raise SystemExit(f"{log.stem} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if client.get("/ping").status_code == 200:  # 200 only once the model is loaded
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{log.stem} not healthy within {START_TIMEOUT_SECONDS} s:\n{log.read_text()[-3000:]}")


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


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
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default: 6)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply the calls per round of every case (default: 1)"
    )
    args = parser.parse_args(argv)
    if args.log_writer:
        return bench_log_writer(args.calls)
    return bench_gateway(args.rounds, args.scale)


def start_server(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as log_file:
        return subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_server(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM to the server's process group, as an orchestrator stops it; its exit code."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
        raise SystemExit(f"process {process.args} did not stop within {timeout} s of SIGTERM") from None


class HttpTarget:
    """A scoring server: one keep-alive ``httpx.Client`` per client thread, counting the calls sent."""

    def __init__(self, base_url: str, headers: dict[str, str], bodies: dict[int, bytes]) -> None:
        import httpx

        self.bodies = bodies
        self.clients = [
            httpx.Client(
                base_url=base_url,
                timeout=REQUEST_TIMEOUT_SECONDS,
                trust_env=False,
                headers={**headers, "Content-Type": "application/json"},
            )
            for _ in range(CLIENT_THREADS)
        ]
        self.sent = 0
        self.failed: list[str] = []
        self._lock = threading.Lock()

    def caller(self, index: int, rows: int):
        client, body = self.clients[index], self.bodies[rows]

        def call() -> None:
            response = client.post("/invocations", content=body)
            if response.status_code != 200:
                with self._lock:
                    self.failed.append(f"{response.status_code}: {response.text[:300]}")

        return call

    def count(self, calls: int) -> None:
        with self._lock:
            self.sent += calls

    def close(self) -> None:
        for client in self.clients:
            client.close()


class InProcessTarget:
    """``model.predict(frame)`` on a loaded pyfunc, in this process."""

    def __init__(self, model, frames: dict[int, object]) -> None:
        self.model, self.frames = model, frames
        self.sent = 0
        self.failed: list[str] = []

    def caller(self, _index: int, rows: int):
        model, frame = self.model, self.frames[rows]
        return lambda: model.predict(frame)

    def count(self, calls: int) -> None:
        self.sent += calls

    def close(self) -> None:
        pass


def run_case(target, rows: int, threads: int, calls: int) -> tuple[list[float], float]:
    """``calls`` calls of ``rows`` rows from ``threads`` threads (calls split evenly); latencies and wall."""
    per_thread = max(1, calls // threads)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def worker(index: int) -> None:
        call, out = target.caller(index, rows), latencies[index]
        barrier.wait()
        for _ in range(per_thread):
            t0 = time.perf_counter()
            call()
            out.append(time.perf_counter() - t0)

    workers = [threading.Thread(target=worker, args=(index,)) for index in range(threads)]
    for thread in workers:
        thread.start()
    barrier.wait()
    t_start = time.perf_counter()
    for thread in workers:
        thread.join()
    wall = time.perf_counter() - t_start
    target.count(per_thread * threads)
    return [value for out in latencies for value in out], wall


def summary(latencies: list[float], wall: float, rows: int) -> dict[str, float]:
    ms = [value * 1000 for value in latencies]
    return {
        "n": len(ms),
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
        "max": max(ms),
        "calls_s": len(ms) / wall,
        "rows_s": len(ms) * rows / wall,
    }


def bench_gateway(rounds: int, scale: float) -> int:
    header(
        "scoring gateway vs `mlflow models serve` vs in-process predict (loopback, 1 uvicorn worker each, "
        "interleaved rounds)"
    )
    print(f"# OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} for all three; {rounds} rounds, scale {scale}")
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
        audit_url = f"sqlite:///{tmp / 'audit.db'}"

        t0 = time.perf_counter()
        name, version, features = register_champion(tracking_uri, tmp / "artifacts")
        from modelops.audit import AuditKeyring

        audit_keys = {"current": "bench", "keys": {"bench": secrets.token_urlsafe(32)}}
        record_promotion(
            audit_url, AuditKeyring.from_json(json.dumps(audit_keys)), tracking_uri, name, version
        )
        print(
            f"registered {name} v{version} as champion ({TRAIN_ROWS} training rows), promotion recorded: "
            f"{time.perf_counter() - t0:.1f} s"
        )

        import mlflow.pyfunc
        import sqlalchemy as sa

        from modelops.data.synthetic import generate_clicks
        from modelops.serving.access import key_entry, new_key
        from modelops.settings import load_catalog

        venv_bin = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",  # mlflow's `uvicorn` command
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MODELOPS_PREDICTIONS_URL": predictions_url,
            "MODELOPS_AUDIT_URL": audit_url,
            "MODELOPS_AUDIT_KEYS": json.dumps(audit_keys),
            "MODELOPS_DEFAULT_MODEL": name,
            "PYTHONPATH": str(PROJECT_ROOT / "plugins"),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        # The gateway refuses to start without team keys and an admin token; the bench calls as the
        # model's own team, so authentication is part of what is measured.
        api_key = new_key()
        env["MODELOPS_GATEWAY_KEYS"] = json.dumps(
            {"bench": key_entry(load_catalog().model(name).team, api_key)}
        )
        env["MODELOPS_GATEWAY_ADMIN_TOKEN"] = secrets.token_urlsafe(32)
        ours_port, mlflow_port = free_loopback_port(), free_loopback_port()
        ours_log, mlflow_log = tmp / "gateway.log", tmp / "mlflow-serve.log"
        ours = start_server(
            [sys.executable, "-m", "modelops.serving", "--host", "127.0.0.1", "--port", str(ours_port)]
            + ["--log-level", "warning"],
            env,
            tmp,
            ours_log,
        )
        mlflow_server = None
        targets: dict[str, object] = {}
        try:
            import httpx

            rows = generate_clicks(BATCH_ROWS, seed=5)[features]
            frames = {1: rows.head(1).reset_index(drop=True), BATCH_ROWS: rows}
            bodies = {
                n: json.dumps({"dataframe_split": frame.to_dict(orient="split", index=False)}).encode()
                for n, frame in frames.items()
            }
            with httpx.Client(base_url=f"http://127.0.0.1:{ours_port}", trust_env=False, timeout=5) as probe:
                ready = wait_until_serving(probe, ours, ours_log)
            print(f"gateway on 127.0.0.1:{ours_port} serving v{version} after {ready:.1f} s")
            # Started only once the gateway has checked and loaded the version: with a local artifact
            # store, MLflow's models:/ download returns the store's own folder and writes
            # registered_model_meta into it, so a gateway hashing the files afterwards refuses the version.
            mlflow_server = start_server(
                [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion"]
                + ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(mlflow_port), "-w", "1"],
                env,
                tmp,
                mlflow_log,
            )
            with httpx.Client(
                base_url=f"http://127.0.0.1:{mlflow_port}", trust_env=False, timeout=5
            ) as probe:
                ready = wait_until_serving(probe, mlflow_server, mlflow_log)
            print(f"mlflow models serve on 127.0.0.1:{mlflow_port} serving v{version} after {ready:.1f} s")
            auth = {"Authorization": f"Bearer {api_key}"}
            targets["ours"] = HttpTarget(f"http://127.0.0.1:{ours_port}", auth, bodies)
            targets["mlflow"] = HttpTarget(f"http://127.0.0.1:{mlflow_port}", auth, bodies)
            local = mlflow.pyfunc.load_model(
                f"models:/{name}@champion"
            )  # register_champion set the tracking URI
            targets["inproc"] = InProcessTarget(local, frames)
            for target in targets.values():  # warm-up: connections, first-call paths
                for rows_ in (1, BATCH_ROWS):
                    run_case(target, rows_, 1, WARMUP_CALLS // 2)

            results: dict[tuple[str, str], tuple[list[float], float]] = {
                (target, case[0]): ([], 0.0) for target in TARGETS for case in CASES
            }
            t_load = time.perf_counter()
            for round_ in range(rounds):
                order = TARGETS[round_ % 3 :] + TARGETS[: round_ % 3]
                for label, rows_, threads, calls in CASES:
                    for target in order:
                        latencies, wall = run_case(
                            targets[target], rows_, threads, max(threads, round(calls * scale))
                        )
                        done, total = results[(target, label)]
                        results[(target, label)] = (done + latencies, total + wall)
            load_seconds = time.perf_counter() - t_load
            failed = {key: target.failed for key, target in targets.items() if target.failed}
            if failed:
                raise SystemExit(f"calls failed: { {key: (len(v), v[:3]) for key, v in failed.items()} }")
            sent_to_ours = targets["ours"].sent
        finally:
            for target in targets.values():
                target.close()
            ours_exit = stop_server(ours)
            if mlflow_server is not None:
                stop_server(mlflow_server)

        print(
            f"# load average (1/5/15 min) at end: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}; "
            f"measured load {load_seconds:.0f} s"
        )
        print()
        print(
            f"{'case':<20} {'target':<7} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} "
            f"{'calls/s':>8} {'rows/s':>8}"
        )
        figures: dict[tuple[str, str], dict[str, float]] = {}
        for label, rows_, _threads, _calls in CASES:
            for target in TARGETS:
                figures[(target, label)] = fig = summary(*results[(target, label)], rows_)
                print(
                    f"{label:<20} {target:<7} {fig['n']:>5} {fig['p50']:>8.2f} {fig['p95']:>8.2f} "
                    f"{fig['p99']:>8.2f} {fig['max']:>8.1f} {fig['calls_s']:>8.1f} {fig['rows_s']:>8.0f}"
                )
        print()
        print(
            f"{'case':<20} {'p50 ours/mlflow':>15} {'p99 ours/mlflow':>15} {'calls/s ours/mlflow':>19} "
            f"{'p50 ours-inproc ms':>18}"
        )
        for label, *_ in CASES:
            ours_fig, mlflow_fig, local_fig = (figures[(target, label)] for target in TARGETS)
            print(
                f"{label:<20} {ours_fig['p50'] / mlflow_fig['p50']:>15.2f} "
                f"{ours_fig['p99'] / mlflow_fig['p99']:>15.2f} "
                f"{ours_fig['calls_s'] / mlflow_fig['calls_s']:>19.2f} "
                f"{ours_fig['p50'] - local_fig['p50']:>18.2f}"
            )

        engine = sa.create_engine(predictions_url)
        with engine.connect() as conn:
            logged, distinct, scored_rows = conn.execute(
                sa.text("SELECT count(*), count(DISTINCT request_id), sum(n_rows) FROM modelops_predictions")
            ).one()
        engine.dispose()
        print()
        print(
            f"gateway exit code after SIGTERM: {ours_exit}; prediction log: {logged} rows "
            f"({distinct} distinct request ids, {scored_rows} scored rows) for {sent_to_ours} calls sent"
        )
        if logged != sent_to_ours or distinct != logged:
            print(f"LOST OR DUPLICATED: {sent_to_ours - logged} calls without a row")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
