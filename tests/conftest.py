"""Test-wide set-up: a throw-away AIRFLOW_HOME and MODELOPS_HOME, never the developer's own state."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Airflow reads its home and config when first imported, so this must happen before any test module
# imports airflow. One metadata DB per test session, in a temporary folder.
if "airflow" in sys.modules:
    raise RuntimeError(
        "airflow was imported before tests/conftest.py could point AIRFLOW_HOME at a temporary folder, so "
        "tests would use ~/airflow; look for a pytest option or plugin that imports it (e.g. a warning "
        "filter naming an Airflow class in pyproject.toml)"
    )
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="modelops-tests-"))
os.environ["AIRFLOW_HOME"] = str(_SESSION_DIR / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(PROJECT_ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(PROJECT_ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_SESSION_DIR / 'airflow' / 'airflow.db'}"
os.environ["MODELOPS_HOME"] = str(_SESSION_DIR / "modelops-home")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# The audit log's signing key for every test (tests.support.keyring_for_tests() is the same keyring).
os.environ["AIRFLOW_CONN_MODELOPS_AUDIT_KEY"] = (
    '{"conn_type": "generic", "login": "test-k1", '
    '"password": "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"}'
)
os.environ["MODELOPS_AUDIT_KEYS"] = (
    '{"current": "test-k1", "keys": {"test-k1": "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"}}'
)
# Where the audit log's head is anchored, for every test (the modelops_home fixture points it into the
# test's own home): the Airflow connection for tasks, the URI for processes outside Airflow (the CLI).
_SESSION_ANCHORS = _SESSION_DIR / "modelops-home" / "audit-anchors"
os.environ["AIRFLOW_CONN_MODELOPS_AUDIT_ANCHOR"] = json.dumps(
    {"conn_type": "fs", "extra": {"path": str(_SESSION_ANCHORS)}}
)
os.environ["MODELOPS_AUDIT_ANCHORS"] = _SESSION_ANCHORS.as_uri()
os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
# One OpenMP thread per process: on 2 cores with other test processes (MLflow server, gateway threads)
# a HistGradientBoosting fit took 45-89 s with the default threads and 2 s with one.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip when a production service is absent, except in CI where that skip would hide a gap."""
    if _reachable(host, port):
        return
    require_or_skip(f"{name} is not reachable on {host}:{port}")


def require_or_skip(message: str) -> None:
    """Skip for ``message`` (a missing service or server), except in CI where that skip would hide a gap."""
    if os.environ.get("MODELOPS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message}, and MODELOPS_REQUIRE_SERVICES=1 forbids skipping the services tier")
    pytest.skip(f"{message}; start it to run this tier")


@pytest.fixture
def postgres_url() -> str:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    import uuid

    import sqlalchemy as sa

    admin = sa.create_engine(
        "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT"
    )
    name = f"modelops_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def modelops_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private MODELOPS_HOME with SQLite connections for the audit and prediction logs, and the audit
    anchors in its folder ``audit-anchors``."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("MODELOPS_HOME", str(home))
    monkeypatch.setenv("AIRFLOW_CONN_MODELOPS_AUDIT", f'{{"conn_type": "sqlite", "host": "{home}/audit.db"}}')
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODELOPS_PREDICTIONS", f'{{"conn_type": "sqlite", "host": "{home}/predictions.db"}}'
    )
    anchors = home / "audit-anchors"
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODELOPS_AUDIT_ANCHOR", json.dumps({"conn_type": "fs", "extra": {"path": str(anchors)}})
    )
    monkeypatch.setenv("MODELOPS_AUDIT_ANCHORS", anchors.as_uri())
    return home


def _start_mlflow_server(root: Path, port: int) -> subprocess.Popen[bytes]:
    """``mlflow server`` as the demo runs it (SQLite backend store, proxied artifacts, one worker)."""
    argv = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    with (root / "mlflow-server.log").open("ab") as log:
        # Its own process group: ``mlflow server`` runs uvicorn as a child, and both must stop at the end.
        return subprocess.Popen(
            argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop_process_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float) -> bool:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with opener.open(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` over HTTP with proxied artifacts (``mlflow-artifacts:/``), as the demo and
    production run it; started once per session, yields its base URL (``http://127.0.0.1:<port>``).

    It is shared by every test of the session: use unique model and experiment names, or
    :func:`tests.support.use_http_registry` for the catalog's models.
    """
    from tests.support import free_port

    root = tmp_path_factory.mktemp("mlflow-server")
    log_file = root / "mlflow-server.log"
    healthy = False
    for _attempt in range(3):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = _start_mlflow_server(root, port)
        healthy = _wait_healthy(url, process, timeout=180)
        if healthy:
            break
        exited = process.poll() is not None
        _stop_process_group(process)
        if not exited:
            break  # alive but not healthy in time: starting another would not help
        # It exited: perhaps another process took the free port before the server bound it; try again.
    if not healthy:
        tail = log_file.read_text(errors="replace")[-3000:] if log_file.is_file() else ""
        pytest.fail(f"mlflow server did not become healthy; the end of {log_file}:\n{tail}")
    try:
        # MLflow's client must reach the server directly even where an HTTP proxy is configured.
        with pytest.MonkeyPatch.context() as patch:
            for name in ("NO_PROXY", "no_proxy"):
                patch.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"])))
            yield url
    finally:
        _stop_process_group(process)
