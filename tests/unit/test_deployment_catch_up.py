"""A deployment run deploys what the record says is approved and not yet deployed, not only what its
Asset events say: Airflow 3.3 drops approvals that arrive while the deployment DAG waits for its one
run slot (found on the Celery stack by benchmarks/bench_stack_models.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from modelops.audit import AuditStore
from modelops.settings import Catalog, load_catalog
from modelops.stages.common import plan_versions
from modelops.stages.deployment import undeployed_approvals
from modelops.vocabulary import AuditAction, Decision, EventField, model_subject
from tests.support import keyring_for_tests

CTR, DIABETES = "ctr_recommender", "diabetes_progression"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditStore]:
    store = AuditStore(f"sqlite:///{tmp_path}/audit.db", keyring=keyring_for_tests())
    yield store
    store.dispose()


def record(audit: AuditStore, action: str, model: str, version: int, decision: str, task: str) -> None:
    audit.append(
        actor="test",
        action=action,
        subject=model_subject(model, version),
        decision=decision,
        dag_id="test",
        run_id="test",
        task_id=task,
    )


def approve(audit: AuditStore, model: str, version: int) -> None:
    record(audit, AuditAction.GATE_DECIDED, model, version, Decision.APPROVED, f"gate-{model}-{version}")


def deployed(audit: AuditStore, model: str, version: int, decision: str = Decision.PROMOTED) -> None:
    record(
        audit, AuditAction.MODEL_DEPLOYED, model, version, decision, f"deploy-{model}-{version}-{decision}"
    )


def test_approved_versions_no_deployment_acted_on_are_pending(catalog: Catalog, audit: AuditStore) -> None:
    approve(audit, CTR, 1)
    deployed(audit, CTR, 1)
    approve(audit, CTR, 2)  # its event was dropped
    approve(audit, DIABETES, 1)
    assert undeployed_approvals(catalog, audit) == {CTR: "2", DIABETES: "1"}
    deployed(audit, CTR, 2, Decision.REFUSED)  # acted on: a refusal is on record, not retried here
    assert undeployed_approvals(catalog, audit) == {DIABETES: "1"}


def test_an_approval_older_than_the_champion_is_not_pending(catalog: Catalog, audit: AuditStore) -> None:
    approve(audit, CTR, 1)
    approve(audit, CTR, 2)
    deployed(audit, CTR, 2)  # v1 was approved but superseded before it deployed
    assert undeployed_approvals(catalog, audit) == {}


def test_a_forged_approval_is_not_pending(catalog: Catalog, audit: AuditStore, tmp_path: Path) -> None:
    approve(audit, CTR, 3)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/audit.db")
    with engine.begin() as conn:  # someone with database access edits the record's decision in
        conn.execute(sa.text("update modelops_audit_log set decision = 'approved', hmac = 'x'"))
    engine.dispose()
    assert undeployed_approvals(catalog, audit) == {}


def test_the_plan_adds_pending_versions_to_an_event_run_only(catalog: Catalog) -> None:
    events = [{EventField.MODEL_NAME: CTR, EventField.VERSION: "4"}]
    plan = plan_versions(
        catalog=catalog,
        events=events,
        model=None,
        model_version=None,
        serving_only=True,
        pending={DIABETES: "2"},
    )
    assert plan == [{"model": CTR, "model_version": "4"}, {"model": DIABETES, "model_version": "2"}]
    manual = plan_versions(
        catalog=catalog, events=[], model=CTR, model_version="1", serving_only=True, pending={DIABETES: "2"}
    )
    assert manual == [{"model": CTR, "model_version": "1"}]


def register(audit: AuditStore, model: str, version: int) -> None:
    record(
        audit, AuditAction.MODEL_REGISTERED, model, version, Decision.CANDIDATE, f"train-{model}-{version}"
    )


def test_registered_versions_the_gate_never_decided_are_pending(catalog: Catalog, audit: AuditStore) -> None:
    from modelops.stages.compliance import ungated_candidates

    register(audit, CTR, 1)
    approve(audit, CTR, 1)
    register(audit, CTR, 2)  # its modelops_model_candidate event was lost
    register(audit, DIABETES, 1)
    record(audit, AuditAction.GATE_DECIDED, DIABETES, 1, Decision.AWAITING_APPROVAL, "gate-wait")
    assert ungated_candidates(catalog, audit) == {CTR: "2"}  # a version awaiting its approver is decided on
    record(audit, AuditAction.GATE_DECIDED, CTR, 2, Decision.REJECTED, "gate-reject")
    assert ungated_candidates(catalog, audit) == {}


def test_a_sweep_acts_on_pending_versions_only_and_needs_no_form(catalog: Catalog) -> None:
    assert plan_versions(catalog=catalog, events=[], model=None, model_version=None, sweep=True) == []
    # The form's default model (a scheduled run has no form) does not turn a sweep into a manual run.
    assert plan_versions(catalog=catalog, events=[], model=CTR, model_version=None, sweep=True) == []
    swept = plan_versions(
        catalog=catalog,
        events=[],
        model=None,
        model_version=None,
        sweep=True,
        pending={DIABETES: "3", CTR: "2"},
    )
    assert swept == [{"model": CTR, "model_version": "2"}, {"model": DIABETES, "model_version": "3"}]


def test_an_event_for_a_version_already_acted_on_is_not_acted_on_again(catalog: Catalog) -> None:
    """The catch-up deployed (and a canary rolled back) v2 before its event, which Airflow kept, started
    a run: that run must not put v2 on trial a second time."""
    events = [
        {EventField.MODEL_NAME: DIABETES, EventField.VERSION: "2"},
        {EventField.MODEL_NAME: CTR, EventField.VERSION: "3"},
    ]
    plan = plan_versions(
        catalog=catalog,
        events=events,
        model=None,
        model_version=None,
        serving_only=True,
        acted_on={model_subject(DIABETES, 2)},
    )
    assert plan == [{"model": CTR, "model_version": "3"}]


def test_the_task_sdk_run_type_of_a_timetable_run_is_a_sweep() -> None:
    from airflow.sdk.api.datamodels._generated import DagRunType

    from modelops.operators.planning import is_scheduled

    assert str(DagRunType.SCHEDULED) != "scheduled"  # why the value is compared (found on the stack)
    assert is_scheduled(DagRunType.SCHEDULED) and is_scheduled("scheduled")
    assert not is_scheduled(DagRunType.ASSET_TRIGGERED) and not is_scheduled(DagRunType.MANUAL)
