"""Process groups of the local stack (modelops_dev.processes) with real child processes."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from modelops.errors import ConfigurationError
from modelops_dev import processes
from modelops_dev.processes import Service

# A parent that starts a sleeping grandchild and waits: killing only the parent would orphan it.
_PARENT = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "open(sys.argv[1], 'w').write(str(child.pid))\n"
    "time.sleep(120)\n"
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _service(tmp_path: Path, name: str, argv: list[str], **extra: object) -> Service:
    return Service(
        name=name, argv=argv, env=dict(os.environ), log_file=tmp_path / "logs" / f"{name}.log", **extra
    )  # type: ignore[arg-type]


def test_stop_kills_the_child_and_its_grandchild(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    grandchild_file = tmp_path / "grandchild.pid"
    service = _service(
        tmp_path, "parent", [sys.executable, "-c", _PARENT, str(grandchild_file)], health_url=None
    )
    pid = processes.start(service, run_dir)
    assert (run_dir / "parent.pid").read_text().strip() == str(pid)
    assert os.getpgid(pid) == pid
    deadline = time.monotonic() + 20
    while not grandchild_file.exists() or not grandchild_file.read_text():
        assert time.monotonic() < deadline, processes.log_tail(service.log_file)
        time.sleep(0.05)
    grandchild = int(grandchild_file.read_text())
    assert processes.session_members(pid) == sorted([pid, grandchild])
    assert [(s.name, s.running, s.processes) for s in processes.status(run_dir)] == [("parent", True, 2)]

    with pytest.raises(ConfigurationError, match="already running"):
        processes.start(service, run_dir)

    assert processes.stop("parent", run_dir, grace_seconds=5) == "stopped"
    assert not _alive(pid) and not _alive(grandchild)
    assert not (run_dir / "parent.pid").exists()
    assert processes.stop("parent", run_dir) == "not_running"
    assert processes.status(run_dir) == []


def test_sigterm_ignored_means_sigkill(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ready = tmp_path / "ready"
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open(sys.argv[1], 'w').write('1')\n"
        "time.sleep(120)\n"
    )
    service = _service(tmp_path, "stubborn", [sys.executable, "-c", code, str(ready)], health_url=None)
    pid = processes.start(service, run_dir)
    while not ready.exists():
        time.sleep(0.05)
    assert processes.stop("stubborn", run_dir, grace_seconds=0.5) == "killed"
    assert not _alive(pid)


def test_stale_pid_file_is_removed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # A pid far above pid_max cannot belong to a live process.
    (run_dir / "ghost.pid").write_text("4194000\n")
    assert [(s.name, s.running) for s in processes.status(run_dir)] == [("ghost", False)]
    assert processes.stop("ghost", run_dir) == "stale"
    assert not (run_dir / "ghost.pid").exists()
    (run_dir / "garbled.pid").write_text("not a pid")
    assert processes.stop("garbled", run_dir) == "not_running"


def test_port_in_use_names_port_and_variable(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        service = _service(
            tmp_path,
            "web",
            [sys.executable, "-c", "pass"],
            health_url=None,
            port=port,
            port_env="MODELOPS_WEB_PORT",
        )
        with pytest.raises(ConfigurationError, match=rf"port {port} .*MODELOPS_WEB_PORT"):
            processes.start(service, tmp_path / "run")
    assert not (tmp_path / "run" / "web.pid").exists()
    assert not processes.port_in_use(port)


def test_health_wait_fails_fast_with_the_log_tail(tmp_path: Path) -> None:
    code = "import sys\nfor i in range(100): print(f'line {i}')\nprint('boom: bad config'); sys.exit(3)\n"
    service = _service(
        tmp_path, "crasher", [sys.executable, "-c", code], health_url="http://127.0.0.1:9/health"
    )
    processes.start(service, tmp_path / "run")
    started = time.monotonic()
    with pytest.raises(ConfigurationError) as info:
        processes.wait_healthy(service, timeout=60, run_dir=tmp_path / "run", poll_seconds=0.1)
    assert time.monotonic() - started < 20
    message = str(info.value)
    assert "crasher exited during start-up" in message and "boom: bad config" in message
    assert "line 99" in message and "line 50" not in message  # only the last 40 lines
    assert processes.stop("crasher", tmp_path / "run") == "stale"


def test_health_wait_times_out_with_the_log_tail(tmp_path: Path) -> None:
    code = "import time\nprint('listening nowhere', flush=True)\ntime.sleep(60)\n"
    service = _service(tmp_path, "mute", [sys.executable, "-c", code], health_url="http://127.0.0.1:9/health")
    processes.start(service, tmp_path / "run")
    try:
        with pytest.raises(ConfigurationError, match=r"(?s)did not answer .* within 1 s.*listening nowhere"):
            processes.wait_healthy(service, timeout=1, run_dir=tmp_path / "run", poll_seconds=0.2)
    finally:
        assert processes.stop("mute", tmp_path / "run", grace_seconds=5) == "stopped"


_SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_start_all_checks_every_port_before_starting_anything(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        first = _service(tmp_path, "first", _SLEEP, health_url=None)
        taken = _service(tmp_path, "web", _SLEEP, health_url=None, port=port, port_env="MODELOPS_WEB_PORT")
        with pytest.raises(ConfigurationError, match=rf"port {port} .*MODELOPS_WEB_PORT"):
            processes.start_all([first, taken], run_dir, print, 10)
    assert processes.status(run_dir) == []  # not even the first one started


def test_start_all_waits_for_every_service(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    stack = [_service(tmp_path, name, _SLEEP, health_url=None) for name in ("one", "two")]
    said: list[str] = []
    try:
        timings = processes.start_all(stack, run_dir, said.append, 10)
        assert set(timings) == {"one", "two"}
        assert sorted(said) == sorted(f"{name} up after {timings[name]:.1f} s" for name in ("one", "two"))
        assert processes.running_services(run_dir) == ["one", "two"]
    finally:
        for name in ("one", "two"):
            processes.stop(name, run_dir, grace_seconds=5)
    assert processes.running_services(run_dir) == []


def test_run_to_log_appends_output_and_fails_with_its_tail(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "airflow-db-migrate.log"
    processes.run_to_log([sys.executable, "-c", "print('migrated')"], dict(os.environ), log, "migrate")
    assert "migrated" in log.read_text()
    failing = [sys.executable, "-c", "import sys; print('boom: locked'); sys.exit(3)"]
    with pytest.raises(ConfigurationError, match=r"(?s)airflow db migrate failed \(exit 3\).*boom: locked"):
        processes.run_to_log(failing, dict(os.environ), log, "airflow db migrate")
    assert log.read_text().splitlines() == ["migrated", "boom: locked"]
