"""A real, temporary stack for end-to-end runs: Airflow metadata DB, MLflow registry, scoring gateway."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "ctr_recommender"


@dataclass
class Stack:
    root: Path
    home: Path
    tracking_uri: str
    gateway_url: str
    audit_url: str
    predictions_url: str
    dags: dict
    param_defaults: dict

    def run(self, dag_id: str, conf: dict | None = None, **kwargs):
        """Run one DAG with ``dag.test()`` and return the finished DagRun.

        Every param is passed, defaults included: ``dag.test()`` keeps the previous run's conf on the
        in-memory DAG's params, so an omitted param would silently reuse the last run's value.
        """
        return self.dags[dag_id].test(run_conf={**self.param_defaults[dag_id], **(conf or {})}, **kwargs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _airflow(*args: str) -> None:
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), *args], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, f"airflow {' '.join(args)} failed:\n{completed.stderr[-3000:]}"


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import uvicorn

    root = tmp_path_factory.mktemp("lifecycle")
    home = root / "modelops-home"
    home.mkdir()
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    audit_url = f"sqlite:///{home / 'audit.db'}"
    predictions_url = f"sqlite:///{home / 'predictions.db'}"
    port = _free_port()
    env = {
        "MODELOPS_HOME": str(home),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "AIRFLOW_CONN_MLFLOW_DEFAULT": json.dumps(
            {"conn_type": "http", "extra": {"tracking_uri": tracking_uri}}
        ),
        "AIRFLOW_CONN_MODELOPS_AUDIT": json.dumps({"conn_type": "sqlite", "host": str(home / "audit.db")}),
        "AIRFLOW_CONN_MODELOPS_PREDICTIONS": json.dumps(
            {"conn_type": "sqlite", "host": str(home / "predictions.db")}
        ),
        "AIRFLOW_CONN_MODELOPS_GATEWAY": json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": port}),
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)

    # MLflow without a server puts artifacts in ./mlruns unless the experiment says otherwise.
    from mlflow import MlflowClient

    from modelops.settings import platform_settings

    MlflowClient(tracking_uri).create_experiment(
        platform_settings().experiment_name, artifact_location=(root / "artifacts").as_uri()
    )

    # dag.test() refuses a DAG that is not serialized in the metadata DB.
    _airflow("db", "migrate")
    _airflow("dags", "reserialize")

    from modelops.serving.gateway import GatewayConfig, create_app

    app = create_app(
        GatewayConfig(tracking_uri=tracking_uri, predictions_url=predictions_url, default_model=MODEL_NAME)
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.05)

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags"))
    assert bag.import_errors == {}
    try:
        yield Stack(
            root=root,
            home=home,
            tracking_uri=tracking_uri,
            gateway_url=f"http://127.0.0.1:{port}",
            audit_url=audit_url,
            predictions_url=predictions_url,
            dags=bag.dags,
            param_defaults={dag_id: dag.params.dump() for dag_id, dag in bag.dags.items()},
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
