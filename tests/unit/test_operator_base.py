"""The base operator: a stage that fails records its own failure before the task fails, and a gate or a
deployment fed bad input records its decision, so no failed decision is missing from the audit log."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from modelops.audit import AuditStore
from modelops.errors import GateFailed
from modelops.operators.base import ModelOpsBaseOperator
from modelops.operators.compliance import ComplianceGateOperator
from modelops.operators.deployment import DeployModelOperator
from modelops.stages.outcome import StageOutcome
from modelops.vocabulary import AuditAction, ComplianceStatus, Decision, Tag, model_subject
from tests.support import free_port, keyring_for_tests, use_sqlite_registry

CTR = "ctr_recommender"


class OutletEvents(dict):
    def __missing__(self, key: Any) -> SimpleNamespace:
        self[key] = SimpleNamespace(extra={})
        return self[key]


def task_context(task_id: str) -> dict[str, Any]:
    return {
        "dag_run": SimpleNamespace(dag_id="test_dag", run_id="manual__1", triggering_user_name=None),
        "ti": SimpleNamespace(task_id=task_id),
        "outlet_events": OutletEvents(),
    }


class FailingStage(ModelOpsBaseOperator):
    audit_action = AuditAction.MODEL_REGISTERED

    def __init__(self, *, error: BaseException, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.error = error

    def audit_subject(self) -> str:
        return model_subject(CTR)

    def run_stage(self, context: Any) -> StageOutcome:
        raise self.error


def audit_records(home: Path, action: AuditAction) -> list:
    store = AuditStore(f"sqlite:///{home / 'audit.db'}", keyring=keyring_for_tests())
    try:
        assert store.verify().ok
        return store.records(action=action)
    finally:
        store.dispose()


def test_an_unexpected_error_is_recorded_without_its_message_then_retried(modelops_home: Path) -> None:
    # A library's message may quote input values: only the error's type is recorded.
    operator = FailingStage(task_id="train", error=ValueError("could not convert 'jane@example.com'"))
    with pytest.raises(ValueError, match="jane@example.com"):
        operator.execute(task_context("train"))
    (record,) = audit_records(modelops_home, AuditAction.MODEL_REGISTERED)
    assert record.decision == Decision.ERROR and record.subject == model_subject(CTR)
    assert record.details["error"] == "ValueError" and record.details["retried_by_airflow"] is True
    assert "jane@example.com" not in json.dumps(record.details)


def test_a_refusal_raised_by_a_stage_is_recorded_and_fails_without_retry(modelops_home: Path) -> None:
    operator = FailingStage(task_id="train", error=GateFailed("no candidate to gate; give model_version"))
    with pytest.raises(AirflowFailException, match="no candidate to gate"):
        operator.execute(task_context("train"))
    (record,) = audit_records(modelops_home, AuditAction.MODEL_REGISTERED)
    assert record.decision == Decision.ERROR and record.details["retried_by_airflow"] is False
    assert record.details["message"] == "no candidate to gate; give model_version"


def test_the_original_error_survives_an_audit_log_that_is_down(
    modelops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODELOPS_AUDIT", json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": 1})
    )
    operator = FailingStage(task_id="train", error=KeyError("train_data_uri"))
    with pytest.raises(KeyError):
        operator.execute(task_context("train"))


@pytest.fixture
def bare_version(modelops_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, str]:
    """A version registered straight into MLflow with no lineage tags at all, as an outside user could:
    (the registry, the version)."""
    _, registry, _ = use_sqlite_registry(tmp_path, monkeypatch)
    registry.ensure_model(CTR, {})
    run_id = registry.log_run(experiment=f"modelops/{CTR}", run_name="by-hand", tags={})
    return registry, registry.register_version(CTR, run_id=run_id, artifact_path="model", tags={}).version


@pytest.mark.parametrize("claimed_sha", [None, "not-a-digest"])
def test_a_version_without_lineage_tags_gets_a_gate_record_rejecting_it(
    modelops_home: Path, bare_version: tuple[Any, str], claimed_sha: str | None
) -> None:
    registry, bare_version = bare_version
    if claimed_sha is not None:  # a tag set by hand to something that is no SHA-256
        registry.set_version_tags(CTR, bare_version, {Tag.TRAIN_DATA_SHA256: claimed_sha})
    operator = ComplianceGateOperator(task_id="evaluate_policy", model=CTR, model_version=bare_version)
    with pytest.raises(AirflowFailException, match="rejected"):
        operator.execute(task_context("evaluate_policy"))
    (record,) = audit_records(modelops_home, AuditAction.GATE_DECIDED)
    assert record.decision == Decision.REJECTED and record.subject == model_subject(CTR, bare_version)
    assert {"provenance:registered_by_training", "lineage"} <= set(record.details["failed"])
    assert "dataset" not in record.evidence


def test_deploying_a_hand_approved_version_without_lineage_is_refused_on_record(
    modelops_home: Path, bare_version: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, bare_version = bare_version
    # Nothing listens there: the refusal must come before any call to the gateway.
    monkeypatch.setenv("AIRFLOW_CONN_MODELOPS_GATEWAY", f"http://127.0.0.1:{free_port()}")
    registry.set_version_tags(CTR, bare_version, {Tag.COMPLIANCE_STATUS: ComplianceStatus.APPROVED})
    operator = DeployModelOperator(task_id="deploy_to_gateway", model=CTR, model_version=bare_version)
    # A compliance_status tag set by hand counts for nothing: there is no gate record.
    with pytest.raises(AirflowFailException, match="no authentic compliance gate decision"):
        operator.execute(task_context("deploy_to_gateway"))
    (record,) = audit_records(modelops_home, AuditAction.MODEL_DEPLOYED)
    assert record.decision == Decision.REFUSED and record.subject == model_subject(CTR, bare_version)
