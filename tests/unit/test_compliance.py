"""Stage 3, the compliance gate: the policy evaluation, the policy file, and the operator on a version
trained into a real SQLite MLflow registry under tmp_path."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from mlflow import MlflowClient

from modelops.assets import MODEL_APPROVED, MODEL_CANDIDATE
from modelops.audit import AuditStore
from modelops.data.synthetic import generate_clicks, write_csv
from modelops.errors import ComplianceGateFailed, GateFailed, SettingsError
from modelops.hooks.registry import MlflowRegistryHook
from modelops.operators._common import sha256_json
from modelops.operators.compliance import CHALLENGER_ALIAS, ComplianceGateOperator
from modelops.settings import (
    PROJECT_ROOT,
    CompliancePolicy,
    MetricThreshold,
    compliance_policy,
    model_spec,
    platform_settings,
)
from modelops.stages.compliance import APPROVED, REJECTED, evaluate_policy
from modelops.stages.training import train_and_register
from tests.support import use_sqlite_registry

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore:Hint. Inferred schema contains integer column:UserWarning"
)

NAME = "ctr_recommender"
SHA = "c" * 64


class OutletEvents(dict):
    """Stand-in for Airflow's outlet event accessors: an accessor (with ``extra``) per asset on demand."""

    def __missing__(self, key: Any) -> SimpleNamespace:
        self[key] = SimpleNamespace(extra={})
        return self[key]


def task_context(run_id: str = "manual__gate", **extra: Any) -> dict[str, Any]:
    dag_run = SimpleNamespace(dag_id="modelops_compliance_gate", run_id=run_id, triggering_user_name="bob")
    return {
        "dag_run": dag_run,
        "ti": SimpleNamespace(task_id="compliance_gate"),
        "outlet_events": OutletEvents(),
        **extra,
    }


# --- evaluate_policy -----------------------------------------------------------------------------


def small_policy(**overrides: Any) -> CompliancePolicy:
    fields: dict[str, Any] = {
        "name": "test-policy",
        "version": "7",
        "required_tags": ["train_data_sha256", "code_commit", "trigger"],
        "metric_thresholds": {
            "auc": MetricThreshold(min=0.65),
            "log_loss": MetricThreshold(max=0.69),
            "accuracy": MetricThreshold(min=0.5, max=0.99),
        },
        "require_validated_dataset": True,
    }
    return CompliancePolicy(**{**fields, **overrides})


GOOD_TAGS = {"train_data_sha256": SHA, "code_commit": "abc", "trigger": "manual"}
GOOD_METRICS = {"auc": 0.8, "log_loss": 0.4, "accuracy": 0.9}


def test_a_compliant_version_passes_every_check() -> None:
    report = evaluate_policy(
        policy=small_policy(),
        model_name=NAME,
        version="3",
        tags=GOOD_TAGS,
        metrics=GOOD_METRICS,
        dataset_validated=True,
    )
    assert report.approved and report.verdict == APPROVED and report.failures == []
    assert [c.name for c in report.checks] == [
        "tag:train_data_sha256",
        "tag:code_commit",
        "tag:trigger",
        "metric:auc",
        "metric:log_loss",
        "metric:accuracy",
        "data:validated",
    ]
    assert report.checks[3].detail == "auc=0.8000 within bounds"
    as_json = json.loads(report.to_json())
    assert as_json["verdict"] == "approved" and as_json["policy"] == "test-policy"
    assert as_json["policy_version"] == "7" and as_json["version"] == "3"


def test_every_failed_check_is_listed_not_only_the_first() -> None:
    report = evaluate_policy(
        policy=small_policy(),
        model_name=NAME,
        version="4",
        tags={"train_data_sha256": SHA, "code_commit": ""},  # trigger absent, code_commit empty
        metrics={"auc": 0.5, "log_loss": 0.9},  # accuracy never logged
        dataset_validated=False,
    )
    assert report.verdict == REJECTED
    failures = {check.name: check.detail for check in report.failures}
    assert failures == {
        "tag:code_commit": "required tag 'code_commit' is missing",
        "tag:trigger": "required tag 'trigger' is missing",
        "metric:auc": "auc=0.5000 below the minimum 0.65",
        "metric:log_loss": "log_loss=0.9000 above the maximum 0.69",
        "metric:accuracy": "metric 'accuracy' was not logged by the training run",
        "data:validated": (
            f"dataset sha256 {SHA[:12]}... has no passing validation record in the audit log; "
            "run the data validation DAG on it first"
        ),
    }
    assert [c.name for c in report.checks if c.passed] == ["tag:train_data_sha256"]


def test_a_metric_above_a_max_is_caught_even_when_above_its_min() -> None:
    report = evaluate_policy(
        policy=small_policy(),
        model_name=NAME,
        version="5",
        tags=GOOD_TAGS,
        metrics={**GOOD_METRICS, "accuracy": 0.999},
        dataset_validated=True,
    )
    assert [(c.name, c.detail) for c in report.failures] == [
        ("metric:accuracy", "accuracy=0.9990 above the maximum 0.99")
    ]


@pytest.mark.parametrize("validated", [False, None])
def test_an_unvalidated_or_unknown_dataset_fails(validated: bool | None) -> None:
    report = evaluate_policy(
        policy=small_policy(),
        model_name=NAME,
        version="6",
        tags=GOOD_TAGS,
        metrics=GOOD_METRICS,
        dataset_validated=validated,
    )
    assert [c.name for c in report.failures] == ["data:validated"]


def test_without_a_data_hash_the_data_cannot_be_traced() -> None:
    report = evaluate_policy(
        policy=small_policy(required_tags=[]),
        model_name=NAME,
        version="6",
        tags={},
        metrics=GOOD_METRICS,
        dataset_validated=True,
    )
    assert [(c.name, c.detail) for c in report.failures] == [
        ("data:validated", "no train_data_sha256 tag, so the data cannot be traced")
    ]
    unchecked = evaluate_policy(
        policy=small_policy(required_tags=[], require_validated_dataset=False),
        model_name=NAME,
        version="6",
        tags={},
        metrics=GOOD_METRICS,
        dataset_validated=None,
    )
    assert unchecked.approved and not any(c.name == "data:validated" for c in unchecked.checks)


# --- the policy file -----------------------------------------------------------------------------


@pytest.fixture
def include_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    include = tmp_path / "include"
    shutil.copytree(PROJECT_ROOT / "include", include)
    monkeypatch.setenv("MODELOPS_INCLUDE_DIR", str(include))
    return include


def test_the_shipped_policy_loads() -> None:
    policy = compliance_policy()
    assert "train_data_sha256" in policy.required_tags and policy.require_validated_dataset
    assert policy.metric_thresholds["holdout_roc_auc"].min is not None


def test_a_policy_with_an_unknown_field_names_the_file_and_the_field(include_copy: Path) -> None:
    policy_file = include_copy / "policies" / "compliance.yaml"
    policy_file.write_text(policy_file.read_text() + "approved_by: alice\n")
    with pytest.raises(SettingsError) as raised:
        compliance_policy()
    message = str(raised.value)
    assert str(policy_file) in message
    assert "field 'approved_by': unknown field (remove it or check its spelling)" in message


def test_a_misspelt_threshold_bound_names_its_path(include_copy: Path) -> None:
    policy_file = include_copy / "policies" / "compliance.yaml"
    policy_file.write_text(
        policy_file.read_text().replace("holdout_roc_auc: {min: 0.65}", "holdout_roc_auc: {minimum: 0.65}")
    )
    with pytest.raises(SettingsError) as raised:
        compliance_policy()
    message = str(raised.value)
    assert str(policy_file) in message and "metric_thresholds.holdout_roc_auc.minimum" in message


# --- the operator on a registered version --------------------------------------------------------


@dataclass(frozen=True)
class Registry:
    root: Path
    client: MlflowClient
    sha256: str
    version: str


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("compliance")
    with pytest.MonkeyPatch.context() as patch:
        tracking_uri, client, _ = use_sqlite_registry(root, patch)
        csv = write_csv(generate_clicks(2500, seed=7), root / "clicks.csv")
        sha = hashlib.sha256(csv.read_bytes()).hexdigest()
        result = train_and_register(
            registry=MlflowRegistryHook(),
            spec=model_spec(),
            experiment_name=platform_settings().experiment_name,
            frame=pd.read_csv(csv),
            dataset_sha256=sha,
            dataset_uri=csv.as_uri(),
            trigger="manual",
            dag_id="modelops_training",
            run_id="manual__compliance",
        )
        yield Registry(root, client, sha, result.version)


def record_validated(home: Path, sha: str) -> None:
    store = AuditStore(f"sqlite:///{home}/audit.db")
    try:
        store.append(
            actor="test", action="dataset.validated", subject=f"dataset:sha256:{sha}", decision="passed"
        )
    finally:
        store.dispose()


def audit_records(home: Path, action: str) -> list[Any]:
    store = AuditStore(f"sqlite:///{home}/audit.db")
    try:
        assert store.verify().ok
        return store.records(action=action)
    finally:
        store.dispose()


def aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(NAME).aliases.items()}


def test_operator_approves_a_compliant_version(registry: Registry, modelops_home: Path) -> None:
    record_validated(modelops_home, registry.sha256)
    client, version = registry.client, registry.version
    context = task_context()
    result = ComplianceGateOperator(
        task_id="compliance_gate", model_version=version, outlets=[MODEL_APPROVED]
    ).execute(context)
    json.dumps(result)
    assert result["verdict"] == "approved" and result["version"] == version

    policy = compliance_policy()
    assert str(client.get_model_version_by_alias(NAME, CHALLENGER_ALIAS).version) == version
    tags = client.get_model_version(NAME, version).tags
    assert tags["compliance_status"] == "approved"
    assert tags["compliance_policy"] == f"{policy.name}@{policy.version}"

    run_id = client.get_model_version(NAME, version).run_id
    local = client.download_artifacts(run_id, f"compliance/gate_report_v{version}.json", str(registry.root))
    report = json.loads(Path(local).read_text())
    assert report["verdict"] == "approved" and all(check["passed"] for check in report["checks"])
    assert len(report["checks"]) == result["checks"] == len(policy.required_tags) + 2 + 1
    # The tag is the hash of exactly the stored report: the artifact can be checked against it.
    assert tags["compliance_report_sha256"] == sha256_json(report)

    assert context["outlet_events"][MODEL_APPROVED].extra == {
        "model_name": NAME,
        "version": version,
        "policy": f"{policy.name}@{policy.version}",
    }
    (record,) = audit_records(modelops_home, "gate.decided")
    assert record.decision == "approved" and record.subject == f"model:{NAME}@{version}"
    assert record.details["failed"] == []
    assert record.evidence["gate_report"] == tags["compliance_report_sha256"]
    assert record.evidence["dataset"] == registry.sha256
    assert record.actor == "airflow:modelops_compliance_gate.compliance_gate (triggered by bob)"


def test_operator_finds_the_version_from_the_triggering_event(
    registry: Registry, modelops_home: Path
) -> None:
    record_validated(modelops_home, registry.sha256)
    event = SimpleNamespace(extra={"model_name": NAME, "version": registry.version, "train_data_sha256": "x"})
    context = task_context("asset_triggered__1", triggering_asset_events={MODEL_CANDIDATE: [event]})
    result = ComplianceGateOperator(task_id="compliance_gate").execute(context)
    assert result["version"] == registry.version and result["verdict"] == "approved"


def test_a_rejection_moves_no_alias_and_is_recorded_before_failing(
    registry: Registry, modelops_home: Path
) -> None:
    # A second version of the same model whose lineage is incomplete and whose data was never validated.
    client = registry.client
    source = client.get_model_version(NAME, registry.version)
    partial_tags = {"train_data_sha256": "d" * 64, "framework": "scikit-learn", "trigger": "manual"}
    MlflowRegistryHook().activate()
    import mlflow

    rejected = str(mlflow.register_model(source.source, NAME, tags=partial_tags).version)
    before = aliases(client)

    with pytest.raises(ComplianceGateFailed) as raised:
        ComplianceGateOperator(
            task_id="compliance_gate", model_version=rejected, outlets=[MODEL_APPROVED]
        ).execute(task_context())
    assert isinstance(raised.value, GateFailed)  # deterministic: Airflow does not retry it

    assert aliases(client) == before
    assert rejected not in before.values()
    tags = client.get_model_version(NAME, rejected).tags
    assert tags["compliance_status"] == "rejected"

    policy = compliance_policy()
    missing = [tag for tag in policy.required_tags if tag not in partial_tags]
    expected_failed = [f"tag:{tag}" for tag in missing] + ["data:validated"]
    (record,) = audit_records(modelops_home, "gate.decided")
    assert record.decision == "rejected" and record.subject == f"model:{NAME}@{rejected}"
    assert record.details["failed"] == expected_failed
    assert record.evidence["gate_report"] == tags["compliance_report_sha256"]

    message = str(raised.value)
    total = len(policy.required_tags) + len(policy.metric_thresholds) + 1
    assert f"{len(expected_failed)} of {total} checks failed" in message
    assert all(name in message for name in expected_failed)
    assert "No alias moved" in message

    local = client.download_artifacts(
        source.run_id, f"compliance/gate_report_v{rejected}.json", str(registry.root)
    )
    assert json.loads(Path(local).read_text())["verdict"] == "rejected"
