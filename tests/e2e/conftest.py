"""A real, temporary stack for end-to-end runs: Airflow metadata DB, MLflow registry, scoring gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import serve_in_thread

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


def _airflow(*args: str) -> None:
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), *args], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, f"airflow {' '.join(args)} failed:\n{completed.stderr[-3000:]}"


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("lifecycle")
    home = root / "modelops-home"
    home.mkdir()
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    audit_url = f"sqlite:///{home / 'audit.db'}"
    predictions_url = f"sqlite:///{home / 'predictions.db'}"
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
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags"))
    assert bag.import_errors == {}
    try:
        with serve_in_thread(app) as gateway_url:
            host, port = gateway_url.removeprefix("http://").split(":")
            os.environ["AIRFLOW_CONN_MODELOPS_GATEWAY"] = json.dumps(
                {"conn_type": "http", "host": host, "port": int(port)}
            )
            yield Stack(
                root=root,
                home=home,
                tracking_uri=tracking_uri,
                gateway_url=gateway_url,
                audit_url=audit_url,
                predictions_url=predictions_url,
                dags=bag.dags,
                param_defaults={dag_id: dag.params.dump() for dag_id, dag in bag.dags.items()},
            )
    finally:
        os.environ.pop("AIRFLOW_CONN_MODELOPS_GATEWAY", None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
