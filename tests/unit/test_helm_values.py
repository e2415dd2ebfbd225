"""The values files for the official Apache Airflow Helm chart (deploy/helm/), checked without the chart.

Nothing here renders the chart: there is no helm binary on this machine or in CI, the chart is not on a
registry we reach, and it is not vendored. What is checked instead:

- every key our values files set is one the chart's ``values.schema.json`` allows, with that schema's
  type (:data:`CHART_SCHEMA`, a transcription of the parts we use, validated with ``jsonschema``);
- every Airflow variable docker-compose.yaml gives its Airflow services is set in each values file, by the
  chart key that sets it (credentials only from Kubernetes Secrets);
- the executor-specific settings agree (Celery: external Redis, broker and result backend; Kubernetes
  executor: none of those);
- deploy/k8s/modelops-rbac.yaml grants every call the kubernetes serving target and KubernetesPodOperator
  make, to the service account the chart gives the workers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VALUES = {
    "celery": ROOT / "deploy" / "helm" / "values-celery.yaml",
    "kubernetes": ROOT / "deploy" / "helm" / "values-kubernetes-executor.yaml",
}


def _nullable_string() -> dict[str, Any]:
    return {"type": ["string", "null"]}


def _strict(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties}


def _enabled() -> dict[str, Any]:
    return _strict({"enabled": {"type": "boolean"}})


CHART_SCHEMA: dict[str, Any] = _strict(
    {
        "images": _strict(
            {
                "airflow": _strict(
                    {
                        "repository": _nullable_string(),
                        "tag": _nullable_string(),
                        "pullPolicy": {"type": "string", "enum": ["Always", "Never", "IfNotPresent"]},
                    }
                )
            }
        ),
        "airflowVersion": {"type": "string"},
        "executor": {
            "type": "string",
            "pattern": r"^(([a-zA-Z_][a-zA-Z0-9_]*.)*[A-Z][a-zA-Z0-9]+Executor)"
            r"(,(([a-zA-Z_][a-zA-Z0-9_]*.)*[A-Z][a-zA-Z0-9]+Executor))*$",
        },
        "allowPodLaunching": {"type": "boolean"},
        "rbac": _strict({"create": {"type": "boolean"}}),
        "dags": _strict({"persistence": _enabled(), "gitSync": _enabled()}),
        "postgresql": _enabled(),
        "redis": _enabled(),
        "data": _strict(
            {
                "metadataSecretName": _nullable_string(),
                "resultBackendSecretName": _nullable_string(),
                "brokerUrlSecretName": _nullable_string(),
            }
        ),
        "fernetKeySecretName": _nullable_string(),
        "apiSecretKeySecretName": _nullable_string(),
        "jwtSecretName": _nullable_string(),
        "workers": _strict({"replicas": {"type": "integer"}, "persistence": _enabled()}),
        "logs": _strict({"persistence": _enabled()}),
        "config": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": {"type": ["boolean", "integer", "number", "string"]},
            },
        },
        "secret": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["envName", "secretName"],
                "properties": {
                    "envName": {"type": "string"},
                    "secretName": {"type": "string"},
                    "secretKey": {"type": "string"},
                },
            },
        },
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "value"],
                "properties": {"name": {"type": "string"}, "value": {"type": "string"}},
            },
        },
    }
)
"""The chart's ``values.schema.json`` for exactly the keys our values files use (each object here is closed,
so a key not listed fails). Transcribed from apache/airflow ``chart/values.schema.json`` at commit
002e5532d7d5 (the chart whose default Airflow is 3.0.5), read on 2026-11-27: the types, enums, the
executor pattern, and ``additionalProperties: false`` where that schema has it (images, images.airflow,
data, dags, dags.persistence, dags.gitSync, workers, logs, logs.persistence, redis, secret and env items).
The keys are also in the parameters reference of chart 1.21.0. A newer chart that renames one of them
needs this list updated, and a render (``helm template``) where helm is available."""

# docker-compose.yaml's Airflow variables that the chart sets from a values key, not from env/secret.
CHART_SETS = {
    "AIRFLOW__CORE__EXECUTOR": ("executor",),
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": ("data", "metadataSecretName"),
    "AIRFLOW__CELERY__BROKER_URL": ("data", "brokerUrlSecretName"),
    "AIRFLOW__CELERY__RESULT_BACKEND": ("data", "resultBackendSecretName"),
    "AIRFLOW__CORE__FERNET_KEY": ("fernetKeySecretName",),
    "AIRFLOW__API_AUTH__JWT_SECRET": ("jwtSecretName",),
    "AIRFLOW__API__SECRET_KEY": ("apiSecretKeySecretName",),
}
CELERY_ONLY = {"AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND"}
CHART_DERIVES = {
    # The chart points every component at its own API server's execution API.
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
}
SECRET_LOOKING = re.compile(r"(^AIRFLOW_CONN_|PASSWORD|TOKEN|SECRET|_KEYS?$)")


def load(kind: str) -> dict[str, Any]:
    return yaml.safe_load(VALUES[kind].read_text())


def compose_airflow_env() -> dict[str, Any]:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    return compose["x-airflow-common"]["environment"]


def dig(values: dict[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        values = values.get(part) if isinstance(values, dict) else None
    return values


@pytest.mark.parametrize("kind", sorted(VALUES))
def test_values_use_only_keys_and_types_the_charts_schema_allows(kind: str) -> None:
    import jsonschema

    jsonschema.validate(load(kind), CHART_SCHEMA)


def test_the_schema_transcription_rejects_what_the_chart_rejects() -> None:
    import jsonschema

    values = load("celery")
    for wrong in (
        {**values, "workers": {**values["workers"], "replica": 2}},
        {**values, "executor": "celery"},
        {**values, "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
        {**values, "secret": [{"envName": "X", "secretName": "s", "value": "literal"}]},
        {**values, "images": {"airflow": {"repository": "r", "pullPolicy": "Sometimes"}}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, CHART_SCHEMA)


@pytest.mark.parametrize("kind", sorted(VALUES))
def test_every_airflow_setting_of_docker_compose_is_set(kind: str) -> None:
    values = load(kind)
    env = {item["name"]: item["value"] for item in values["env"]}
    secret = {item["envName"]: item for item in values["secret"]}
    config = values["config"]
    missing = []
    for name in compose_airflow_env():
        if name in CHART_DERIVES or (kind == "kubernetes" and name in CELERY_ONLY):
            continue
        if name in CHART_SETS:
            found = dig(values, CHART_SETS[name])
        elif name.startswith("AIRFLOW__"):
            section, key = name.removeprefix("AIRFLOW__").lower().split("__", 1)
            found = dig(config, (section, key))
        else:
            found = env.get(name, secret.get(name))
        if found is None:
            missing.append(name)
    assert missing == [], f"{VALUES[kind].name} does not set {missing} (docker-compose.yaml does)"
    # Credentials come from a Kubernetes Secret, never as a value in the file.
    literal = sorted(name for name in env if SECRET_LOOKING.search(name))
    assert literal == [], f"{literal} are literal values; take them from a Secret (values key 'secret')"
    for name, item in secret.items():
        assert item["secretKey"] == name and item["secretName"] == "modelops-connections"
    # What the pipeline needs besides: remote logs on S3 through the storage connection.
    assert config["logging"]["remote_logging"] == "True"
    assert config["logging"]["remote_base_log_folder"].startswith("s3://")
    assert config["logging"]["remote_log_conn_id"] == "modelops_s3" and "AIRFLOW_CONN_MODELOPS_S3" in secret


def test_the_executor_specific_settings_agree() -> None:
    celery, kubernetes = load("celery"), load("kubernetes")
    assert celery["executor"] == "CeleryExecutor" and kubernetes["executor"] == "KubernetesExecutor"
    # Celery: the chart's Redis off, so the broker is the external one the Secret names; two workers
    # without volumes (logs are remote).
    assert celery["redis"]["enabled"] is False and celery["data"]["brokerUrlSecretName"]
    assert celery["data"]["resultBackendSecretName"]
    assert celery["workers"]["replicas"] >= 2 and celery["workers"]["persistence"]["enabled"] is False
    # Kubernetes executor: nothing of Celery.
    assert kubernetes["redis"]["enabled"] is False
    assert set(kubernetes["data"]) == {"metadataSecretName"}
    assert "workers" not in kubernetes
    for values in (celery, kubernetes):
        assert values["postgresql"]["enabled"] is False and values["data"]["metadataSecretName"]
        assert values["dags"] == {"persistence": {"enabled": False}, "gitSync": {"enabled": False}}
        assert values["logs"]["persistence"]["enabled"] is False
        assert values["allowPodLaunching"] is True
    # Apart from the executor's own keys, the two files say the same.
    executor_keys = {"executor", "redis", "data", "workers"}
    assert {k: v for k, v in celery.items() if k not in executor_keys} == {
        k: v for k, v in kubernetes.items() if k not in executor_keys
    }


def test_the_image_is_ours_at_the_locked_airflow_version() -> None:
    lock = (ROOT / "uv.lock").read_text()
    locked = re.search(r'\[\[package\]\]\nname = "apache-airflow"\nversion = "([^"]+)"', lock)
    assert locked is not None
    for kind in VALUES:
        values = load(kind)
        assert values["airflowVersion"] == locked.group(1)
        assert values["images"]["airflow"]["repository"].endswith("/modelops")


def test_the_rbac_role_covers_what_the_target_and_the_pod_operator_call() -> None:
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "modelops-rbac.yaml").read_text()))
    role = next(doc for doc in documents if doc["kind"] == "Role")
    binding = next(doc for doc in documents if doc["kind"] == "RoleBinding")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {
        ("apps", "deployments", "patch"),
        ("apps", "deployments", "get"),
        ("apps", "deployments", "delete"),
        ("apps", "deployments/status", "get"),
        ("", "services", "patch"),
        ("", "services", "delete"),
        ("autoscaling", "horizontalpodautoscalers", "patch"),
        ("autoscaling", "horizontalpodautoscalers", "delete"),
        ("", "pods", "create"),
        ("", "pods", "get"),
        ("", "pods", "delete"),
        ("", "pods/log", "get"),
        ("", "pods/exec", "create"),
    }
    assert needed <= granted, sorted(needed - granted)
    from modelops.settings import KubernetesServingSpec, TrainingPodSpec

    namespace = KubernetesServingSpec(image="m:1").namespace
    assert role["metadata"]["namespace"] == namespace == TrainingPodSpec(image="m:1").namespace
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "airflow-worker", "namespace": "airflow"}
    ]
