"""The local stack's supervisor (modelops_dev.supervision) with real short-lived processes."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelops.errors import ConfigurationError
from modelops.settings import PROJECT_ROOT
from modelops_dev import __main__ as cli
from modelops_dev import processes, stack, supervision
from modelops_dev.processes import RestartPolicy, Service

FAST = RestartPolicy(initial_delay=0.2, max_delay=0.4, max_restarts=3, window=30)

# A parent that starts a sleeping grandchild (a worker) and sleeps: the grandchild's pid goes to argv[1].
_PARENT = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "open(sys.argv[1] + '.tmp', 'w').write(str(child.pid))\n"
    "import os; os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "time.sleep(60)\n"
)
_SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _wait(condition: Callable[[], object], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.05)


def _service(logs: Path, name: str, argv: list[str]) -> Service:
    return Service(
        name=name,
        argv=argv,
        env=dict(os.environ),
        health_url=None,
        log_file=logs / f"{name}.log",
        restart=FAST,
    )


def _state(name: str, run_dir: Path) -> dict:
    return supervision._read_json(supervision.state_path(name, run_dir)) or {}


def _grandchild(path: Path, not_this: int | None = None) -> int:
    _wait(lambda: path.exists() and path.read_text() and int(path.read_text()) != not_this, what="grandchild")
    return int(path.read_text())


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    run = tmp_path / "run"
    yield run
    # Whatever a failed assertion left: no test leaves a process behind.
    for name in supervision.recorded_names(run) if supervision.state_dir(run).is_dir() else []:
        processes.stop(name, run, grace_seconds=2)
    processes.stop(supervision.SUPERVISOR, run, grace_seconds=2)
    for state in processes.status(run):
        processes.stop(state.name, run, grace_seconds=2)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_killed_service_is_restarted_and_a_deliberate_stop_is_not(tmp_path: Path, run_dir: Path) -> None:
    worker_file = tmp_path / "worker.pid"
    service = _service(tmp_path / "logs", "web", [sys.executable, "-c", _PARENT, str(worker_file)])
    first = processes.start(service, run_dir)
    daemon = supervision.supervisor_pid(run_dir)
    assert daemon is not None and daemon != first
    assert os.getsid(daemon) == daemon and os.getsid(first) == first  # detached, each in its own session
    worker = _grandchild(worker_file)

    os.kill(first, signal.SIGKILL)
    _wait(lambda: processes.read_pid("web", run_dir) not in (None, first), what="a new pid")
    second = processes.read_pid("web", run_dir)
    assert second is not None and _alive(second)
    # The crashed leader's worker was stopped before the new leader started (it could hold the port).
    assert not _alive(worker)
    _grandchild(worker_file, not_this=worker)
    log = service.log_file.read_text()
    assert f"web (pid {first}) exited unexpectedly (killed by SIGKILL)" in log
    assert "restarting in 0.2 s (restart 1 of at most 3 within 30 s)" in log
    assert "start web (restart 1 by the supervisor)" in log
    _wait(lambda: _state("web", run_dir).get("pid") == second)
    assert _state("web", run_dir)["restarts"] == 1
    (line,) = [line for line in supervision.status_lines(run_dir) if line.strip().startswith("web")]
    assert f"running (pid {second}), 1 restart; last exit killed by SIGKILL" in line

    # Stopped on purpose: not restarted, and the supervisor, with nothing left, exits by itself.
    assert processes.stop("web", run_dir, grace_seconds=5) == "stopped"
    time.sleep(FAST.max_delay + 0.5)
    assert processes.read_pid("web", run_dir) is None and not _alive(second)
    assert service.log_file.read_text().count("start web") == 2
    _wait(lambda: not _alive(daemon), what="the supervisor to exit")
    assert supervision.supervisor_pid(run_dir) is None
    assert supervision.recorded_names(run_dir) == []


def test_a_crash_loop_is_given_up_and_reported_as_failed(tmp_path: Path, run_dir: Path) -> None:
    code = "import sys, time; print('boom: bad config', flush=True); time.sleep(0.1); sys.exit(3)"
    service = _service(tmp_path / "logs", "crasher", [sys.executable, "-c", code])
    processes.start(service, run_dir)
    _wait(lambda: _state("crasher", run_dir).get("state") == supervision.FAILED, what="failed")
    state = _state("crasher", run_dir)
    assert (state["restarts"], state["last_exit"], state["pid"]) == (3, "exit code 3", None)
    log = service.log_file.read_text()
    assert log.splitlines().count("boom: bad config") == 4  # the first start and three restarts
    assert "3 restarts within 30 s already: giving up" in log
    assert "`make restart SERVICE=crasher` starts it again" in log
    lines = supervision.status_lines(run_dir)
    assert lines[0].startswith("  supervisor pid ") and "given up after 3 restarts within 30 s" in lines[0]
    assert "crasher" in lines[1] and "FAILED: gave up after 3 restarts within 30 s" in lines[1]
    assert "last exit exit code 3" in lines[1] and "`make restart SERVICE=crasher`" in lines[1]
    assert processes.running_services(run_dir) == [supervision.SUPERVISOR]

    assert processes.stop("crasher", run_dir) == "stale"
    _wait(lambda: supervision.supervisor_pid(run_dir) is None, what="the supervisor to exit")


def test_a_command_that_cannot_run_fails_at_once(tmp_path: Path, run_dir: Path) -> None:
    service = _service(tmp_path / "logs", "nothing", [str(tmp_path / "no-such-program")])
    with pytest.raises(ConfigurationError, match=r"^nothing: cannot run '.*no-such-program'"):
        processes.start(service, run_dir)
    assert supervision.recorded_names(run_dir) == []  # nothing left for `make status` or a new supervisor
    assert processes.stop("nothing", run_dir) == "not_running"


@pytest.fixture
def demo_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / ".demo"
    monkeypatch.setenv("MODELOPS_DEMO_DIR", str(folder))
    for name, _ in stack.PORT_VARIABLES.values():
        monkeypatch.delenv(name, raising=False)
    yield folder
    from modelops_dev import driver

    driver.down(quiet=True)  # a no-op unless an assertion failed


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_status_restart_and_down_as_make_runs_them(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, logs = demo_dir / "run", demo_dir / "logs"
    worker_files = {name: tmp_path / f"{name}.worker" for name in ("mlflow", "gateway")}
    stack_services = [
        _service(logs, name, [sys.executable, "-c", _PARENT, str(path)])
        for name, path in worker_files.items()
    ]
    processes.start_all(stack_services, run_dir, print, 10)
    workers = {name: _grandchild(path) for name, path in worker_files.items()}
    capsys.readouterr()

    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    gateway = processes.read_pid("gateway", run_dir)
    assert f"  gateway                      pid {gateway}, 2 processes" in out  # the driver's table
    assert "  supervisor pid " in out
    assert f"  gateway                      running (pid {gateway}), 0 restarts" in out

    # `make restart SERVICE=gateway`: stopped on purpose (no restart counted), started again.
    assert cli.main(["restart", "gateway"]) == 0
    out = capsys.readouterr().out
    new_gateway = processes.read_pid("gateway", run_dir)
    assert new_gateway not in (None, gateway) and not _alive(gateway) and not _alive(workers["gateway"])
    assert out.splitlines() == [
        "stopped gateway (stopped)",
        f"gateway up again (pid {new_gateway}) after 0.0 s",
    ]
    assert "exited unexpectedly" not in (logs / "gateway.log").read_text()
    workers["gateway"] = _grandchild(worker_files["gateway"], not_this=workers["gateway"])
    assert cli.main(["restart", "airflow-nothing"]) == 1
    assert "no service 'airflow-nothing' to restart; the supervised ones are: gateway, mlflow" in (
        capsys.readouterr().err
    )

    # `make down`: the supervisor goes first, so the services' exits restart nothing; nothing is left.
    daemon = supervision.supervisor_pid(run_dir)
    members = [
        *processes.session_members(new_gateway),
        *processes.session_members(processes.read_pid("mlflow", run_dir)),
    ]
    assert cli.main(["down"]) == 0
    assert capsys.readouterr().out.splitlines() == ["stopped supervisor", "stopped gateway", "stopped mlflow"]
    assert daemon is not None and not _alive(daemon)
    assert not any(_alive(pid) for pid in [*members, *workers.values()])
    assert sorted(p.name for p in run_dir.iterdir()) == ["supervisor"]
    assert [p.name for p in supervision.state_dir(run_dir).iterdir()] == [".lock"]
    for name in ("mlflow", "gateway"):
        assert "exited unexpectedly" not in (logs / f"{name}.log").read_text()
    assert cli.main(["status"]) == 0
    assert capsys.readouterr().out == "nothing is running (start it with `make demo`)\n"


def test_a_stopped_supervisor_leaves_services_running_and_a_new_one_adopts_them(
    tmp_path: Path, run_dir: Path
) -> None:
    logs = tmp_path / "logs"
    first = processes.start(_service(logs, "one", _SLEEP), run_dir)
    daemon = supervision.supervisor_pid(run_dir)
    assert processes.stop(supervision.SUPERVISOR, run_dir) == "stopped"
    assert daemon is not None and not _alive(daemon) and _alive(first)
    assert "supervisor not running" in supervision.status_lines(run_dir)[0]

    # The next start brings a new supervisor, which takes "one" over as it is.
    processes.start(_service(logs, "two", _SLEEP), run_dir)
    assert supervision.supervisor_pid(run_dir) not in (None, daemon)
    _wait(lambda: "one adopted" in (logs / "supervisor.log").read_text(), what="adoption")
    os.kill(first, signal.SIGKILL)
    _wait(lambda: processes.read_pid("one", run_dir) not in (None, first), what="a restart of one")
    assert (
        f"one (pid {first}) exited unexpectedly (status unknown: started by an earlier supervisor)"
        in (logs / "one.log").read_text()
    )
    for name in ("one", "two"):
        assert processes.stop(name, run_dir, grace_seconds=5) == "stopped"


def test_every_service_of_the_stack_is_supervised(tmp_path: Path) -> None:
    layout = stack.Layout(tmp_path / ".demo")
    ports = stack.Ports()
    env = stack.stack_env(layout, ports, dict(os.environ))
    found = stack.services(layout, ports, env, {})
    assert [s.name for s in found] == list(stack.SERVICE_NAMES)
    assert all(s.restart == RestartPolicy() for s in found)
    assert [RestartPolicy().delay(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    # What the supervisor records and starts again is the service as it was started.
    for service in found:
        again = supervision.service_from_json(supervision.service_to_json(service))
        assert again == service and again.restart == service.restart


def test_the_makefile_restarts_one_service() -> None:
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert "-m modelops_dev restart $(SERVICE)" in makefile
    assert "restart" in makefile.split(".PHONY:")[1].splitlines()[0]
