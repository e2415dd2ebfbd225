"""Supervision of the local stack: a service that exits without being asked to is started again.

``make demo`` returns while its services keep running, so the supervisor is a detached process of its
own: one per run folder, ``python -m modelops_dev supervise``, started by the first supervised
:func:`modelops_dev.processes.start` (pid file ``.demo/run/supervisor.pid``, log
``.demo/logs/supervisor.log``). It is the parent of every supervised service, so it learns each exit
code or signal. An exit nobody asked for is logged to the service's own log and the service is started
again after its :class:`~modelops_dev.processes.RestartPolicy`'s back-off (1, 2, 4 ... s, at most 30 s);
the ``max_restarts``-th restart within ``window`` seconds is the last: the next exit leaves the service
failed, which ``make status`` shows. What a crashed service's leader left behind in its session (workers,
task runners) is stopped before the new one starts, so nothing holds its port.

The client side talks to it through files in ``.demo/run/supervisor/``, under a ``flock``:

- ``<name>.service.json`` (owner-only: it holds the environment): what to run; written by ``start``,
  removed by ``release``, the deliberate stop. A new generation of it is a new service.
- ``<name>.state.json``: what the supervisor did (state, pid, restarts, last exit); removed when the
  supervisor lets the service go, which is what ``release`` waits for before anyone signals it.

Stopping the supervisor (SIGTERM) leaves every service running, unsupervised: ``make down`` stops it
first (a pid file that is not a service's), so nothing is restarted while the stack goes down. It also
exits by itself once no service is left to supervise. A supervisor started while services run (the
previous one was killed) adopts them from their state files.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelops.errors import ConfigurationError, ModelOpsError
from modelops_dev import processes
from modelops_dev.processes import RestartPolicy, Service

SUPERVISOR = "supervisor"
"""The supervisor's name: ``<run>/supervisor.pid``, ``<logs>/supervisor.log``."""
TICK_SECONDS = 0.1
START_TIMEOUT_SECONDS = 30.0
RELEASE_TIMEOUT_SECONDS = 10.0
CLEANUP_GRACE_SECONDS = 5.0
"""How long a crashed leader's leftovers get between SIGTERM and SIGKILL."""
RESTART_HEALTH_TIMEOUT_SECONDS = 180.0
DEV_ROOT = Path(__file__).resolve().parents[1]

RUNNING, BACKOFF, FAILED = "running", "backoff", "failed"


# --- files -----------------------------------------------------------------------------------------


def state_dir(run_dir: Path) -> Path:
    return run_dir / SUPERVISOR


def spec_path(name: str, run_dir: Path) -> Path:
    return state_dir(run_dir) / f"{name}.service.json"


def state_path(name: str, run_dir: Path) -> Path:
    return state_dir(run_dir) / f"{name}.state.json"


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    folder = state_dir(run_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with (folder / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Owner-only, in one step (a reader never sees half a file)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1)
    partial.replace(path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def service_to_json(service: Service) -> dict[str, Any]:
    return {
        "name": service.name,
        "argv": list(service.argv),
        "env": dict(service.env),
        "health_url": service.health_url,
        "log_file": str(service.log_file),
        "port": service.port,
        "port_env": service.port_env,
        "any_http_answer_is_up": service.any_http_answer_is_up,
        "cwd": str(service.cwd) if service.cwd is not None else None,
        "url": service.url,
        "restart": asdict(service.restart or RestartPolicy()),
    }


def service_from_json(data: Mapping[str, Any]) -> Service:
    return Service(
        name=data["name"],
        argv=list(data["argv"]),
        env=dict(data["env"]),
        health_url=data.get("health_url"),
        log_file=Path(data["log_file"]),
        port=data.get("port"),
        port_env=data.get("port_env"),
        any_http_answer_is_up=bool(data.get("any_http_answer_is_up")),
        cwd=Path(data["cwd"]) if data.get("cwd") else None,
        url=data.get("url"),
        restart=RestartPolicy(**data.get("restart", {})),
    )


def recorded_service(name: str, run_dir: Path) -> Service | None:
    """The service the supervisor was last asked to run under ``name``, as it was started."""
    data = _read_json(spec_path(name, run_dir))
    return service_from_json(data["service"]) if data else None


def recorded_names(run_dir: Path) -> list[str]:
    folder = state_dir(run_dir)
    return sorted(p.name.removesuffix(".service.json") for p in folder.glob("*.service.json"))


def supervisor_pid(run_dir: Path) -> int | None:
    """The supervisor's pid, if it runs."""
    pid = processes.read_pid(SUPERVISOR, run_dir)
    return pid if pid is not None and processes.session_members(pid) else None


def _alive(pid: int) -> bool:
    return not processes._leader_exited(pid)


# --- the client side: start, release -------------------------------------------------------------


def _spawn_supervisor(run_dir: Path, log_dir: Path) -> int:
    env = dict(os.environ)
    python_path = [str(DEV_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(python_path))
    log_dir.mkdir(parents=True, exist_ok=True)
    processes.log_line(log_dir / f"{SUPERVISOR}.log", f"start {SUPERVISOR} for {run_dir}")
    with (log_dir / f"{SUPERVISOR}.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "modelops_dev", "supervise", "--run-dir", str(run_dir)],
            env=env,
            cwd=run_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not in the terminal's session: it outlives `make demo`
        )
    processes._children[process.pid] = process  # reaped here if it exits while this process runs
    processes.write_pid(processes.pid_file(SUPERVISOR, run_dir), process.pid)
    return process.pid


def start(service: Service, run_dir: Path) -> int:
    """Hand ``service`` to the supervisor (started if it is not running); return its pid once started."""
    generation = uuid.uuid4().hex
    with _locked(run_dir):
        _write_json(
            spec_path(service.name, run_dir),
            {"generation": generation, "service": service_to_json(service)},
        )
        daemon = supervisor_pid(run_dir)
        if daemon is None:
            # Under the lock: a supervisor that found nothing to do has removed its pid file by now.
            daemon = _spawn_supervisor(run_dir, service.log_file.parent)
    log = service.log_file.parent / f"{SUPERVISOR}.log"
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        state = _read_json(state_path(service.name, run_dir))
        if state and state.get("generation") == generation:
            if state.get("state") == FAILED:  # it cannot run: not started, so nothing to supervise
                release(service.name, run_dir)
                raise ConfigurationError(f"{service.name}: {state.get('last_exit')}")
            if state.get("pid"):
                return int(state["pid"])
        if not _alive(daemon) or time.monotonic() > deadline:
            with _locked(run_dir):
                spec_path(service.name, run_dir).unlink(missing_ok=True)
            what = (
                "exited" if not _alive(daemon) else f"did not start it within {START_TIMEOUT_SECONDS:.0f} s"
            )
            raise ConfigurationError(
                f"{service.name}: the supervisor (pid {daemon}) {what}; last lines of {log}:\n"
                f"{processes.log_tail(log)}"
            )
        time.sleep(0.05)


def release(name: str, run_dir: Path, timeout: float = RELEASE_TIMEOUT_SECONDS) -> bool:
    """The deliberate stop's first step: the supervisor lets ``name`` go (it will not restart it).

    Returns whether the supervisor was supervising it. The process itself keeps running: the caller
    stops it (:func:`modelops_dev.processes.stop`)."""
    if not state_dir(run_dir).is_dir():
        return False
    with _locked(run_dir):
        spec = _read_json(spec_path(name, run_dir))
        if spec:
            processes.log_line(
                Path(spec["service"]["log_file"]), f"stop {name}: on purpose, so the supervisor lets it go"
            )
        had_spec = spec is not None
        spec_path(name, run_dir).unlink(missing_ok=True)
        state = state_path(name, run_dir)
        if not state.exists():
            return had_spec
    deadline = time.monotonic() + timeout
    while state.exists():
        if supervisor_pid(run_dir) is None or time.monotonic() > deadline:
            # Nobody left to let it go (or it does not answer): nothing will restart it either.
            state.unlink(missing_ok=True)
            break
        time.sleep(0.02)
    return True


# --- the supervisor --------------------------------------------------------------------------------


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "status unknown: started by an earlier supervisor"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class _Watched:
    """One supervised service in the supervisor."""

    service: Service
    generation: str
    policy: RestartPolicy
    process: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    started: float = 0.0
    state: str = RUNNING
    restarts: int = 0
    recent: list[float] = field(default_factory=list)  # monotonic times of the restarts in the window
    restart_at: float | None = None  # monotonic
    restart_at_wall: str | None = None
    last_exit: str | None = None
    last_exit_at: str | None = None
    leftover: tuple[int, float] | None = None  # (old session, when to SIGKILL what is left of it)

    def as_state(self) -> dict[str, Any]:
        return {
            "name": self.service.name,
            "generation": self.generation,
            "state": self.state,
            "pid": self.pid if self.state == RUNNING else None,
            "restarts": self.restarts,
            "recent_restarts": len(self.recent),
            "last_exit": self.last_exit,
            "last_exit_at": self.last_exit_at,
            "restart_at": self.restart_at_wall if self.state == BACKOFF else None,
            "supervisor_pid": os.getpid(),
            "policy": asdict(self.policy),
        }


class Supervisor:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.watched: dict[str, _Watched] = {}
        self.released: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        # name -> ((inode, mtime_ns, size) of its file, generation, service)
        self._specs: dict[str, tuple[tuple[int, int, int], str, Service]] = {}

    def _wanted(self) -> dict[str, tuple[str, Service]]:
        """Every service asked for: name -> (generation, service); files re-read only when changed."""
        wanted = {}
        for name in recorded_names(self.run_dir):
            try:
                found = spec_path(name, self.run_dir).stat()
            except FileNotFoundError:
                continue
            version = (found.st_ino, found.st_mtime_ns, found.st_size)
            cached = self._specs.get(name)
            if cached is None or cached[0] != version:
                data = _read_json(spec_path(name, self.run_dir))
                if not data:
                    continue
                cached = (version, data["generation"], service_from_json(data["service"]))
                self._specs[name] = cached
            wanted[name] = (cached[1], cached[2])
        self._specs = {name: self._specs[name] for name in wanted}
        return wanted

    def say(self, message: str) -> None:
        print(f"=== {_now()} {message}", flush=True)

    def _save(self, watched: _Watched) -> None:
        _write_json(state_path(watched.service.name, self.run_dir), watched.as_state())

    def _launch(self, watched: _Watched, note: str = "") -> None:
        service = watched.service
        try:
            watched.process = processes.launch(service, self.run_dir, note)
        except ConfigurationError as exc:
            # A command that cannot run does not get better by waiting: failed at once.
            watched.process, watched.pid, watched.started = None, None, 0.0
            reason = str(exc).removeprefix(f"{service.name}: ")
            watched.state, watched.last_exit, watched.last_exit_at = FAILED, reason, _now()
            processes.log_line(service.log_file, f"supervisor: {exc}; giving up")
            self.say(str(exc))
            return
        watched.pid = watched.process.pid
        watched.started = time.monotonic()
        watched.state, watched.restart_at, watched.restart_at_wall = RUNNING, None, None
        self.say(f"{service.name} started (pid {watched.pid}){note}")

    def _exited(self, watched: _Watched, how: str) -> None:
        """``watched`` exited unasked: schedule its restart, or give up."""
        service, policy, now = watched.service, watched.policy, time.monotonic()
        ran = f" after {now - watched.started:.1f} s" if watched.started else ""
        watched.last_exit, watched.last_exit_at = how, _now()
        if watched.pid is not None:
            left = processes.session_members(watched.pid)
            if left:  # workers, task runners: they may hold the port the next one binds
                processes._signal_group(watched.pid, signal.SIGTERM)
                processes._signal_each(left, signal.SIGTERM)
                watched.leftover = (watched.pid, now + CLEANUP_GRACE_SECONDS)
        watched.process = None
        watched.recent = [t for t in watched.recent if now - t < policy.window]
        if len(watched.recent) >= policy.max_restarts:
            watched.state = FAILED
            message = (
                f"supervisor: {service.name} (pid {watched.pid}) exited unexpectedly ({how}){ran}; "
                f"{len(watched.recent)} restarts within {policy.window:.0f} s already: giving up, it stays "
                f"stopped (`make restart SERVICE={service.name}` starts it again)"
            )
        else:
            delay = policy.delay(len(watched.recent))
            watched.recent.append(now)
            watched.state, watched.restart_at = BACKOFF, now + delay
            watched.restart_at_wall = datetime.fromtimestamp(time.time() + delay, UTC).isoformat(
                timespec="seconds"
            )
            message = (
                f"supervisor: {service.name} (pid {watched.pid}) exited unexpectedly ({how}){ran}; "
                f"restarting in {delay:.1f} s (restart {len(watched.recent)} of at most "
                f"{policy.max_restarts} within {policy.window:.0f} s)"
            )
        processes.log_line(service.log_file, message)
        self.say(message.removeprefix("supervisor: "))

    def _clean_leftover(self, watched: _Watched) -> bool:
        """True once nothing of the crashed leader's session is left (SIGKILL after the grace)."""
        if watched.leftover is None:
            return True
        session, kill_at = watched.leftover
        left = processes.session_members(session)
        if left and time.monotonic() >= kill_at + CLEANUP_GRACE_SECONDS:
            self.say(f"{watched.service.name}: processes {left} of the old session outlived SIGKILL")
            left = []
        if not left:
            watched.leftover = None
            return True
        if time.monotonic() >= kill_at:
            processes._signal_group(session, signal.SIGKILL)
            processes._signal_each(left, signal.SIGKILL)
        return False

    def _adopt_or_start(self, name: str, generation: str, service: Service) -> _Watched:
        watched = _Watched(service, generation, service.restart or RestartPolicy())
        previous = _read_json(state_path(name, self.run_dir))
        if previous and previous.get("generation") == generation:
            # An earlier supervisor's service (that one was stopped or killed): carry its record on.
            watched.restarts = int(previous.get("restarts") or 0)
            watched.last_exit, watched.last_exit_at = previous.get("last_exit"), previous.get("last_exit_at")
            if previous.get("state") == FAILED:
                watched.state = FAILED
                return watched
            pid = previous.get("pid") or processes.read_pid(name, self.run_dir)
            if pid and _alive(int(pid)):
                watched.pid, watched.started = int(pid), time.monotonic()
                self.say(f"{name} adopted (pid {pid})")
                return watched
            if pid:
                watched.pid = int(pid)
                self._exited(watched, "found gone while nobody supervised it")
                return watched
        self._launch(watched)
        return watched

    def tick(self) -> bool:
        """One round; False when there is nothing left to supervise."""
        with _locked(self.run_dir):
            wanted = self._wanted()
            for name, watched in list(self.watched.items()):
                if name not in wanted or wanted[name][0] != watched.generation:
                    # Released: a deliberate stop follows; that exit is not a crash.
                    if watched.process is not None:
                        self.released.append(watched.process)
                    state_path(name, self.run_dir).unlink(missing_ok=True)
                    del self.watched[name]
                    self.say(f"{name} released (pid {watched.pid}): stopped on purpose, not restarted")
            for name, (generation, service) in wanted.items():
                if name not in self.watched:
                    self.watched[name] = self._adopt_or_start(name, generation, service)
                    self._save(self.watched[name])
            for watched in self.watched.values():
                before = watched.as_state()
                self._check(watched)
                if watched.as_state() != before:
                    self._save(watched)
            if not wanted and not self.watched:
                # Under the lock: a start() after this sees no supervisor and starts a new one.
                self._remove_pid_file()
                return False
        self.released = [p for p in self.released if p.poll() is None]
        return True

    def _check(self, watched: _Watched) -> None:
        if watched.state == RUNNING and watched.pid is not None:
            if watched.process is not None:
                returncode = watched.process.poll()
                if returncode is not None:
                    self._exited(watched, _describe_exit(returncode))
            elif not _alive(watched.pid):
                self._exited(watched, _describe_exit(None))
        if not self._clean_leftover(watched):
            return
        if (
            watched.state == BACKOFF
            and watched.restart_at is not None
            and time.monotonic() >= watched.restart_at
        ):
            watched.restarts += 1
            self._launch(watched, f" (restart {watched.restarts} by the supervisor)")

    def _remove_pid_file(self) -> None:
        if processes.read_pid(SUPERVISOR, self.run_dir) == os.getpid():
            processes.pid_file(SUPERVISOR, self.run_dir).unlink(missing_ok=True)

    def run(self) -> int:
        def stop(signum: int, _frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        current = processes.read_pid(SUPERVISOR, self.run_dir)
        if current is not None and current != os.getpid() and processes.session_members(current):
            self.say(f"another supervisor (pid {current}) runs for {self.run_dir}; exiting")
            return 1
        processes.write_pid(processes.pid_file(SUPERVISOR, self.run_dir), os.getpid())
        self.say(f"supervising {self.run_dir} (pid {os.getpid()})")
        while not self.stopping:
            if not self.tick():
                self.say("nothing left to supervise; exiting")
                return 0
            time.sleep(TICK_SECONDS)
        # Stopped: every service keeps running, unsupervised (`make down` stops them next). Only what a
        # crashed leader left behind goes, as nobody else knows of it.
        for watched in self.watched.values():
            if watched.leftover is not None:
                processes._signal_each(processes.session_members(watched.leftover[0]), signal.SIGKILL)
        running = [name for name, w in self.watched.items() if w.state == RUNNING]
        self.say(f"stopped; unsupervised now: {', '.join(running) or 'nothing'}")
        self._remove_pid_file()
        return 0


# --- status and restart --------------------------------------------------------------------------


def status_lines(run_dir: Path, order: Sequence[str] = ()) -> list[str]:
    """What ``make status`` adds: the supervisor, and each supervised service's state and restarts."""
    names = recorded_names(run_dir) if state_dir(run_dir).is_dir() else []
    daemon = supervisor_pid(run_dir)
    if not names and daemon is None:
        return []
    names = [n for n in order if n in names] + [n for n in names if n not in order]
    states = {name: _read_json(state_path(name, run_dir)) or {} for name in names}
    if daemon is not None:
        policies = [RestartPolicy(**state["policy"]) for state in states.values() if state.get("policy")]
        policy = policies[0] if policies else RestartPolicy()
        head = (
            f"  supervisor pid {daemon}: a service that exits unasked restarts after {policy.delay(0):g}, "
            f"{policy.delay(1):g}, {policy.delay(2):g} ... {policy.max_delay:g} s, given up after "
            f"{policy.max_restarts} restarts within {policy.window:g} s"
        )
    else:
        head = (
            "  supervisor not running: a service that exits stays stopped "
            "(`make restart SERVICE=<name>` restarts one under a new supervisor)"
        )
    lines = [head]
    for name in names:
        state = states[name]
        restarts = int(state.get("restarts") or 0)
        count = f"{restarts} restart{'s' if restarts != 1 else ''}"
        last = (
            f"; last exit {state['last_exit']} at {state['last_exit_at']}" if state.get("last_exit") else ""
        )
        what = state.get("state")
        if daemon is None or not what:
            text = f"unsupervised, {count}{last}"
        elif what == RUNNING:
            text = f"running (pid {state.get('pid')}), {count}{last}"
        elif what == BACKOFF:
            text = f"restarting at {state.get('restart_at')}, {count}{last}"
        else:
            text = (
                f"FAILED: gave up after {state.get('recent_restarts')} restarts within "
                f"{state.get('policy', {}).get('window', 0):g} s{last}; `make restart SERVICE={name}`"
            )
        lines.append(f"  {name:<28} {text}")
    return lines


def resolve_name(name: str, known: Sequence[str]) -> str:
    """``gateway``, ``airflow-scheduler``, or ``scheduler`` for ``airflow-scheduler``."""
    if name in known:
        return name
    if f"airflow-{name}" in known:
        return f"airflow-{name}"
    raise ConfigurationError(
        f"no service {name!r} to restart; the supervised ones are: {', '.join(known) or 'none'} "
        "(is the stack running? start it with `make demo`)"
    )


def restart(name: str, run_dir: Path, health_timeout: float = RESTART_HEALTH_TIMEOUT_SECONDS) -> int:
    """Stop one service on purpose and start it again as it was started; return its new pid."""
    name = resolve_name(name, recorded_names(run_dir) if state_dir(run_dir).is_dir() else [])
    service = recorded_service(name, run_dir)
    if service is None:  # released meanwhile
        raise ConfigurationError(f"{name} is not supervised any more (stopped meanwhile?)")
    outcome = processes.stop(name, run_dir)
    print(f"stopped {name} ({outcome})", flush=True)
    pid = processes.start(service, run_dir)
    seconds = processes.wait_healthy(service, health_timeout, run_dir, poll_seconds=0.2)
    print(f"{name} up again (pid {pid}) after {seconds:.1f} s", flush=True)
    return pid


COMMANDS = ("supervise", "restart")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modelops_dev", description="supervision of the local stack"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    supervise = commands.add_parser("supervise", help="run the supervisor (started by `make demo`)")
    supervise.add_argument("--run-dir", type=Path, default=None)
    again = commands.add_parser("restart", help="stop one service and start it again")
    again.add_argument("service", help="a service name, as `make status` shows it (gateway, mlflow, ...)")
    args = parser.parse_args(list(argv))
    run_dir = args.run_dir if args.command == "supervise" and args.run_dir else processes.default_run_dir()
    if args.command == "supervise":
        return Supervisor(run_dir).run()
    try:
        restart(args.service, run_dir)
    except ModelOpsError as exc:
        print(f"restart: {exc}", file=sys.stderr)
        return 1
    return 0
