"""Helpers the test tiers share."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest
    from mlflow import MlflowClient

    from modelops.registry import ModelRegistry
    from modelops.settings import Catalog


# The keyring every test signs audit records with; tests/conftest.py also exposes it to Airflow (the
# connection modelops_audit_key) and to processes outside Airflow (MODELOPS_AUDIT_KEYS).
TEST_KEY_ID = "test-k1"
TEST_KEY_SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


def keyring_for_tests() -> Any:
    from modelops.audit import AuditKeyring

    return AuditKeyring(current=TEST_KEY_ID, keys={TEST_KEY_ID: TEST_KEY_SECRET})


def valid_approval(hours: float = 168) -> dict[str, Any]:
    """The ``approval`` details of a gate approval that deploys for ``hours`` from now."""
    now = datetime.now(UTC)
    return {
        "approval": {
            "mode": "automatic",
            "by": "test",
            "approved_at": now.isoformat(),
            "valid_until": (now + timedelta(hours=hours)).isoformat(),
        }
    }


def authorise(
    store: Any,
    registry: ModelRegistry,
    name: str,
    version: str,
    *,
    register: bool = False,
    approve: bool = True,
    promote: bool = False,
) -> dict[str, str]:
    """Write the authentic records the pipeline would write about ``name`` v``version`` (registration,
    gate approval, promotion), each holding the version's file hashes as they are now; returns them.

    For tests of the gateway or deployment that need a version the pipeline vouches for without running
    training and the gate."""
    from modelops.evidence import CHAMPION_FIELD, evidence_summary, version_file_hashes
    from modelops.vocabulary import AuditAction, Decision, model_subject

    files = version_file_hashes(registry, name, str(version))
    subject = model_subject(name, version)
    facts = evidence_summary(files)
    if register:
        found = registry.version(name, version)
        store.append(
            actor="test",
            action=AuditAction.MODEL_REGISTERED,
            subject=subject,
            decision=Decision.CANDIDATE,
            details={"run_id": found.run_id, "tags": found.tags, "metrics": {}, **facts},
        )
    if approve:
        store.append(
            actor="test",
            action=AuditAction.GATE_DECIDED,
            subject=subject,
            decision=Decision.APPROVED,
            details={**facts, **valid_approval()},
        )
    if promote:
        store.append(
            actor="test",
            action=AuditAction.MODEL_DEPLOYED,
            subject=subject,
            decision=Decision.PROMOTED,
            details={CHAMPION_FIELD: str(version), **facts},
        )
    return files


@contextmanager
def serve_in_thread(app: Any, *, timeout: float = 30.0, **config: Any) -> Iterator[str]:
    """Serve an ASGI app with a real uvicorn server on a free loopback port; yields its base URL.

    Port 0 lets the kernel pick the port at bind time, so two tests never race for one.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port: a real S3 endpoint; yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def free_port() -> int:
    """A loopback port nothing listens on (for "unreachable" tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mlflow_client(tracking_uri: str) -> MlflowClient:
    """A raw MLflow client of ``tracking_uri``, for a test acting as an outside user or attacker (who
    bypasses :class:`~modelops.registry.ModelRegistry`)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


@functools.cache
def _migrated_mlflow_sqlite() -> Path:
    """An empty MLflow SQLite store with every schema migration applied, made once per process."""
    import atexit
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="modelops-mlflow-template-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    template = folder / "mlflow.db"
    client = mlflow_client(f"sqlite:///{template}")
    client.search_experiments()
    client.search_registered_models()
    return template


def sqlite_tracking_uri(root: Path) -> str:
    """The URI of an MLflow SQLite store at ``root/mlflow.db``, created as a copy of an already migrated
    one: migrating a new database takes seconds, copying one milliseconds. An existing file is kept."""
    import sqlite3
    from contextlib import closing

    database = root / "mlflow.db"
    if not database.exists():
        root.mkdir(parents=True, exist_ok=True)
        with (
            closing(sqlite3.connect(_migrated_mlflow_sqlite())) as src,
            closing(sqlite3.connect(database)) as dst,
        ):
            src.backup(dst)
    return f"sqlite:///{database}"


def _catalog_experiments(catalog: Catalog | None) -> dict[str, str]:
    """model name -> its experiment's name, for every model of ``catalog`` (default: the loaded one)."""
    if catalog is None:
        from modelops.settings import load_catalog

        catalog = load_catalog()
    return {name: spec.experiment_name for name, spec in sorted(catalog.models.items())}


def use_sqlite_registry(
    root: Path, patch: pytest.MonkeyPatch, *, catalog: Catalog | None = None
) -> tuple[str, ModelRegistry, dict[str, str]]:
    """A real MLflow registry in ``root`` that the hooks reach through ``mlflow_default``.

    Returns (tracking URI, registry, model name -> id of that model's experiment). The experiment of
    every model of ``catalog`` (default :func:`~modelops.settings.load_catalog`) is created up front
    with an artifact location under ``root``: without one, a SQLite-backed MLflow would write to ./mlruns.
    """
    import json

    from modelops.registry import ModelRegistry

    tracking_uri = sqlite_tracking_uri(root)
    patch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT",
        json.dumps({"conn_type": "http", "extra": {"tracking_uri": tracking_uri}}),
    )
    client = mlflow_client(tracking_uri)
    experiment_ids = {
        name: client.create_experiment(experiment, artifact_location=(root / "artifacts" / name).as_uri())
        for name, experiment in _catalog_experiments(catalog).items()
    }
    return tracking_uri, ModelRegistry(tracking_uri), experiment_ids


def use_http_registry(
    url: str, patch: pytest.MonkeyPatch, *, fresh: bool = True, catalog: Catalog | None = None
) -> tuple[str, ModelRegistry, dict[str, str]]:
    """The MLflow server at ``url`` (the session's ``mlflow_server`` fixture) as ``mlflow_default``.

    Returns (tracking URI, registry, model name -> id of that model's experiment) like
    :func:`use_sqlite_registry`; the server gives every experiment its (proxied) artifact location.
    The server lives for the whole session, so with ``fresh`` (the default) the registered model of
    every catalog model is deleted and the active runs of its experiment are deleted, leaving the test
    the state of a new server for the catalog's models. Other names persist between tests.
    """
    import json
    from urllib.parse import urlsplit

    from modelops.registry import ModelRegistry

    parts = urlsplit(url)
    patch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT",
        json.dumps({"conn_type": "http", "host": parts.hostname, "port": parts.port, "schema": parts.scheme}),
    )
    registry = ModelRegistry(url)
    client = mlflow_client(url)
    experiment_ids: dict[str, str] = {}
    for name, experiment in _catalog_experiments(catalog).items():
        experiment_ids[name] = registry.experiment_id(experiment)
        if fresh:
            if registry.model(name) is not None:
                client.delete_registered_model(name)
            for run in client.search_runs([experiment_ids[name]], max_results=1000):
                client.delete_run(run.info.run_id)
    return url, registry, experiment_ids
