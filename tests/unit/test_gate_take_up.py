"""Each version is gated by one run: the gate runs up to 8 runs at once (one may wait hours for a person),
and every run's catch-up and the 5-minute sweep see the same undecided versions. Before the take-up, the
20-model benchmark on the Celery stack recorded 42 automatic approvals of 10 versions."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from modelops.audit import AuditStore
from modelops.stages.common import take_up
from modelops.vocabulary import AuditAction, Decision, model_subject
from tests.support import keyring_for_tests

SUBJECT = model_subject("ctr_recommender", 3)
GATE = "modelops_compliance_gate"
WAITING = (Decision.AWAITING_APPROVAL,)


def store_at(url: str) -> AuditStore:
    return AuditStore(url, keyring=keyring_for_tests())


@pytest.fixture
def audit(tmp_path: Path) -> AuditStore:
    store = store_at(f"sqlite:///{tmp_path}/audit.db")
    yield store
    store.dispose()


def by_run(audit: AuditStore, run_id: str, live: Callable[[str, str], bool], **kwargs: object) -> str | None:
    return take_up(
        audit,
        subject=SUBJECT,
        taken_up=AuditAction.GATE_TAKEN_UP,
        decided=AuditAction.GATE_DECIDED,
        actor=f"airflow:{GATE}.plan_gate",
        dag_id=GATE,
        run_id=run_id,
        task_id="plan_gate",
        run_is_live=live,
        **kwargs,  # type: ignore[arg-type]
    )


def decide(audit: AuditStore, run_id: str, decision: str = Decision.APPROVED) -> None:
    audit.append(
        actor="gate",
        action=AuditAction.GATE_DECIDED,
        subject=SUBJECT,
        decision=decision,
        dag_id=GATE,
        run_id=run_id,
        task_id="evaluate_policy",
    )


def taken_up_records(audit: AuditStore) -> list[str | None]:
    return [r.run_id for r in audit.records(action=AuditAction.GATE_TAKEN_UP, subject=SUBJECT)]


def live(*run_ids: str) -> Callable[[str, str], bool]:
    return lambda dag_id, run_id: dag_id == GATE and run_id in run_ids


def test_a_version_a_live_run_took_up_is_left_to_it(audit: AuditStore) -> None:
    assert by_run(audit, "sweep_1", live()) is None
    why = by_run(audit, "asset_2", live("sweep_1"))
    assert why is not None and "run sweep_1 took it up" in why and "has not finished" in why
    assert taken_up_records(audit) == ["sweep_1"]


def test_the_plan_task_retried_keeps_its_version_and_writes_nothing_new(audit: AuditStore) -> None:
    assert by_run(audit, "asset_1", live()) is None
    assert by_run(audit, "asset_1", live("asset_1")) is None
    assert taken_up_records(audit) == ["asset_1"]


def test_a_decided_version_is_not_gated_again_unless_a_person_asks(audit: AuditStore) -> None:
    assert by_run(audit, "asset_1", live()) is None
    decide(audit, "asset_1")
    why = by_run(audit, "sweep_2", live())
    assert why is not None and why.startswith("already decided: approved")
    assert by_run(audit, "manual_3", live(), redo_decided=True) is None
    assert taken_up_records(audit) == ["asset_1", "manual_3"]


def test_a_version_awaiting_approval_is_not_gated_by_a_manual_run_meanwhile(audit: AuditStore) -> None:
    assert by_run(audit, "asset_1", live()) is None
    decide(audit, "asset_1", Decision.AWAITING_APPROVAL)  # its run waits for the approver's answer
    why = by_run(audit, "manual_2", live("asset_1"), redo_decided=True, still_working=WAITING)
    assert why is not None and "run asset_1 took it up" in why and why.endswith("which is awaiting_approval")
    decide(audit, "asset_1", Decision.APPROVED)  # the approver answered
    assert by_run(audit, "manual_3", live("asset_1"), redo_decided=True, still_working=WAITING) is None


def test_a_run_still_waiting_on_another_model_does_not_hold_a_version_whose_evaluation_failed(
    audit: AuditStore,
) -> None:
    """One run gates two models: one waits days for its approver, the other's evaluation failed (MLflow
    was down through the retries) and recorded its error. A person re-gates the failed one meanwhile; the
    sweep leaves it alone (an error needs a person, or it would be re-tried and recorded every 5 minutes)."""
    assert by_run(audit, "asset_1", live()) is None
    decide(audit, "asset_1", Decision.ERROR)
    why = by_run(audit, "sweep_2", live("asset_1"), still_working=WAITING)
    assert why is not None and why.startswith("already decided: error")
    assert by_run(audit, "manual_3", live("asset_1"), redo_decided=True, still_working=WAITING) is None


def test_a_run_that_ended_without_deciding_leaves_the_version_to_the_next(audit: AuditStore) -> None:
    assert by_run(audit, "asset_1", live()) is None  # then its evaluation failed: MLflow was down
    assert by_run(audit, "sweep_2", live()) is None
    records = audit.records(action=AuditAction.GATE_TAKEN_UP, subject=SUBJECT)
    assert [r.run_id for r in records] == ["asset_1", "sweep_2"]
    assert records[-1].details == {"after_run": "asset_1"} and records[-1].decision == Decision.TAKEN_UP


def test_a_forged_take_up_does_not_hold_a_version(audit: AuditStore, tmp_path: Path) -> None:
    assert by_run(audit, "asset_1", live()) is None
    engine = sa.create_engine(f"sqlite:///{tmp_path}/audit.db")
    with engine.begin() as conn:  # someone with database access moves the claim to a run that never ends
        conn.execute(
            sa.text("UPDATE modelops_audit_log SET run_id = 'forever' WHERE action = 'gate.taken_up'")
        )
    engine.dispose()
    assert by_run(audit, "sweep_2", live("forever")) is None


def race(audit_url: str, runs: int, *, whole_model: bool = False) -> list[str | None]:
    """``runs`` plan tasks, each with a store of its own, take the same version (or, as deployment does,
    the same model) up at the same moment, every one of them live."""
    barrier = threading.Barrier(runs)
    answers: list[str | None] = [None] * runs
    run_ids = [f"run_{i}" for i in range(runs)]
    everyone = live(*run_ids)

    def plan(i: int) -> None:
        store = store_at(audit_url)
        try:
            store.count()  # connect before the barrier: the race is over the take-up, not the connection
            barrier.wait()
            if whole_model:
                answers[i] = deploy_by_run(store, run_ids[i], *run_ids)
            else:
                answers[i] = by_run(store, run_ids[i], everyone)
        finally:
            store.dispose()

    threads = [threading.Thread(target=plan, args=(i,)) for i in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return answers


def test_runs_racing_for_one_version_on_sqlite_one_takes_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/race.db"
    store_at(url).dispose()
    answers = race(url, 6)
    assert answers.count(None) == 1
    store = store_at(url)
    assert len(taken_up_records(store)) == 1 and store.verify().ok
    store.dispose()


def test_runs_racing_for_one_version_on_postgresql_one_takes_it(postgres_url: str) -> None:
    store_at(postgres_url).dispose()
    answers = race(postgres_url, 8)
    assert answers.count(None) == 1, answers
    winner = f"run_{answers.index(None)}"
    assert all(f"run {winner} took it up" in why for why in answers if why is not None)
    store = store_at(postgres_url)
    assert taken_up_records(store) == [winner] and store.verify().ok
    store.dispose()


# --- deployment: a whole model, held exactly while its run is live --------------------------------------

DEPLOYMENT = "modelops_deployment"
MODEL = model_subject("ctr_recommender")


def deploy_by_run(audit: AuditStore, run_id: str, *live_runs: str) -> str | None:
    return take_up(
        audit,
        subject=MODEL,
        taken_up=AuditAction.DEPLOYMENT_TAKEN_UP,
        decided=None,
        actor=f"airflow:{DEPLOYMENT}.plan_deployment",
        dag_id=DEPLOYMENT,
        run_id=run_id,
        task_id="plan_deployment",
        run_is_live=lambda dag_id, run_id: dag_id == DEPLOYMENT and run_id in live_runs,
    )


def test_a_model_is_deployed_by_one_live_run_whatever_that_run_records_meanwhile(audit: AuditStore) -> None:
    assert deploy_by_run(audit, "asset_1") is None
    # Its deployment and canary records (other actions, other subjects) do not end the hold: the run does.
    audit.append(
        actor="deploy",
        action=AuditAction.MODEL_DEPLOYED,
        subject=model_subject("ctr_recommender", 3),
        decision=Decision.CANARY_STARTED,
        dag_id=DEPLOYMENT,
        run_id="asset_1",
    )
    why = deploy_by_run(audit, "sweep_2", "asset_1")
    assert why is not None and "run asset_1 took it up" in why
    assert deploy_by_run(audit, "asset_1", "asset_1") is None  # its plan task retried
    assert deploy_by_run(audit, "sweep_3") is None  # asset_1 ended: the model is free
    records = audit.records(action=AuditAction.DEPLOYMENT_TAKEN_UP, subject=MODEL)
    assert [(r.run_id, r.details) for r in records] == [
        ("asset_1", {}),
        ("sweep_3", {"after_run": "asset_1"}),
    ]
    assert not audit.records(action=AuditAction.GATE_TAKEN_UP)


def test_runs_racing_for_one_model_on_postgresql_one_takes_it(postgres_url: str) -> None:
    store_at(postgres_url).dispose()
    answers = race(postgres_url, 6, whole_model=True)
    assert answers.count(None) == 1, answers
    store = store_at(postgres_url)
    records = store.records(action=AuditAction.DEPLOYMENT_TAKEN_UP, subject=MODEL)
    assert [r.run_id for r in records] == [f"run_{answers.index(None)}"] and store.verify().ok
    store.dispose()
