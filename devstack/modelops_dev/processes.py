"""Process groups of the local stack behind ``make demo``: start, health, stop, status, ports.

Each service runs in its own session (``start_new_session=True``), so its process group and session id
equal the pid we record. Stopping a service signals that whole group and, after the grace period, every
process left in the session. That matters because servers fork workers and Airflow's task supervisor
moves each task runner into a process group of its own (same session): killing only the parent, as
stopping ``airflow standalone`` does, leaves the scheduler, api-server and task runners behind as
orphans. Pid files live in ``.demo/run/<name>.pid``; a pid file whose processes are gone is stale and
just removed.

A service with a :class:`RestartPolicy` is started by the supervisor (:mod:`modelops_dev.supervision`),
which restarts it when it exits unasked; :func:`stop` tells the supervisor to let it go first.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from modelops.errors import ConfigurationError
from modelops.settings import PROJECT_ROOT

LOG_TAIL_LINES = 40
STOP_GRACE_SECONDS = 15.0

StopOutcome = Literal["stopped", "killed", "stale", "not_running"]

# Popen objects of the services this interpreter started, so their exit status is collected (a zombie
# would otherwise look alive) and so a service that dies during start-up is noticed at once.
_children: dict[int, subprocess.Popen[bytes]] = {}

_HAVE_PROC = Path("/proc/self/stat").exists()


def demo_dir() -> Path:
    """The runtime folder of ``make demo``: ``$MODELOPS_DEMO_DIR``, else ``<project>/.demo``."""
    return Path(os.environ.get("MODELOPS_DEMO_DIR", PROJECT_ROOT / ".demo"))


def default_run_dir() -> Path:
    return demo_dir() / "run"


@dataclass(frozen=True)
class RestartPolicy:
    """How the supervisor restarts a service that exits unasked: after ``initial_delay`` seconds, doubled
    for every restart within the last ``window`` seconds (at most ``max_delay``); once ``max_restarts``
    restarts fall within ``window``, the next exit leaves the service failed."""

    initial_delay: float = 1.0
    max_delay: float = 30.0
    max_restarts: int = 5
    window: float = 60.0

    def delay(self, recent_restarts: int) -> float:
        return min(self.initial_delay * 2**recent_restarts, self.max_delay)


@dataclass(frozen=True)
class Service:
    """One background process of the stack and how to tell it is ready."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    health_url: str | None
    log_file: Path
    port: int | None = None
    port_env: str | None = field(default=None, compare=False)  # the variable that changes the port
    any_http_answer_is_up: bool = False  # e.g. the gateway answers 503 until a champion exists
    cwd: Path | None = None
    url: str | None = None  # what a person opens; shown by `status`
    # Set: the supervisor starts it and restarts it when it exits unasked. None: started directly, once.
    restart: RestartPolicy | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ServiceState:
    name: str
    pid: int
    running: bool
    processes: int


# --- processes -----------------------------------------------------------------------------------


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgid, session id) of ``pid`` from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its closing one.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[3])


def session_members(leader: int) -> list[int]:
    """Live (not zombie) processes of the session ``leader`` started, in any process group.

    Without /proc (macOS) this falls back to the leader's process group.
    """
    _reap(leader)
    if not _HAVE_PROC:
        try:
            os.killpg(leader, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            return [leader]
        return [leader]
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is not None and stat[2] == leader and stat[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return sorted(members)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_each(pids: Sequence[int], signum: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(leader: int, deadline: float, *, group_only: bool = False) -> list[int]:
    """Wait until the session (or only the leader's own process group) is empty; return what is left."""
    while True:
        members = session_members(leader)
        if group_only and _HAVE_PROC:
            members = [pid for pid in members if (_proc_stat(pid) or ("", -1, -1))[1] == leader]
        if not members or time.monotonic() >= deadline:
            return members
        time.sleep(0.1)


def _leader_exited(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is not None
    if _HAVE_PROC:
        stat = _proc_stat(pid)
        return stat is None or stat[0] in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# --- pid files -----------------------------------------------------------------------------------


def pid_file(name: str, run_dir: Path | None = None) -> Path:
    return (run_dir or default_run_dir()) / f"{name}.pid"


def read_pid(name: str, run_dir: Path | None = None) -> int | None:
    path = pid_file(name, run_dir)
    try:
        return int(path.read_text().strip())
    except FileNotFoundError:
        return None
    except ValueError:
        # A torn or hand-edited file: nothing to signal safely.
        path.unlink(missing_ok=True)
        return None


def is_running(name: str, run_dir: Path | None = None) -> bool:
    pid = read_pid(name, run_dir)
    return pid is not None and bool(session_members(pid))


# --- ports ---------------------------------------------------------------------------------------


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on ``host:port`` or the port cannot be bound there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        if probe.connect_ex((host, port)) == 0:
            return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR too, so a port in TIME_WAIT is free for them as well.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def check_port(service: Service) -> None:
    if service.port is None or not port_in_use(service.port):
        return
    change = f"set {service.port_env} to a free port" if service.port_env else "free the port"
    raise ConfigurationError(
        f"{service.name}: port {service.port} is already in use by another program; "
        f"stop that program or {change} (e.g. `{service.port_env or 'PORT'}=... make demo`)"
    )


# --- start / health / stop -----------------------------------------------------------------------


def start(service: Service, run_dir: Path | None = None) -> int:
    """Launch ``service`` as its own session and process group; write its pid file; return the pid."""
    run_dir = run_dir or default_run_dir()
    existing = read_pid(service.name, run_dir)
    if existing is not None:
        if session_members(existing):
            raise ConfigurationError(
                f"{service.name} is already running (pid {existing}); run `make down` first"
            )
        pid_file(service.name, run_dir).unlink(missing_ok=True)
    check_port(service)
    run_dir.mkdir(parents=True, exist_ok=True)
    if service.restart is not None:
        from modelops_dev import supervision  # it builds on this module

        return supervision.start(service, run_dir)
    process = launch(service, run_dir)
    _children[process.pid] = process
    return process.pid


def log_line(log_file: Path, text: str) -> None:
    """Append ``=== <UTC time> <text>`` to a service's log, as a line of its own."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    with log_file.open("ab") as log:
        log.write(f"\n=== {stamp} {text}\n".encode())


def launch(service: Service, run_dir: Path, note: str = "") -> subprocess.Popen[bytes]:
    """Run ``service`` in a session of its own, its output appended to its log; write its pid file."""
    log_line(service.log_file, f"start {service.name}{note}: {' '.join(service.argv)}")
    with service.log_file.open("ab") as log:
        try:
            process = subprocess.Popen(
                list(service.argv),
                env=dict(service.env),
                cwd=service.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise ConfigurationError(f"{service.name}: cannot run {service.argv[0]!r}: {exc}") from exc
    # start_new_session makes the child a session and group leader: pid == pgid == sid.
    write_pid(pid_file(service.name, run_dir), process.pid)
    return process


def write_pid(path: Path, pid: int) -> None:
    """Write a pid file in one step: a reader never sees it half written (and removes it as torn)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(f"{pid}\n")
    partial.replace(path)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 256 * 1024))
            text = handle.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:])


def _answers(url: str, *, any_http_answer: bool) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 200 <= response.status < 300
    except urllib.error.HTTPError as exc:
        exc.close()
        return any_http_answer
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(
    service: Service, timeout: float, run_dir: Path | None = None, poll_seconds: float = 0.5
) -> float:
    """Poll the health URL until it answers; return the seconds waited.

    Fails at once, with the last lines of the service log, if the service's process has exited.
    """
    started = time.monotonic()
    pid = read_pid(service.name, run_dir)
    if pid is None:
        raise ConfigurationError(f"{service.name} was not started (no pid file)")
    while True:
        if _leader_exited(pid):
            raise ConfigurationError(
                f"{service.name} exited during start-up; last {LOG_TAIL_LINES} lines of "
                f"{service.log_file}:\n{log_tail(service.log_file)}"
            )
        if service.health_url is None or _answers(
            service.health_url, any_http_answer=service.any_http_answer_is_up
        ):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise ConfigurationError(
                f"{service.name} did not answer {service.health_url} within {timeout:.0f} s; last "
                f"{LOG_TAIL_LINES} lines of {service.log_file}:\n{log_tail(service.log_file)}"
            )
        time.sleep(poll_seconds)


def stop(name: str, run_dir: Path | None = None, grace_seconds: float = STOP_GRACE_SECONDS) -> StopOutcome:
    """SIGTERM the service's process group, wait up to ``grace_seconds``, then SIGKILL what is left.

    Returns "stopped" (exited on SIGTERM), "killed" (needed SIGKILL), "stale" (pid file of a process
    that was already gone, removed) or "not_running" (no pid file). A supervised service is let go by the
    supervisor first, so this stop is not taken for a crash and restarted.
    """
    from modelops_dev import supervision  # it builds on this module

    supervision.release(name, run_dir or default_run_dir())
    path = pid_file(name, run_dir)
    pid = read_pid(name, run_dir)
    if pid is None:
        return "not_running"
    if not session_members(pid):
        path.unlink(missing_ok=True)
        return "stale"
    deadline = time.monotonic() + grace_seconds
    _signal_group(pid, signal.SIGTERM)
    # Let the group shut down its own children first (the scheduler stops its task runners).
    _wait_gone(pid, deadline, group_only=True)
    leftovers = session_members(pid)
    if leftovers:
        # Members in other process groups (task runners) that outlived the group.
        _signal_each(leftovers, signal.SIGTERM)
        leftovers = _wait_gone(pid, deadline)
    outcome: StopOutcome = "stopped"
    if leftovers:
        outcome = "killed"
        _signal_group(pid, signal.SIGKILL)
        _signal_each(leftovers, signal.SIGKILL)
        leftovers = _wait_gone(pid, time.monotonic() + 5)
        if leftovers:
            raise ConfigurationError(
                f"{name}: processes {leftovers} survived SIGKILL; check them with `ps -o pid,stat,cmd`"
            )
    _reap(pid)
    path.unlink(missing_ok=True)
    return outcome


def status(run_dir: Path | None = None) -> list[ServiceState]:
    """Every service with a pid file, whether it still runs and how many processes it has."""
    run_dir = run_dir or default_run_dir()
    states = []
    for path in sorted(run_dir.glob("*.pid")) if run_dir.is_dir() else []:
        pid = read_pid(path.stem, run_dir)
        if pid is None:
            continue
        members = session_members(pid)
        states.append(ServiceState(name=path.stem, pid=pid, running=bool(members), processes=len(members)))
    return states


def python_command(*args: str) -> list[str]:
    """This interpreter running ``args``: services use the project's venv, whatever PATH says."""
    return [sys.executable, *args]


def running_services(run_dir: Path | None = None) -> list[str]:
    """Names of the services whose pid file points at live processes."""
    return [state.name for state in status(run_dir) if state.running]


def start_all(
    services: Sequence[Service],
    run_dir: Path,
    say: Callable[[str], None],
    health_timeout: float,
) -> dict[str, float]:
    """Start every service, then wait for all in parallel; returns each one's start-up seconds.

    Every port is checked before anything starts, so a taken port stops the start-up at once.
    """
    for service in services:
        check_port(service)
    started_at = time.monotonic()
    for service in services:
        start(service, run_dir)
    timings: dict[str, float] = {}

    def wait(service: Service) -> None:
        wait_healthy(service, health_timeout, run_dir)
        timings[service.name] = time.monotonic() - started_at
        say(f"{service.name} up after {timings[service.name]:.1f} s")

    with ThreadPoolExecutor(max_workers=len(services)) as pool:
        futures = [pool.submit(wait, service) for service in services]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]
    return timings


def run_to_log(argv: Sequence[str], env: Mapping[str, str], log_file: Path, what: str) -> None:
    """Run a one-shot command (e.g. ``airflow db migrate``) with its output appended to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        result = subprocess.run(list(argv), env=dict(env), stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise ConfigurationError(
            f"{what} failed (exit {result.returncode}); last lines of {log_file}:\n{log_tail(log_file)}"
        )
