"""Test-wide set-up: a throw-away AIRFLOW_HOME and MODELOPS_HOME, never the developer's own state."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
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
os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"


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
    message = f"{name} is not reachable on {host}:{port}"
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
    """A private MODELOPS_HOME with SQLite connections for the audit and prediction logs."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("MODELOPS_HOME", str(home))
    monkeypatch.setenv("AIRFLOW_CONN_MODELOPS_AUDIT", f'{{"conn_type": "sqlite", "host": "{home}/audit.db"}}')
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODELOPS_PREDICTIONS", f'{{"conn_type": "sqlite", "host": "{home}/predictions.db"}}'
    )
    return home
