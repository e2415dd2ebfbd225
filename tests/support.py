"""Helpers the test tiers share."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest
    from mlflow import MlflowClient


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


def free_port() -> int:
    """A loopback port nothing listens on (for "unreachable" tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_sqlite_registry(root: Path, patch: pytest.MonkeyPatch) -> tuple[str, MlflowClient, str]:
    """A real MLflow registry in ``root`` that the hooks reach through ``mlflow_default``.

    Returns (tracking URI, client, id of the platform's experiment). The experiment is created with an
    artifact location under ``root``: without one, MLflow would write to ./mlruns.
    """
    import json

    from mlflow import MlflowClient

    from modelops.settings import platform_settings

    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    patch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT",
        json.dumps({"conn_type": "http", "extra": {"tracking_uri": tracking_uri}}),
    )
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    experiment_id = client.create_experiment(
        platform_settings().experiment_name, artifact_location=(root / "artifacts").as_uri()
    )
    return tracking_uri, client, experiment_id
