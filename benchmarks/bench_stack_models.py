"""Many models at once on the production stack (issue 12, part 3): N model specs through the whole chain
concurrently on the Celery stack of ``make stack``, and one model alone as the peer.

Each phase runs in a fresh interpreter (this script with ``--child``) on a stack of its own, started and
torn down (``prodstack.down``: processes stopped, databases, roles and the Redis database dropped) by that
phase, also when it fails:

* **peer**: one model (``--peer-model``, the demo's click-through model) through the chain, alone;
* **many**: N models (``--models``, default 20): half copies of ``ctr_recommender`` on ``ctr_clicks``,
  half copies of ``diabetes_progression`` on ``diabetes`` (high risk: each version is approved by the
  policy's approver through Airflow's REST API, as ``make demo`` does). One file is dropped per dataset,
  so one validation run feeds every model, and training, the gate and deployment follow on Asset events.

The stack uses an include folder of its own (``MODELOPS_INCLUDE_DIR`` of every process: the project's
``include/`` copied, plus the model copies), the machine's PostgreSQL (``--pg-url``) and Redis
(``--redis-url``, a database of its own), a prefix of its own and free ports. The chain is the demo
driver's (``modelops_dev.driver.drive``): the drops, validation, training, the gate, deployment, a traffic
burst through the gateway for every model, one monitoring run over all models, a dry-run retirement.

Measured per phase (``modelops_dev.manymodels``): wall time from the drops to each model's champion and
of each stage; per task instance the scheduler latency ``start_date - queued_when`` (Airflow's REST API),
p50/p95/max per DAG and overall; sampled every 2 s: task instances running (against the worker slots,
workers x concurrency), queued and scheduled, runs queued behind a DAG's ``max_active_runs``, the Celery
broker's depth, load average, CPU busy share, and the CPU of each service (its process tree: scheduler,
api-server, workers, dag-processor, triggerer, MLflow, gateway, moto), of the stack's PostgreSQL backends
and of Redis. Then where it saturates, said plainly.

    .venv/bin/python benchmarks/bench_stack_models.py                  # 20 models (an hour or more)
    .venv/bin/python benchmarks/bench_stack_models.py --models 4       # a check (~25 min on a busy machine)
    .venv/bin/python benchmarks/bench_stack_models.py --from-raw       # the table again from the records

An Asset event Airflow drops (a DAG at its ``max_active_runs``, apache/airflow#56050) is caught up by the
stage itself: its next run or its 5-minute sweep acts on what the audit record says is owed, and the
benchmark waits for that. ``--rescue`` instead deploys an approval still undeployed by a hand-triggered
run, printed and recorded as a rescue (``manymodels.LostApprovalRescue``, the workaround before the
catch-up).

Needs PostgreSQL (trust or password in --pg-url) and Redis on this machine, as ``make stack`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import header  # benchmarks/ is on sys.path when a script runs

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT_ROOT / "plugins"), str(PROJECT_ROOT / "devstack")]

DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
DEFAULT_JSON = PROJECT_ROOT / ".modelops" / "bench" / "bench_stack_models.json"
SETTLE_SECONDS = 180.0
"""At most this long, after the DAGs are unpaused, for the runs unpausing starts (validation's and the
audit anchor's schedules, monitoring's last hour) to finish before the drops: they are not the chain."""
# The tasks whose span is a stage of the chain, per model (rendered map index = the model's name).
STAGE_TASKS = {
    "training": ("modelops_training", "train_and_register"),
    "gate": ("modelops_compliance_gate", "evaluate_policy"),
    "deployment": ("modelops_deployment", "deploy_to_gateway"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _seconds(value: str | None, since: datetime) -> float | None:
    return None if not value else round((datetime.fromisoformat(value) - since).total_seconds(), 1)


# --- one phase (child process) ---------------------------------------------------------------------


def wait_settled(engine: Any, timeout: float, say: Any) -> float:
    """Wait until no DAG run is queued or running (the runs unpausing started); returns the seconds."""
    import sqlalchemy as sa

    started = time.monotonic()
    # The scheduler creates those runs on its next loops after the unpause: give it time to.
    time.sleep(15)
    while time.monotonic() - started < timeout:
        with engine.connect() as conn:
            busy = conn.execute(
                sa.text("select count(*) from dag_run where state in ('queued', 'running')")
            ).scalar_one()
        if busy == 0:
            break
        time.sleep(2)
    else:
        say(f"runs still going after {timeout:.0f} s of settling; dropping anyway")
    return time.monotonic() - started


def run_phase(args: argparse.Namespace) -> dict[str, Any]:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from modelops_dev import manymodels, prodstack

    models = args.child_models.split(",")
    label = args.child
    work = Path(tempfile.mkdtemp(prefix=f"bench-stack-{label}-"))
    include = work / "include"
    copies = manymodels.write_include_dir(include, models)
    ports = prodstack.StackPorts(
        **{
            name: free_port()
            for name in ("airflow", "mlflow", "gateway", "s3", "worker_log", "triggerer_log")
        },
        scheduler_health=free_port(),
    )
    config = prodstack.StackConfig(
        root=work / "stack",
        prefix=f"bench_mm_{label}_{secrets.token_hex(2)}",
        pg_url=prodstack.psycopg2_url(args.pg_url),
        redis_url=args.redis_url,
        ports=ports,
        workers=args.workers,
        worker_concurrency=args.concurrency,
        include_dir=include,
    )
    started = time.monotonic()

    def say(message: str) -> None:
        print(f"[{label} {time.monotonic() - started:6.1f}s] {message}", flush=True)

    result: dict[str, Any] = {
        "phase": label,
        "models": models,
        "copies": copies,
        "workers": args.workers,
        "worker_concurrency": args.concurrency,
        "slots": args.workers * args.concurrency,
        "load_before": list(os.getloadavg()),
    }
    sampler = None
    try:
        t0 = time.monotonic()
        the_plan = prodstack.up(config, say)
        result["stack_up_seconds"] = round(time.monotonic() - t0, 1)
        os.environ.update(prodstack.client_env(the_plan))
        from modelops.settings import load_catalog
        from modelops_dev.airflow_api import AirflowApi, wait_for_dags
        from modelops_dev.driver import DAG_IDS, drive
        from modelops_dev.mlflow_api import MlflowApi

        catalog = load_catalog()
        missing = [m for m in models if m not in catalog.models]
        if missing:
            raise SystemExit(f"the include folder {include} lacks {missing}")
        api = AirflowApi(config.ports.url("airflow"), "admin", the_plan.admin_password)
        wait_for_dags(api, DAG_IDS)
        for dag_id in DAG_IDS:
            api.unpause(dag_id)
        airflow_db = next(db.name for db in the_plan.databases if db.name == f"{config.prefix}_airflow")
        airflow_db_url = (
            make_url(config.pg_url).set(database=airflow_db).render_as_string(hide_password=False)
        )
        engine = sa.create_engine(airflow_db_url, pool_size=1)
        result["settle_seconds"] = round(wait_settled(engine, SETTLE_SECONDS, say), 1)
        engine.dispose()

        # The load this phase's figures were taken under: just before the drops.
        result["load_at_drops"] = list(os.getloadavg())
        sampler = manymodels.Sampler(
            run_dir=config.run_dir,
            airflow_db_url=airflow_db_url,
            redis_url=config.redis_url,
            pg_prefix=config.prefix,
            interval=args.sample_seconds,
        )
        sampler.start()
        lines: list[tuple[float, str]] = []

        def out(line: str) -> None:
            lines.append((sampler.offset(), line))
            say(line.strip())

        since = datetime.now(UTC)
        t_drive = sampler.offset()
        say(f"driving {len(models)} models: {', '.join(models)}")
        report = None
        mlflow = MlflowApi(config.ports.url("mlflow"), auth=prodstack.mlflow_auth(the_plan))
        rescue = None
        if args.rescue_lost_approvals:
            rescue = manymodels.LostApprovalRescue(
                AirflowApi(config.ports.url("airflow"), "admin", the_plan.admin_password),
                MlflowApi(config.ports.url("mlflow"), auth=prodstack.mlflow_auth(the_plan)),
                models,
            )
            rescue.start()
        try:
            report = drive(
                api,
                mlflow,
                config.ports.url("gateway"),
                catalog,
                models=models,
                out=out,
                champion_timeout=args.timeout,
                stage_timeout=args.timeout,
                approver_passwords=the_plan.approver_passwords,
                incident_model=None,
                canary_rollback_model=None,
                outbox=config.modelops_home / "outbox" / "alerts.jsonl",
                staging=config.root / "staging",
            )
        except Exception as exc:  # noqa: BLE001 - what ran until the failure is still worth keeping
            result["error"] = f"{type(exc).__name__}: {exc}"
            say(f"the chain failed: {result['error']}")
        t_done = sampler.offset()
        sampler.stop()
        if rescue is not None:
            rescue.stop()
            result["rescues"], result["rescue_errors"] = rescue.rescues, rescue.errors
            for found in rescue.rescues:
                say(f"RESCUED a lost approval: {found}")
        # Everything measured, as it came: written before the analysis (a fault there loses nothing).
        result.update(
            since=since.isoformat(),
            t_drive=t_drive,
            t_done=t_done,
            lines=lines,
            samples=[manymodels.as_data(s) for s in sampler.samples if s.t >= t_drive],
            sampler_errors=sampler.errors,
            instances=api.task_instances_since(since),
            runs={dag_id: api.runs_since(dag_id, since) for dag_id in DAG_IDS},
            stage_seconds={r.stage: r.seconds for r in report.stages} if report else {},
            traffic={
                name: {"ok": m.traffic.ok, "failed": m.traffic.failed}
                for name, m in report.models.items()
                if m.traffic
            }
            if report
            else {},
        )
        return result
    finally:
        # A second Ctrl-C or a SIGTERM must not cut the teardown short: it would leave the stack's
        # processes, databases and Redis database behind (they run in sessions of their own).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if sampler is not None:
                sampler.stop()
        finally:
            try:
                prodstack.down(config, say)
            finally:
                if args.keep:
                    say(f"kept {work} (logs in {config.logs})")
                else:
                    shutil.rmtree(work, ignore_errors=True)


def analyse(raw: dict[str, Any]) -> dict[str, Any]:
    """The figures of one phase from what it measured (``run_phase``'s record)."""
    from modelops_dev import manymodels

    lines: list[tuple[float, str]] = [(float(t), str(text)) for t, text in raw["lines"]]
    t_drive, t_done = float(raw["t_drive"]), float(raw["t_done"])
    since = datetime.fromisoformat(raw["since"])
    instances, runs, result = raw["instances"], raw["runs"], raw
    samples = [manymodels.Sample(**s) for s in raw["samples"]]
    stage_seconds = raw["stage_seconds"]

    def at(prefix: str) -> list[tuple[float, str]]:
        return [(t - t_drive, text) for t, text in lines if text.startswith(prefix)]

    champions: dict[str, float] = {}
    for t, text in at("  champion"):
        match = re.match(r"\s+champion\s+(\S+)", text)
        if match:
            champions[match.group(1)] = round(t, 1)
    drops = at("  dataset")
    traffic = at("  traffic")
    # The burst starts when the line before its first one was printed (deployment's results).
    traffic_start = max(
        (
            t - t_drive
            for t, text in lines
            if traffic and t - t_drive <= traffic[0][0] and "traffic" not in text
        ),
        default=traffic[0][0] if traffic else 0.0,
    )
    stage_lines = {stage: at(f"  {stage}") for stage in ("validation", "monitoring", "retirement")}

    # Per model, each stage's task (start and end since the drops) and its champion as Airflow saw it.
    per_model: dict[str, dict[str, Any]] = {
        name: {"champion_seen_s": champions.get(name)} for name in result["models"]
    }
    stages: dict[str, dict[str, Any]] = {}
    for stage, (dag_id, task_id) in STAGE_TASKS.items():
        spans = []
        for ti in instances:
            if ti["dag_id"] != dag_id or ti["task_id"] != task_id or ti.get("state") != "success":
                continue
            name = ti.get("rendered_map_index")
            start, end = _seconds(ti.get("start_date"), since), _seconds(ti.get("end_date"), since)
            if name in per_model and start is not None and end is not None:
                per_model[name][stage] = [start, end]
                spans.append((start, end))
        if spans:
            durations = sorted(end - start for start, end in spans)
            stages[stage] = {
                "tasks": len(spans),
                "first_start_s": min(s for s, _ in spans),
                "last_end_s": max(e for _, e in spans),
                "task_p50_s": round(manymodels.percentile(durations, 0.5), 1),
                "task_max_s": round(max(durations), 1),
            }
    dag_runs = {}
    for dag_id, found in runs.items():
        if not found:
            continue
        starts = [_seconds(r.get("start_date"), since) for r in found if r.get("start_date")]
        ends = [_seconds(r.get("end_date"), since) for r in found if r.get("end_date")]
        waits = [
            (datetime.fromisoformat(r["start_date"]) - datetime.fromisoformat(r["queued_at"])).total_seconds()
            for r in found
            if r.get("start_date") and r.get("queued_at")
        ]
        dag_runs[dag_id] = {
            "runs": len(found),
            "states": sorted({r["state"] for r in found}),
            "first_start_s": min(starts) if starts else None,
            "last_end_s": max(ends) if ends else None,
            "run_queued_to_start_max_s": round(max(waits), 1) if waits else None,
        }
    for name, span in stages.items():
        span["runs"] = dag_runs.get(STAGE_TASKS[name][0], {}).get("runs")
    latency = manymodels.latency_stats(instances)
    conc = manymodels.concurrency(samples, result["slots"])
    mach = manymodels.machine(samples, result["load_at_drops"][0])
    return {
        "wall": {
            "drops_s": round(drops[-1][0], 1) if drops else None,
            "validation_run_s": _round(stage_seconds.get("validation")),
            "first_champion_s": min(champions.values()) if champions else None,
            "last_champion_s": max(champions.values()) if champions else None,
            "traffic_s": round(traffic[-1][0] - traffic_start, 1) if traffic else None,
            "monitoring_run_s": _round(stage_seconds.get("monitoring")),
            "retirement_run_s": _round(stage_seconds.get("retirement")),
            "chain_s": round(t_done - t_drive, 1),
            "stage_lines_s": {k: [round(t, 1) for t, _ in v] for k, v in stage_lines.items()},
        },
        "stages": stages,
        "dag_runs": dag_runs,
        "per_model": per_model,
        "task_instances": len(instances),
        "latency": manymodels.as_data(latency),
        "concurrency": manymodels.as_data(conc),
        "machine": manymodels.as_data(mach),
        "saturation": manymodels.saturation(conc, mach, latency),
        "timeline": manymodels.timeline(samples),
        "traffic": raw["traffic"],
        "error": raw.get("error"),
        "approvals": sum(1 for _, text in lines if "answered Approve" in text),
    }


# --- the parent: both phases, the table, the JSON ---------------------------------------------------


def raw_path(result_file: Path, phase: str) -> Path:
    """Where a phase's record (every line, sample, task instance and run) is kept beside the result."""
    return result_file.with_name(f"{result_file.stem}.{phase}.raw.json")


def run_child(args: argparse.Namespace, label: str, models: list[str]) -> dict[str, Any]:
    out = raw_path(args.json, label)
    out.unlink(missing_ok=True)
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        label,
        "--child-models",
        ",".join(models),
        "--json",
        str(out),
        "--pg-url",
        args.pg_url,
        "--redis-url",
        args.redis_url,
        "--workers",
        str(args.workers),
        "--concurrency",
        str(args.concurrency),
        "--timeout",
        str(args.timeout),
        "--sample-seconds",
        str(args.sample_seconds),
        *(["--keep"] if args.keep else []),
        *(["--rescue"] if args.rescue_lost_approvals else []),
    ]
    # Ctrl-C reaches the phase too (same process group) and a SIGTERM to this script is passed on: either
    # way the phase tears its stack down in its `finally` before this script exits.
    child = subprocess.Popen(argv)
    try:
        child.wait()
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (see _exit_on_sigterm)
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            child.wait()
        raise
    if not out.is_file():
        raise SystemExit(f"phase {label} failed (exit {child.returncode}); see its output above")
    return json.loads(out.read_text())


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """A phase's figures, without the bulky record (kept in its raw file)."""
    bulky = ("lines", "samples", "instances", "runs", "t_drive", "t_done")
    return {**{k: v for k, v in raw.items() if k not in bulky}, **analyse(raw)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _f(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    phases = [results[p] for p in ("peer", "many") if p in results]
    head = f"{'':<40}" + "".join(f" {p['phase'] + ' (' + str(len(p['models'])) + ')':>16}" for p in phases)
    rows = [head]

    def row(name: str, values: list[Any], spec: str = ".1f") -> None:
        rows.append(f"{name:<40}" + "".join(f" {_f(v, spec):>16}" for v in values))

    row("load avg 1 min at the drops", [p["load_at_drops"][0] for p in phases], ".2f")
    row("stack up (s)", [p.get("stack_up_seconds") for p in phases])
    for key, name in (
        ("drops_s", "drops written and uploaded (s)"),
        ("validation_run_s", "validation run (s)"),
        ("first_champion_s", "first champion after the drops (s)"),
        ("last_champion_s", "last champion after the drops (s)"),
        ("traffic_s", "traffic burst, every model (s)"),
        ("monitoring_run_s", "monitoring run, every model (s)"),
        ("retirement_run_s", "retirement dry run (s)"),
        ("chain_s", "whole chain (s)"),
    ):
        row(name, [p["wall"].get(key) for p in phases])

    def text_row(name: str, texts: list[str]) -> None:
        rows.append(f"{name:<40}" + "".join(f" {text:>16}" for text in texts))

    for stage in STAGE_TASKS:
        row(f"{stage}: first start to last end (s)", [_span(p, stage) for p in phases])
        text_row(f"{stage}: task p50/max s, runs", [_stage_text(p, stage) for p in phases])
    text_row("latency queued->running p50/p95/max", ["" for _ in phases])
    for dag in [*sorted({d for p in phases for d in p["latency"]} - {"all"}), "all"]:
        text_row(f"  {dag.removeprefix('modelops_')}", [_latency_text(p["latency"].get(dag)) for p in phases])
    text_row(
        "running tasks max/mean/slots",
        [
            f"{p['concurrency']['running_max']}/{p['concurrency']['running_mean']:.1f}/{p['slots']}"
            for p in phases
        ],
    )
    row("samples with every slot busy (%)", [100 * p["concurrency"]["share_at_slots"] for p in phases], ".0f")
    row("queued tasks max", [p["concurrency"]["queued_max"] for p in phases], "d")
    row("broker depth max", [p["concurrency"]["broker_depth_max"] for p in phases], "d")
    row("load avg 1 min max", [p["machine"]["load1_max"] for p in phases], ".2f")
    row("CPU busy mean (%)", [100 * p["machine"]["cpu_busy_mean"] for p in phases], ".0f")
    row("samples with CPU >= 90 % (%)", [100 * p["machine"]["share_cpu_saturated"] for p in phases], ".0f")
    row("cores: this stack and its databases", [p["machine"].get("stack_cores") for p in phases], ".2f")
    row("cores: other processes", [p["machine"].get("other_cores") for p in phases], ".2f")
    groups = []
    for p in phases:
        groups += [g for g in p["machine"]["cores_used"] if g not in groups]
    for group in groups:
        row(f"cores used: {group}", [p["machine"]["cores_used"].get(group) for p in phases], ".2f")
    return rows


def _span(phase: dict[str, Any], stage: str) -> float | None:
    found = phase["stages"].get(stage)
    return None if not found else round(found["last_end_s"] - found["first_start_s"], 1)


def _stage_text(phase: dict[str, Any], stage: str) -> str:
    found = phase["stages"].get(stage)
    if not found:
        return "-"
    return f"{found['task_p50_s']:.0f}/{found['task_max_s']:.0f}/{found.get('runs') or '-'}"


def _latency_text(found: dict[str, Any] | None) -> str:
    if not found or not found.get("count"):
        return "-"
    return f"{found['p50']:.1f}/{found['p95']:.1f}/{found['max']:.1f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", type=int, default=20, help="models through the chain at once (default 20)"
    )
    parser.add_argument("--peer-model", default="ctr_recommender", help="the single model of the peer run")
    parser.add_argument("--no-peer", action="store_true", help="skip the single-model peer run")
    parser.add_argument("--pg-url", default=os.environ.get("MODELOPS_STACK_PG_URL") or DEFAULT_PG_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="a Redis database nobody else uses")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4, help="Celery worker concurrency")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for champions / a run")
    parser.add_argument("--sample-seconds", type=float, default=2.0)
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"result file (default {DEFAULT_JSON})"
    )
    parser.add_argument(
        "--rescue",
        dest="rescue_lost_approvals",
        action="store_true",
        help="trigger a deployment by hand for an approval still undeployed (manymodels.LostApprovalRescue); "
        "without it the benchmark waits for the deployment DAG's own catch-up",
    )
    parser.add_argument("--keep", action="store_true", help="keep each phase's folder (logs) for inspection")
    parser.add_argument(
        "--from-raw", action="store_true", help="no run: the table and result from the records beside --json"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-models", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the `finally` blocks: a phase tears its stack down


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.child:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = run_phase(args)
        args.json.write_text(json.dumps(record, default=str))
        return 1 if record.get("error") else 0
    from modelops_dev.manymodels import model_names

    header(f"{args.models} models through the chain at once on the Celery stack (make stack)")
    load_before = list(os.getloadavg())
    models = model_names(args.models)
    print(
        f"# {args.workers} Celery workers x concurrency {args.concurrency}; PostgreSQL "
        f"{args.pg_url.split('@')[-1]}, Redis {args.redis_url}; models: {', '.join(models)}",
        flush=True,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    phases = ([] if args.no_peer else [("peer", [args.peer_model])]) + [("many", models)]
    raws: dict[str, dict[str, Any]] = {}
    for label, names in phases:
        if args.from_raw:
            raws[label] = json.loads(raw_path(args.json, label).read_text())
        else:
            raws[label] = run_child(args, label, names)
    if args.from_raw:  # the load the records were taken under, not the load now
        load_before = next(iter(raws.values()))["load_before"]
    results = {label: summarise(raw) for label, raw in raws.items()}
    many = results["many"]
    summary: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": len(os.sched_getaffinity(0)),
        "load_before": load_before,
        "models": len(many["models"]),
        "phases": results,
    }
    if "peer" in results:
        peer = results["peer"]
        summary["ratio"] = {
            key: (
                round(many["wall"][key] / peer["wall"][key], 2)
                if many["wall"].get(key) and peer["wall"].get(key)
                else None
            )
            for key in ("last_champion_s", "chain_s")
        }
    print()
    for line in table(results):
        print(line)
    count = len(many["models"])
    if "ratio" in summary:
        ratio = summary["ratio"]
        print(
            f"\n{count} models vs one: last champion x{_f(ratio['last_champion_s'], '.2f')}, whole chain "
            f"x{_f(ratio['chain_s'], '.2f')}"
        )
    print(f"\nwhere it saturates ({count} models, load average {many['load_at_drops'][0]:.2f} at the drops):")
    for finding in many["saturation"]:
        print(f"  - {finding}")
    print(
        "\ntimeline (many): t s, load, CPU busy, running/queued/scheduled/awaiting input, broker, queued runs"
    )
    for point in many["timeline"]:
        runs = ", ".join(f"{d.removeprefix('modelops_')} {n}" for d, n in point["queued_runs"].items())
        print(
            f"  {point['t']:>6.0f}  {point['load1']:5.2f}  {point['cpu_busy']:4.0%}  {point['running']:>2}/"
            f"{point['queued']:>2}/{point['scheduled']:>2}/{point['awaiting_input']:>2}  {point['broker']:>2}  {runs}"
        )
    args.json.write_text(json.dumps(summary, indent=2, default=str))
    for label, result in results.items():
        for found in result.get("rescues") or []:
            print(
                f"NOTE ({label}): Airflow started no deployment for the approved {found['model']} "
                f"v{found['version']}; triggered by hand ({found['run_id']}) {found['t']:.0f} s into the chain"
            )
    print(f"\nresult file: {args.json} (each phase's record: {raw_path(args.json, '<phase>')})")
    failed = {label: r["error"] for label, r in results.items() if r.get("error")}
    for label, error in failed.items():
        print(f"phase {label} FAILED: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
