"""The training pod path: a spec with ``training.runner: kubernetes`` trains in a KubernetesPodOperator pod
that runs the same entry point as the worker's task, with credentials from a Kubernetes Secret.

The pod is rendered with the provider's own ``build_pod_request_obj`` (dry run: no cluster) and asserted
on as the API server would receive it (the ``kubernetes`` client's serialisation).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelops.errors import SettingsError
from modelops.settings import PROJECT_ROOT, ModelSpec, TrainingSpec
from modelops.stages.outcome import AuditEntry, StageOutcome
from modelops.vocabulary import AuditAction, Decision, EventField, model_subject

MODEL = "ctr_pod"
SECRET_ENV = [
    "AIRFLOW_CONN_MLFLOW_DEFAULT",
    "AIRFLOW_CONN_MODELOPS_AUDIT",
    "AIRFLOW_CONN_MODELOPS_AUDIT_KEY",
    "AIRFLOW_CONN_MODELOPS_S3",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
]


def pod_spec(runner: str = "kubernetes") -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": MODEL,
            "owner": "ads@example.com",
            "team": "ads",
            "department": "marketing",
            "risk_tier": "low",
            "task": "binary_classification",
            "dataset": "clicks",
            "target": "clicked",
            "numeric_features": ["age"],
            "estimator": {"class_path": "sklearn.linear_model.LogisticRegression"},
            "training": {
                "runner": runner,
                "kubernetes": {
                    "namespace": "modelops-training",
                    "image": "registry.example.com/modelops:1.4.2",
                    "service_account": "modelops-training",
                    "resources": {
                        "requests": {"cpu": "2", "memory": "4Gi"},
                        "limits": {"cpu": "4", "memory": "8Gi"},
                    },
                    "env": {"OMP_NUM_THREADS": "2"},
                },
            },
        }
    )


class StubCatalog:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def model(self, name: str) -> ModelSpec:
        assert name == self.spec.name
        return self.spec


def rendered_pod(dataset_sha256: str | None = None) -> dict[str, Any]:
    from kubernetes.client import ApiClient

    from modelops.operators.training_pod import TrainInPodOperator

    operator = TrainInPodOperator(task_id="train_in_pod", model=MODEL, dataset_sha256=dataset_sha256)
    operator.configure_pod(pod_spec(), dag_id="modelops_training", run_id="manual__2026-11-27")
    pod = operator.build_pod_request_obj(context=None, dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)


def test_the_pod_runs_the_training_entry_point_with_credentials_from_the_secret() -> None:
    pod = rendered_pod(dataset_sha256="a" * 64)
    assert pod["metadata"]["namespace"] == "modelops-training"
    labels = pod["metadata"]["labels"]
    assert labels["modelops.io/model"] == MODEL and labels["app.kubernetes.io/component"] == "training"
    base, *sidecars = pod["spec"]["containers"]
    assert base["name"] == "base" and [c["name"] for c in sidecars] == ["airflow-xcom-sidecar"]
    assert base["image"] == "registry.example.com/modelops:1.4.2"
    assert base["command"] == ["python", "-m", "modelops.operators.training"]
    assert base["args"] == [
        "--model",
        MODEL,
        "--trigger",
        "manual",
        "--dag-id",
        "modelops_training",
        "--run-id",
        "manual__2026-11-27",
        "--dataset-sha256",
        "a" * 64,
    ]
    env = {item["name"]: item for item in base["env"]}
    assert env["OMP_NUM_THREADS"] == {"name": "OMP_NUM_THREADS", "value": "2"}
    for name in SECRET_ENV:
        assert env[name] == {
            "name": name,
            "valueFrom": {"secretKeyRef": {"name": "modelops-connections", "key": name}},
        }, "credentials come from the Secret, never as a value"
    assert base["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "4", "memory": "8Gi"},
    }
    assert base["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["serviceAccountName"] == "modelops-training"
    assert pod["spec"]["restartPolicy"] == "Never"
    # The entry point is the module the worker's operator lives in, and it accepts these arguments.
    from modelops.operators import training

    assert training.POD_OUTCOME_FILE == "/airflow/xcom/return.json"
    assert base["command"][-1] == training.__name__


def test_settings_require_the_pod_block_and_refuse_literal_credentials() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="add training.kubernetes"):
        TrainingSpec.model_validate({"runner": "kubernetes"})
    with pytest.raises(ValidationError, match="put them in the Kubernetes Secret"):
        TrainingSpec.model_validate(
            {
                "runner": "kubernetes",
                "kubernetes": {"image": "m:1", "env": {"AIRFLOW_CONN_MLFLOW_DEFAULT": "http://x"}},
            }
        )
    assert TrainingSpec().runner == "worker"


def outcome() -> StageOutcome:
    return StageOutcome(
        decision=Decision.CANDIDATE,
        summary=f"{MODEL} v3 (candidate)",
        details={"version": "3"},
        records=(
            AuditEntry(
                AuditAction.MODEL_REGISTERED,
                model_subject(MODEL, "3"),
                Decision.CANDIDATE,
                details={"metrics": {"holdout_roc_auc": 0.71}},
                evidence={"dataset": "b" * 64},
            ),
        ),
        asset_extra={EventField.MODEL_NAME: MODEL, EventField.VERSION: "3"},
    )


def test_the_entry_point_hands_the_outcome_to_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modelops_home: Path
) -> None:
    """main() (the pod) writes the stage's outcome; the task reads back the same outcome to record."""
    from modelops.operators import training
    from modelops.operators.training_pod import outcome_from_pod

    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", '{"conn_type": "http", "host": "127.0.0.1", "port": 1}')
    calls: list[dict[str, Any]] = []

    def fake_training(**kwargs: Any) -> StageOutcome:
        calls.append(kwargs)
        return outcome()

    monkeypatch.setattr(training, "run_training", fake_training)
    monkeypatch.setattr("modelops.settings.load_catalog", lambda: StubCatalog(pod_spec()))
    written = tmp_path / "xcom" / "return.json"
    argv = ["--model", MODEL, "--trigger", "retraining_request", "--dag-id", "d", "--run-id", "r"]
    assert training.main([*argv, "--outcome", str(written)]) == 0
    assert (
        calls[0]["model"] == MODEL
        and calls[0]["trigger"] == "retraining_request"
        and calls[0]["run_id"] == "r"
    )
    back = outcome_from_pod(json.loads(written.read_text()))
    assert back.records == outcome().records and back.asset_extra == outcome().asset_extra
    assert back.decision == Decision.CANDIDATE and back.xcom() == outcome().xcom()

    def refused(**kwargs: Any) -> StageOutcome:
        raise SettingsError("include/models/ctr_pod.yaml: field 'dataset': no such dataset")

    monkeypatch.setattr(training, "run_training", refused)
    assert training.main([*argv, "--outcome", str(written)]) == 0
    with pytest.raises(SettingsError, match="no such dataset"):
        outcome_from_pod(json.loads(written.read_text()))


def test_each_training_task_skips_the_models_the_other_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.exceptions import AirflowSkipException

    from modelops.operators.training import TrainModelOperator
    from modelops.operators.training_pod import TrainInPodOperator

    worker = TrainModelOperator(task_id="train_and_register", model=MODEL)
    worker.__dict__["catalog"] = StubCatalog(pod_spec("kubernetes"))
    with pytest.raises(AirflowSkipException, match="train_in_pod"):
        worker.execute({})
    in_pod = TrainInPodOperator(task_id="train_in_pod", model=MODEL)
    in_pod.__dict__["catalog"] = StubCatalog(pod_spec("worker"))
    with pytest.raises(AirflowSkipException, match="train_and_register"):
        in_pod.execute({})


def test_the_training_dag_gets_the_pod_task_only_when_a_spec_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    dag_file = PROJECT_ROOT / "dags" / "modelops_training.py"
    shipped = DagBag(dag_folder=str(dag_file)).dags["modelops_training"]
    assert "train_in_pod" not in shipped.task_dict, "the demo models train in the worker: DAG unchanged"

    include = tmp_path / "include"
    shutil.copytree(PROJECT_ROOT / "include", include)
    spec_file = include / "models" / "ctr_recommender.yaml"
    data = yaml.safe_load(spec_file.read_text())
    data["training"] = {
        "runner": "kubernetes",
        "kubernetes": {"image": "registry.example.com/modelops:1.4.2"},
    }
    spec_file.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("MODELOPS_INCLUDE_DIR", str(include))
    dag = DagBag(dag_folder=str(dag_file)).dags["modelops_training"]
    task = dag.task_dict["train_in_pod"]
    assert task.operator_name == "TrainInPodOperator"
    assert task.upstream_task_ids == {"plan_training"}
    assert [outlet.name for outlet in task.outlets] == [
        outlet.name for outlet in dag.task_dict["train_and_register"].outlets
    ]
