"""Many models on the production stack at once (``benchmarks/bench_stack_models.py``, issue 12 part 3).

What the benchmark needs beside the stack and the driver:

- :func:`write_include_dir`: the project's ``include/`` copied, plus copies of the two demo model specs
  under names of their own, so that N models train on the two demo datasets (a drop of a dataset trains
  every model that names it: N models through one chain, not N chains);
- :class:`Sampler`: a thread sampling, every couple of seconds, the machine (``/proc/loadavg``,
  ``/proc/stat``), each stack service's CPU (its whole process tree, ``psutil``), PostgreSQL's and Redis'
  CPU, how many task instances run, wait in the queue or sit in the scheduler (the stack's Airflow
  metadata database, read directly: one cheap query, not an API call per state) and the Celery broker's
  queue depth;
- :func:`latency_stats` (of ``AirflowApi.task_instances_since``, every task instance since the drops): the scheduler latency (``start_date - queued_when``) per DAG and overall;
- :func:`saturation`: the plain statement of where it saturates, from the samples.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from modelops.settings import PROJECT_ROOT

DEMO_SPECS = ("ctr_recommender", "diabetes_progression")
CELERY_QUEUE = "default"  # Airflow's [operators] default_queue: the Redis list Celery tasks wait in
# Task instance states counted by the sampler; "running" is the only one holding a worker slot (deferred
# and awaiting_input tasks wait without one).
SAMPLED_STATES = ("scheduled", "queued", "running", "deferred", "awaiting_input", "up_for_retry")
# The supervisor (modelops_dev.supervision) is the parent of every service: its process tree is the whole
# stack, so it is reported as that total, never beside the services as one more of them.
STACK_GROUP = "whole stack"
SERVER_GROUPS = ("postgres (whole server)", "redis (whole server)", "postgres (stack's databases)")


# --- the include folder ----------------------------------------------------------------------------


def model_names(count: int) -> list[str]:
    """``count`` names: half (rounded up) copies of the click-through model, the rest of the diabetes one.
    The first of each is the demo's own spec (the platform's default model stays a real one)."""
    if count < 1:
        raise ValueError("at least one model")
    per_spec = {DEMO_SPECS[0]: (count + 1) // 2, DEMO_SPECS[1]: count // 2}
    names = []
    for base, many in per_spec.items():
        names += [base if index == 1 else f"{base}_{index:02d}" for index in range(1, many + 1)]
    return names


def write_include_dir(target: Path, models: Sequence[str], source: Path | None = None) -> dict[str, str]:
    """Copy ``include/`` to ``target`` with exactly ``models`` in ``models/`` (copies of the demo specs
    named ``<demo spec>_NN``); returns model -> the demo spec it copies. Each copy keeps its original's team
    (the gateway's keys are per team), dataset, policy and canary settings: first versions go live without
    a canary anyway (no champion to compare with)."""
    source = source or PROJECT_ROOT / "include"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    models_dir = target / "models"
    originals = {name: yaml.safe_load((models_dir / f"{name}.yaml").read_text()) for name in DEMO_SPECS}
    for path in models_dir.glob("*.yaml"):
        path.unlink()
    copies: dict[str, str] = {}
    for name in models:
        base = next((b for b in DEMO_SPECS if name == b or name.startswith(f"{b}_")), None)
        if base is None:
            raise ValueError(f"{name} is no copy of {DEMO_SPECS}")
        spec = dict(originals[base], name=name)
        if name != base:
            spec["description"] = (
                f"{originals[base]['description'].strip()} (copy for the many-models benchmark)"
            )
        (models_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        copies[name] = base
    return copies


# --- sampling ------------------------------------------------------------------------------------


def _cpu_jiffies() -> tuple[int, int, int]:
    """(total, idle incl. iowait, iowait) jiffies of all CPUs since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields[:8]]
    return sum(values), values[3] + values[4], values[4]


def _tree_cpu(root: Any) -> float:
    """CPU seconds of a process and its live descendants, including the children each has reaped: a
    finished task process's CPU is in its parent's children times, so nothing that ran is lost."""
    import psutil

    total = 0.0
    try:
        members = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for proc in members:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def _find_process(name: str, exe_part: str = "") -> Any | None:
    """The oldest process named ``name`` whose parent has another name (a server's main process)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "ppid", "create_time", "cmdline"]):
        try:
            if proc.info["name"] != name:
                continue
            parent = psutil.Process(proc.info["ppid"]) if proc.info["ppid"] else None
            if parent is not None and parent.name() == name:
                continue
            if exe_part and exe_part not in " ".join(proc.info["cmdline"] or []):
                continue
            found.append(proc)
        except psutil.Error:
            continue
    return min(found, key=lambda p: p.info["create_time"]) if found else None


@dataclass
class Sample:
    t: float  # seconds since the sampler started
    load1: float
    cpu_busy: float  # share of all CPUs busy since the previous sample (0..1)
    iowait: float
    cpu_seconds: dict[str, float]  # group -> cumulative CPU seconds
    states: dict[str, int]  # task instance state -> count
    queued_runs: dict[str, int]  # dag_id -> runs waiting (state queued: max_active_runs)
    running_runs: dict[str, int]
    broker_depth: int  # Celery messages waiting in Redis for a worker


class Sampler(threading.Thread):
    """Samples every ``interval`` seconds until :meth:`stop`; :attr:`samples` holds what it saw."""

    def __init__(
        self,
        *,
        run_dir: Path,
        airflow_db_url: str,
        redis_url: str,
        pg_prefix: str,
        interval: float = 2.0,
    ) -> None:
        super().__init__(name="stack-sampler", daemon=True)
        import sqlalchemy as sa

        self.run_dir, self.redis_url, self.interval = run_dir, redis_url, interval
        self.pg_prefix = pg_prefix
        self.engine = sa.create_engine(airflow_db_url, pool_size=1, max_overflow=0, pool_pre_ping=True)
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()  # not _started: threading.Thread's own
        self._last_jiffies = _cpu_jiffies()
        self._postgres = _find_process("postgres")
        self._redis = _find_process("redis-server")
        self._backend_cpu: dict[int, float] = {}  # our PostgreSQL backends: pid -> last CPU seen

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=30)
        self.engine.dispose()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # noqa: BLE001 - a sampling hiccup must not end the benchmark
                if len(self.errors) < 20:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop_event.wait(self.interval)

    def _service_groups(self) -> dict[str, list[int]]:
        """Group -> pids of the stack's services (pid files), workers summed as one group."""
        groups: dict[str, list[int]] = {}
        for path in sorted(self.run_dir.glob("*.pid")):
            name = re.sub(r"^airflow-", "", path.stem)
            name = "workers" if name.startswith("worker-") and "log" not in name else name
            name = STACK_GROUP if name == "supervisor" else name
            try:
                groups.setdefault(name, []).append(int(path.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                continue
        return groups

    def sample(self) -> Sample:
        import psutil
        import sqlalchemy as sa

        total, idle, iowait = _cpu_jiffies()
        last_total, last_idle, last_iowait = self._last_jiffies
        self._last_jiffies = (total, idle, iowait)
        span = max(total - last_total, 1)
        cpu: dict[str, float] = {}
        for group, pids in self._service_groups().items():
            seconds = 0.0
            for pid in pids:
                try:
                    seconds += _tree_cpu(psutil.Process(pid))
                except psutil.Error:
                    continue
            cpu[group] = seconds
        if self._postgres is not None:
            cpu["postgres (whole server)"] = _tree_cpu(self._postgres)
        if self._redis is not None:
            cpu["redis (whole server)"] = _tree_cpu(self._redis)
        states: dict[str, int] = {}
        queued_runs: dict[str, int] = {}
        running_runs: dict[str, int] = {}
        with self.engine.connect() as conn:
            for state, count in conn.execute(
                sa.text("select state, count(*) from task_instance where state = any(:s) group by state"),
                {"s": list(SAMPLED_STATES)},
            ):
                states[str(state)] = int(count)
            for dag_id, state, count in conn.execute(
                sa.text(
                    "select dag_id, state, count(*) from dag_run where state in ('queued', 'running') "
                    "group by dag_id, state"
                )
            ):
                (queued_runs if state == "queued" else running_runs)[str(dag_id)] = int(count)
            backends = [
                int(pid)
                for (pid,) in conn.execute(
                    sa.text("select pid from pg_stat_activity where datname like :p"),
                    {"p": self.pg_prefix.replace("_", r"\_") + r"\_%"},
                )
            ]
        for pid in backends:
            try:
                times = psutil.Process(pid).cpu_times()
                self._backend_cpu[pid] = times.user + times.system
            except psutil.Error:
                continue
        # Backends that ended keep their last reading: a pooled connection's CPU is not lost when it closes.
        cpu["postgres (stack's databases)"] = sum(self._backend_cpu.values())
        return Sample(
            t=time.monotonic() - self._t0,
            load1=os.getloadavg()[0],
            cpu_busy=1 - (idle - last_idle) / span,
            iowait=(iowait - last_iowait) / span,
            cpu_seconds=cpu,
            states=states,
            queued_runs=queued_runs,
            running_runs=running_runs,
            broker_depth=self._broker_depth(),
        )

    def _broker_depth(self) -> int:
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
        try:
            return int(client.llen(CELERY_QUEUE))
        finally:
            client.close()

    def offset(self) -> float:
        """Seconds since the sampler started (the samples' clock)."""
        return time.monotonic() - self._t0


# --- approvals whose deployment Airflow never started ---------------------------------------------


class LostApprovalRescue(threading.Thread):
    """Triggers ``modelops_deployment`` by hand for a model whose version was approved (alias
    ``challenger`` newer than ``champion``) while no deployment run is queued or running, twice in a row.

    Why: Airflow 3.3.2 drops Asset events that arrive while an asset-scheduled DAG is at its
    ``max_active_runs`` (``modelops_deployment``: 1). The queued-event row keeps the first event's time,
    the run created when the DAG has room consumes the events up to that time only, then the row is
    deleted: later approvals of the same Asset start no run (seen with 4 models: two approved versions
    never deployed). Without this the benchmark waits for champions that never come; every rescue is
    recorded (``rescues``) and the figures say so."""

    def __init__(self, api: Any, mlflow: Any, models: Sequence[str], *, interval: float = 15.0) -> None:
        super().__init__(name="lost-approval-rescue", daemon=True)
        self.api, self.mlflow, self.models, self.interval = api, mlflow, list(models), interval
        self.rescues: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._suspects: set[str] = set()
        self._rescued: set[tuple[str, str]] = set()
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=60)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - a failed look must not end the benchmark
                if len(self.errors) < 20:
                    self.errors.append(f"{type(exc).__name__}: {exc}")

    def check(self) -> None:
        from modelops_dev.mlflow_api import is_newer

        pending = [
            run
            for run in self.api.runs_since("modelops_deployment", datetime.fromtimestamp(0).astimezone())
            if run["state"] in ("queued", "running")
        ]
        if pending:
            self._suspects.clear()  # a run may still deploy them: look again once none is left
            return
        for name in self.models:
            facts = self.mlflow.model(name)
            challenger = facts.aliases.get("challenger") if facts else None
            if (
                challenger is None
                or not is_newer(challenger, facts.champion)
                or (name, challenger) in self._rescued
            ):
                self._suspects.discard(name)
                continue
            if name not in self._suspects:
                self._suspects.add(name)  # the second look in a row decides
                continue
            run_id = self.api.trigger("modelops_deployment", {"model": name, "model_version": None})
            self._rescued.add((name, challenger))
            self._suspects.discard(name)
            self.rescues.append(
                {
                    "model": name,
                    "version": challenger,
                    "run_id": run_id,
                    "t": round(time.monotonic() - self._t0, 1),
                }
            )


# --- task instances and their scheduler latency --------------------------------------------------


def _when(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (no interpolation: a p95 of few values is one of them)."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(share * len(ordered) + 0.5) - 1))
    return ordered[index]


@dataclass
class Latency:
    count: int
    p50: float | None
    p95: float | None
    max: float | None
    resumed: int = 0  # instances that came back from a deferral or an approval: start_date is their first

    @classmethod
    def of(cls, values: Sequence[float], resumed: int = 0) -> Latency:
        if not values:
            return cls(0, None, None, None, resumed)
        return cls(len(values), percentile(values, 0.5), percentile(values, 0.95), max(values), resumed)


def latency_stats(instances: Iterable[Mapping[str, Any]]) -> dict[str, Latency]:
    """Scheduler latency ``start_date - queued_when`` per DAG and overall ("all").

    A task resumed after a deferral or an awaited approval keeps its first ``start_date`` while its
    ``queued_when`` is its last queueing (Airflow: "use the original start_date"): its difference is
    negative and says nothing about the queue, so such instances are counted apart, not measured."""
    per_dag: dict[str, list[float]] = {}
    resumed: dict[str, int] = {}
    for ti in instances:
        queued, started = _when(ti.get("queued_when")), _when(ti.get("start_date"))
        if queued is None or started is None:
            continue
        seconds = (started - queued).total_seconds()
        dag = str(ti["dag_id"])
        if seconds < 0:
            resumed[dag] = resumed.get(dag, 0) + 1
            continue
        per_dag.setdefault(dag, []).append(seconds)
    stats = {dag: Latency.of(values, resumed.get(dag, 0)) for dag, values in sorted(per_dag.items())}
    everything = [v for values in per_dag.values() for v in values]
    stats["all"] = Latency.of(everything, sum(resumed.values()))
    return stats


# --- what the samples say ------------------------------------------------------------------------


@dataclass
class Concurrency:
    slots: int
    samples: int
    running_max: int
    running_mean: float
    share_at_slots: float  # of the samples, how many had every worker slot busy
    queued_max: int
    share_queued_waiting: float  # samples with tasks queued while every slot was busy
    broker_depth_max: int
    scheduled_max: int
    queued_runs_max: dict[str, int] = field(default_factory=dict)


def concurrency(samples: Sequence[Sample], slots: int) -> Concurrency:
    if not samples:
        return Concurrency(slots, 0, 0, 0.0, 0.0, 0, 0.0, 0, 0)
    running = [s.states.get("running", 0) for s in samples]
    queued = [s.states.get("queued", 0) for s in samples]
    full = [r >= slots for r in running]
    runs: dict[str, int] = {}
    for s in samples:
        for dag, count in s.queued_runs.items():
            runs[dag] = max(runs.get(dag, 0), count)
    return Concurrency(
        slots=slots,
        samples=len(samples),
        running_max=max(running),
        running_mean=statistics.fmean(running),
        share_at_slots=sum(full) / len(samples),
        queued_max=max(queued),
        share_queued_waiting=sum(1 for f, q in zip(full, queued, strict=True) if f and q > 0) / len(samples),
        broker_depth_max=max(s.broker_depth for s in samples),
        scheduled_max=max(s.states.get("scheduled", 0) for s in samples),
        queued_runs_max=dict(sorted(runs.items())),
    )


@dataclass
class Machine:
    load1_before: float
    load1_max: float
    load1_mean: float
    cpu_busy_mean: float
    cpu_busy_max: float
    share_cpu_saturated: float  # samples with the CPUs >= 90 % busy
    iowait_mean: float
    cores: int
    cpu_seconds: dict[str, float]  # group -> CPU seconds over the window
    cores_used: dict[str, float]  # group -> mean cores over the window
    stack_cores: float | None = None  # the whole stack (services and their tasks) and its databases
    other_cores: float | None = None  # the rest of the busy CPU: other processes on the machine


def machine(samples: Sequence[Sample], load1_before: float) -> Machine:
    cores = len(os.sched_getaffinity(0))
    if len(samples) < 2:
        return Machine(load1_before, 0, 0, 0, 0, 0, 0, cores, {}, {})
    window = samples[-1].t - samples[0].t
    groups = set(samples[0].cpu_seconds) | set(samples[-1].cpu_seconds)
    used = {
        g: max(0.0, samples[-1].cpu_seconds.get(g, 0.0) - samples[0].cpu_seconds.get(g, 0.0)) for g in groups
    }
    for name in list(used):
        if name == "supervisor":  # records taken before the supervisor was named the whole stack
            used[STACK_GROUP] = used.pop(name)
    busy = [s.cpu_busy for s in samples[1:]]
    stack = None
    if STACK_GROUP in used:
        stack = (used[STACK_GROUP] + used.get("postgres (stack's databases)", 0.0)) / window
    return Machine(
        load1_before=load1_before,
        load1_max=max(s.load1 for s in samples),
        load1_mean=statistics.fmean(s.load1 for s in samples),
        cpu_busy_mean=statistics.fmean(busy),
        cpu_busy_max=max(busy),
        share_cpu_saturated=sum(1 for b in busy if b >= 0.9) / len(busy),
        iowait_mean=statistics.fmean(s.iowait for s in samples[1:]),
        cores=cores,
        cpu_seconds=dict(sorted(used.items(), key=lambda item: -item[1])),
        cores_used={g: round(v / window, 2) for g, v in sorted(used.items(), key=lambda item: -item[1])},
        stack_cores=None if stack is None else round(stack, 2),
        other_cores=None if stack is None else round(max(0.0, statistics.fmean(busy) * cores - stack), 2),
    )


def saturation(conc: Concurrency, mach: Machine, latency: Mapping[str, Latency]) -> list[str]:
    """Where the chain saturates, said plainly, from the samples (most binding first)."""
    findings: list[tuple[float, str]] = []
    services = [(g, c) for g, c in mach.cores_used.items() if g != STACK_GROUP and g not in SERVER_GROUPS]
    top = ", ".join(f"{g} {c:.2f}" for g, c in services[:4])
    if mach.stack_cores is not None:
        top = (
            f"this stack {mach.stack_cores:.2f} cores with its databases ({top}), other processes on the "
            f"machine {mach.other_cores:.2f}"
        )
    if mach.share_cpu_saturated >= 0.3:
        findings.append(
            (
                mach.share_cpu_saturated,
                f"CPU-bound: the {mach.cores} cores were >=90 % busy in {mach.share_cpu_saturated:.0%} of the "
                f"samples (mean {mach.cpu_busy_mean:.0%}), load average up to {mach.load1_max:.1f} with up to "
                f"{conc.running_max} of {conc.slots} worker slots running tasks; cores used by: {top}",
            )
        )
    if conc.share_queued_waiting >= 0.1:
        findings.append(
            (
                conc.share_queued_waiting,
                f"worker slots: all {conc.slots} busy with tasks still queued in {conc.share_queued_waiting:.0%} "
                f"of the samples (up to {conc.queued_max} queued, {conc.broker_depth_max} waiting in the broker)",
            )
        )
    for dag, waiting in conc.queued_runs_max.items():
        if waiting >= 1:
            findings.append(
                (
                    0.05 * waiting,
                    f"{dag}: up to {waiting} runs queued behind its max_active_runs (runs serialised)",
                )
            )
    overall = latency.get("all")
    if overall is not None and overall.p95 is not None and overall.p95 > 5:
        findings.append(
            (
                0.01 * overall.p95,
                f"scheduler latency (queued to running) p95 {overall.p95:.1f} s, max {overall.max:.1f} s",
            )
        )
    if not findings:
        findings.append(
            (
                0.0,
                f"not saturated: CPUs {mach.cpu_busy_mean:.0%} busy on average, up to {conc.running_max} of "
                f"{conc.slots} slots used; the chain's wall time is the tasks' own and the Asset hand-offs",
            )
        )
    return [text for _, text in sorted(findings, key=lambda item: -item[0])]


def timeline(samples: Sequence[Sample], every: float = 10.0) -> list[dict[str, Any]]:
    """One row per ``every`` seconds: load, CPU, task states and the broker's depth (for the JSON/table)."""
    rows: list[dict[str, Any]] = []
    next_t = -1.0
    for s in samples:
        if s.t < next_t:
            continue
        next_t = s.t + every
        rows.append(
            {
                "t": round(s.t, 1),
                "load1": round(s.load1, 2),
                "cpu_busy": round(s.cpu_busy, 2),
                **{state: s.states.get(state, 0) for state in SAMPLED_STATES},
                "broker": s.broker_depth,
                "queued_runs": dict(s.queued_runs),
            }
        )
    return rows


def as_data(value: Any) -> Any:
    """Dataclasses (nested) as plain data for the JSON result."""
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, dict):
        return {k: as_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_data(v) for v in value]
    return value
