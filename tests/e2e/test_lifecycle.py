"""The whole lifecycle for two models at once, with ``dag.test()`` against a real MLflow registry, real
files, a real scoring gateway over HTTP and the real audit log.

The ``chain`` fixture drops one file per dataset into its incoming folder, runs the validation DAG as
its schedule would (no conf), and then lets every later stage start from the previous stage's Asset
events through ``Stack.run_queued``, as the scheduler does. Each test asserts on what that fixture (or
the test itself) made, never on what another test left behind, so the tests pass in any order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pandas as pd
import pytest
import sqlalchemy as sa
from airflow.utils.state import DagRunState, TaskInstanceState

from modelops.audit import AuditStore
from modelops.data.sklearn_datasets import write_diabetes_csv
from modelops.data.synthetic import DriftShift, generate_clicks, write_csv
from modelops.data.traffic import deliver_labels, simulate_traffic
from modelops.registry import ModelRegistry
from modelops.settings import load_catalog
from modelops.vocabulary import Alias, AuditAction, Decision, ModelTag, Tag, model_subject
from tests.support import keyring_for_tests

from .conftest import CTR, DIABETES, PROJECT_ROOT, Stack, consumed_extras

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore:Hint. Inferred schema contains integer column:UserWarning"),
]

STAGES = ("modelops_training", "modelops_compliance_gate", "modelops_deployment")
MAPPED_TASK = {
    "modelops_training": "train_and_register",
    "modelops_compliance_gate": "evaluate_policy",
    "modelops_deployment": "deploy_to_gateway",
}


def registry(stack: Stack) -> ModelRegistry:
    return ModelRegistry(stack.tracking_uri)


def audit(stack: Stack) -> AuditStore:
    return AuditStore(stack.audit_url, keyring=keyring_for_tests())


def mapped_states(run, task_id: str) -> dict[str, str]:
    """Rendered map index (the model or dataset name) -> state, for one mapped task of a run."""
    return {ti.rendered_map_index: ti.state for ti in run.get_task_instances() if ti.task_id == task_id}


def drop(stack: Stack, dataset: str, name: str, write) -> Path:
    """Write a file into a dataset's incoming folder the way a producer should: write, then rename."""
    folder = stack.incoming / dataset
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{name}.partial"
    write(partial)
    target = folder / name
    partial.rename(target)
    return target


@dataclass(frozen=True)
class Chain:
    versions: dict[str, str]
    files: dict[str, Path]
    runs: dict[str, list]


@pytest.fixture(scope="module")
def chain(stack: Stack) -> Chain:
    """Two new dataset files, then the chain to two serving versions with no hand trigger after the poll."""
    stack.clear_queue()
    files = {
        "ctr_clicks": drop(
            stack, "ctr_clicks", "clicks-1.csv", lambda p: write_csv(generate_clicks(6000, seed=7), p)
        ),
        "diabetes": drop(stack, "diabetes", "diabetes-1.csv", write_diabetes_csv),
    }
    validation = stack.run("modelops_data_validation")
    assert validation.state == DagRunState.SUCCESS
    runs: dict[str, list] = {"modelops_data_validation": [validation]}
    for run in stack.run_queued():
        runs.setdefault(run.dag_id, []).append(run)
    versions = {}
    for name in (CTR, DIABETES):
        champion = registry(stack).version_by_alias(name, Alias.CHAMPION)
        assert champion is not None, f"{name} has no champion after the chain: {runs}"
        versions[name] = champion.version
    return Chain(versions=versions, files=files, runs=runs)


def test_each_stage_starts_from_the_previous_stage_events_for_both_models(stack: Stack, chain: Chain) -> None:
    assert mapped_states(chain.runs["modelops_data_validation"][0], "validate_dataset") == {
        "ctr_clicks": TaskInstanceState.SUCCESS,
        "diabetes": TaskInstanceState.SUCCESS,
    }
    for dag_id in STAGES:
        runs = chain.runs.get(dag_id)
        assert runs, f"{dag_id} never ran from an Asset event: its schedule= is miswired"
        states: dict[str, str] = {}
        for run in runs:
            assert run.state == DagRunState.SUCCESS, dag_id
            extras = consumed_extras(run)
            assert extras, f"{dag_id} ran without consuming an event"
            # Every event about a model names it.
            assert all(extra.get("model_name") or extra.get("model_names") for extra in extras), extras
            states.update(mapped_states(run, MAPPED_TASK[dag_id]))
        assert states == {CTR: TaskInstanceState.SUCCESS, DIABETES: TaskInstanceState.SUCCESS}, dag_id


def test_the_high_risk_model_waited_for_its_approver_and_the_record_says_who(
    stack: Stack, chain: Chain
) -> None:
    """The strict policy asks a person: the gate task waited in awaiting_input until the approver answered
    through Airflow's REST API; Airflow refused the answer of a user who is not an approver (403)."""
    version = chain.versions[DIABETES]
    answers = [entry for entry in stack.approvals.log if entry["status"] in (200, 403)]
    assert {"user": "intern", "status": 403} in [{k: e[k] for k in ("user", "status")} for e in answers]
    assert any(e["user"] == "risk_officer" and e["status"] == 200 for e in answers)
    records = audit(stack).records(action=AuditAction.GATE_DECIDED, subject=model_subject(DIABETES, version))
    assert [r.decision for r in records] == ["awaiting_approval", "approved"]
    approval = records[-1].details["approval"]
    assert approval["mode"] == "human" and approval["by"] == "risk_officer"
    assert approval["comment"] == "Model card reviewed."
    # The medium-risk model was approved automatically, recorded as such.
    (ctr,) = audit(stack).records(
        action=AuditAction.GATE_DECIDED, subject=model_subject(CTR, chain.versions[CTR])
    )
    assert ctr.decision == "approved" and ctr.details["approval"]["mode"] == "automatic"
    # Each version was taken up by one gate run, the run that decided on it.
    for name in (CTR, DIABETES):
        subject = model_subject(name, chain.versions[name])
        (taken,) = audit(stack).records(action=AuditAction.GATE_TAKEN_UP, subject=subject)
        decided = audit(stack).records(action=AuditAction.GATE_DECIDED, subject=subject)
        assert {r.run_id for r in decided} == {taken.run_id} and taken.seq < decided[0].seq


def test_validation_snapshots_each_file_under_its_own_dataset(stack: Stack, chain: Chain) -> None:
    for dataset, csv in chain.files.items():
        sha = hashlib.sha256(csv.read_bytes()).hexdigest()
        record = audit(stack).last(action=AuditAction.DATASET_VALIDATED, subject=f"dataset:{sha}")
        assert record is not None and record.decision == Decision.PASSED
        assert record.details["dataset"] == dataset
        snapshot = Path(record.details["snapshot_uri"].removeprefix("file://"))
        assert snapshot.read_bytes() == csv.read_bytes()
        card = json.loads((snapshot.parent / "data_card.json").read_text())
        assert card["sha256"] == sha
    # Polling again finds nothing new: a file is validated once.
    again = stack.run("modelops_data_validation")
    assert again.state == DagRunState.SUCCESS
    # Nothing to map over: the mapped task is skipped, no file is validated twice.
    assert TaskInstanceState.SUCCESS not in mapped_states(again, "validate_dataset").values()


def test_each_model_is_trained_on_its_own_data_with_lineage(stack: Stack, chain: Chain) -> None:
    reg = registry(stack)
    expected = {CTR: ("ctr_clicks", "holdout_roc_auc"), DIABETES: ("diabetes", "holdout_rmse")}
    for name, (dataset, metric) in expected.items():
        version = reg.version(name, chain.versions[name])
        sha = hashlib.sha256(chain.files[dataset].read_bytes()).hexdigest()
        assert version.tags[Tag.TRAIN_DATA_SHA256] == sha
        assert version.tags[Tag.DATASET] == dataset and version.tags[Tag.MODEL_SPEC] == name
        assert version.tags[Tag.TRIGGER] == "new_data"
        assert version.tags[Tag.COMPLIANCE_STATUS] == "approved"
        assert metric in reg.run_metrics(version.run_id)
        model = reg.model(name)
        assert model.tags[ModelTag.DATASET] == dataset and model.tags[ModelTag.OWNER]
        assert model.tags[ModelTag.RISK_TIER] in {"medium", "high"}
    assert reg.model(DIABETES).tags[ModelTag.COMPLIANCE_POLICY].startswith("strict@")
    # Each model in its own experiment.
    runs = {name: reg.run(reg.version(name, v).run_id) for name, v in chain.versions.items()}
    assert runs[CTR].artifact_uri.split("/artifacts/")[1].split("/")[0] == CTR
    assert runs[DIABETES].artifact_uri.split("/artifacts/")[1].split("/")[0] == DIABETES


def test_both_models_score_through_the_gateway(stack: Stack, chain: Chain) -> None:
    reg = registry(stack)
    row = generate_clicks(1, seed=99).drop(columns=["user_id", "clicked"])
    default = httpx.post(
        f"{stack.gateway_url}/invocations",
        json={"dataframe_records": row.to_dict(orient="records")},
        headers=stack.key_headers("growth-marketing"),
    )
    assert default.status_code == 200, default.text
    assert default.headers["X-Model-Version"] == reg.version_by_alias(CTR, Alias.CHAMPION).version
    ((p0, p1),) = default.json()["predictions"]
    assert abs(p0 + p1 - 1) < 1e-6

    patient = {
        "age": 50,
        "sex": 1,
        "bmi": 27.5,
        "bp": 95.0,
        "s1": 190,
        "s2": 115.0,
        "s3": 48.0,
        "s4": 4.0,
        "s5": 4.6,
        "s6": 90,
    }
    scored = httpx.post(
        f"{stack.gateway_url}/models/{DIABETES}/invocations",
        json={"dataframe_records": [patient]},
        headers=stack.key_headers("care-management"),
    )
    assert scored.status_code == 200, scored.text
    (progression,) = scored.json()["predictions"]
    assert 25 <= float(progression) <= 346


def _traffic_window(stack: Stack, **traffic) -> tuple[datetime, datetime]:
    start = datetime.now(UTC)
    report = simulate_traffic(stack.gateway_url, requests=60, rows_per_request=5, **traffic)
    assert report.failed == 0
    return start, datetime.now(UTC) + timedelta(seconds=1)


def test_drift_on_one_model_retrains_that_model_only(
    stack: Stack, chain: Chain, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack.clear_queue()
    reg = registry(stack)
    diabetes_versions = [v.version for v in reg.versions(DIABETES)]

    start, end = _traffic_window(stack, seed=11)
    run = stack.run(
        "modelops_drift_monitoring",
        {"models": [CTR], "window_start": start.isoformat(), "window_end": end.isoformat()},
    )
    assert run.state == DagRunState.SUCCESS
    assert mapped_states(run, "assess_drift") == {CTR: TaskInstanceState.SUCCESS}
    verdict = audit(stack).last(
        action=AuditAction.DRIFT_ASSESSED, subject=model_subject(CTR, chain.versions[CTR])
    )
    assert verdict.decision == "ok", verdict.details
    # The first window set the version's reference (its training data, during its cold start), with the
    # model's own outputs on it: stationary traffic shows no prediction drift.
    reference = audit(stack).last(
        action=AuditAction.MONITORING_REFERENCE_SET, subject=model_subject(CTR, chain.versions[CTR])
    )
    assert reference.decision == "training_data", reference.details
    assert verdict.details["reference"]["profile_sha256"] == reference.evidence["profile"]
    assert verdict.details["prediction_drift"]["drifted"] is False, verdict.details["prediction_drift"]
    assert {ti.state for ti in run.get_task_instances() if ti.task_id == "request_retraining"} == {
        TaskInstanceState.SKIPPED
    }

    # Drifted traffic whose users then click far less: the delayed labels arrive before the hour is assessed.
    drift = DriftShift(
        age_shift=15,
        out_of_range_share=0.2,
        category_weights={"fashion": 5, "toys": 1},
        price_factor=1.5,
        click_logit_shift=-2.5,
    )
    start = datetime.now(UTC)
    report = simulate_traffic(stack.gateway_url, requests=60, rows_per_request=5, seed=12, shift=drift)
    assert report.failed == 0
    deliver_labels(stack.gateway_url, report.pending_labels)
    end = datetime.now(UTC) + timedelta(seconds=1)
    run = stack.run(
        "modelops_drift_monitoring",
        {"models": [], "window_start": start.isoformat(), "window_end": end.isoformat()},
    )
    assert run.state == DagRunState.SUCCESS
    # Every serving model is assessed; the diabetes model had no traffic in the window.
    assert set(mapped_states(run, "assess_drift")) == {CTR, DIABETES}
    critical = audit(stack).last(
        action=AuditAction.DRIFT_ASSESSED, subject=model_subject(CTR, chain.versions[CTR])
    )
    assert critical.decision == "critical" and "user_age" in critical.details["drifted_features"]
    assert critical.details["business"]["status"] == "measured" and critical.details["business"]["drop"] > 0.3
    # The owners were alerted through the outbox, and the alert is on record with its delivery.
    alert = audit(stack).last(
        action=AuditAction.ALERT_NOTIFIED, subject=model_subject(CTR, chain.versions[CTR])
    )
    assert alert.decision == "sent" and alert.details["tier"] == "critical"
    outbox = [json.loads(line) for line in (stack.home / "outbox" / "alerts.jsonl").read_text().splitlines()]
    assert any(item["tier"] == "critical" and item["model_name"] == CTR for item in outbox)
    # v1 is the model's first champion: there is nothing earlier to put back, which is on record.
    refused = audit(stack).last(
        action=AuditAction.MODEL_ROLLED_BACK, subject=model_subject(CTR, chain.versions[CTR])
    )
    assert refused.decision == "refused" and "no earlier approved champion" in refused.details["reason"]
    quiet = audit(stack).last(
        action=AuditAction.DRIFT_ASSESSED, subject=model_subject(DIABETES, chain.versions[DIABETES])
    )
    assert quiet.decision == "insufficient_data"

    # The retrained version goes live as a canary beside v1: callers score while it soaks.
    quick_canaries(stack.root, monkeypatch)
    rows = generate_clicks(200, seed=13)[load_catalog().model(CTR).features].to_dict(orient="records")
    with callers_scoring(stack, CTR, load_catalog().model(CTR).team, rows):
        retrained = stack.run_queued()
    training = [r for r in retrained if r.dag_id == "modelops_training"]
    assert training and all(r.state == DagRunState.SUCCESS for r in retrained)
    assert set(mapped_states(training[0], "train_and_register")) == {CTR}
    champion = reg.version_by_alias(CTR, Alias.CHAMPION)
    assert int(champion.version) > int(chain.versions[CTR])
    assert champion.tags[Tag.TRIGGER] == "retraining_request"
    # Retrained on the click data (its own dataset), not on the diabetes file validated later.
    assert champion.tags[Tag.DATASET] == "ctr_clicks"
    assert [v.version for v in reg.versions(DIABETES)] == diabetes_versions


def test_backfilled_hour_reproduces_its_verdict(stack: Stack, chain: Chain) -> None:
    """A past hour's predictions assessed twice through the data interval give the same verdict."""
    from modelops.serving.prediction_log import PredictionLog, PredictionRecord

    log = PredictionLog(stack.predictions_url)
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    rows = generate_clicks(300, seed=21).drop(columns=["user_id", "clicked"])
    for index, chunk in enumerate(range(0, 300, 3)):
        log.record(
            PredictionRecord(
                request_id=uuid.uuid4().hex,
                received_at=hour + timedelta(seconds=10 * index),
                caller_id="backfill",
                model_name=CTR,
                model_version=chain.versions[CTR],
                status_code=200,
                latency_ms=1.0,
                n_rows=3,
                inputs=rows.iloc[chunk : chunk + 3].to_dict(orient="records"),
                outputs=[[0.8, 0.2]] * 3,
            )
        )
    verdicts = []
    for _ in range(2):
        # run_after 11:00 gives the data interval [10:00, 11:00).
        run = stack.run(
            "modelops_drift_monitoring", {"models": [CTR]}, logical_date=hour + timedelta(hours=1)
        )
        assert run.state == DagRunState.SUCCESS
        record = audit(stack).last(
            action=AuditAction.DRIFT_ASSESSED, subject=model_subject(CTR, chain.versions[CTR])
        )
        assert record.details["window_start"] == hour.isoformat()
        verdicts.append(
            (
                record.decision,
                record.details["rows"],
                record.details["drift_share"],
                record.details["mlflow_run_id"],
            )
        )
    # Same verdict, and the rerun of the window reused its MLflow run rather than adding another.
    assert verdicts[0] == verdicts[1] and verdicts[0][1] == 300


def quick_canaries(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped specs with a 6-second soak (the demo's is a minute): the canary still defers and compares."""
    include = root / f"include-quick-canary-{uuid.uuid4().hex[:6]}"
    shutil.copytree(PROJECT_ROOT / "include", include)
    for spec in (include / "models").glob("*.yaml"):
        spec.write_text(spec.read_text().replace("soak_minutes: 1\n", "soak_minutes: 0.1\n"))
    monkeypatch.setenv("MODELOPS_INCLUDE_DIR", str(include))


@contextmanager
def callers_scoring(stack: Stack, model: str, team: str, rows: list[dict]) -> Iterator[list[int]]:
    """Callers scoring ``model`` one row at a time from a thread, each end user with its own routing key,
    while the block runs (a canary needs traffic to compare); yields the status codes seen so far."""
    statuses: list[int] = []
    stop = threading.Event()

    def score() -> None:
        with httpx.Client(base_url=stack.gateway_url, headers=stack.key_headers(team), timeout=30) as client:
            index = 0
            while not stop.is_set():
                row = rows[index % len(rows)]
                response = client.post(
                    f"/models/{model}/invocations",
                    json={"dataframe_records": [row]},
                    headers={"X-Routing-Key": f"user-{index % 50}"},
                )
                statuses.append(response.status_code)
                index += 1
                stop.wait(0.05)

    thread = threading.Thread(target=score, name="e2e-callers", daemon=True)
    thread.start()
    try:
        yield statuses
    finally:
        stop.set()
        thread.join(timeout=30)


def _new_champion_by_hand(
    stack: Stack, model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str]:
    """Train, gate and deploy a new version of ``model`` through the trigger forms; (old, new) champion.

    A champion serves, so the new version goes live as a canary: callers score while the deployment run's
    canary task soaks (deferred: ``dag.test()`` runs its trigger in process), then it is promoted.
    """
    quick_canaries(tmp_path, monkeypatch)
    reg = registry(stack)
    old = reg.version_by_alias(model, Alias.CHAMPION).version
    for dag_id in STAGES[:-1]:
        assert stack.run(dag_id, {"model": model}).state == DagRunState.SUCCESS, dag_id
    csv = tmp_path / "callers.csv"
    if model == DIABETES:
        write_diabetes_csv(csv)
    else:
        write_csv(generate_clicks(200, seed=11), csv)
    spec = load_catalog().model(model)
    rows = pd.read_csv(csv)[spec.features].head(200).to_dict(orient="records")
    with callers_scoring(stack, model, spec.team, rows) as statuses:
        run = stack.run("modelops_deployment", {"model": model})
    assert run.state == DagRunState.SUCCESS
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    stack.clear_queue()
    new = reg.version_by_alias(model, Alias.CHAMPION).version
    assert new != old
    decided = audit(stack).last(action=AuditAction.TRAFFIC_SHARE_SET, subject=model_subject(model, new))
    assert decided.decision == Decision.PROMOTED, decided.details
    started = [
        r
        for r in audit(stack).records(action=AuditAction.TRAFFIC_SHARE_SET, subject=model_subject(model, new))
        if r.decision == Decision.CANARY_STARTED
    ]
    assert len(started) == 1 and started[0].details["challenger_share"] == spec.serving.canary.initial_share
    evaluation = decided.details["evaluation"]
    assert evaluation["champion"]["calls"] >= spec.serving.canary.min_calls
    assert evaluation["challenger"]["calls"] >= spec.serving.canary.min_calls
    return old, new


def test_retirement_archives_a_superseded_version_and_never_the_champion(
    stack: Stack, chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = registry(stack)
    old, new = _new_champion_by_hand(stack, DIABETES, tmp_path, monkeypatch)
    assert reg.version_by_alias(DIABETES, Alias.PREVIOUS_CHAMPION).version == old
    assert reg.version(DIABETES, old).tags[Tag.SUPERSEDED_BY] == new

    dry = stack.run(
        "modelops_retirement",
        {"models": [DIABETES], "versions": [int(old)], "reason": "replaced", "dry_run": True},
    )
    assert dry.state == DagRunState.SUCCESS
    assert Tag.RETIRED not in reg.version(DIABETES, old).tags

    refused = stack.run(
        "modelops_retirement", {"models": [DIABETES], "versions": [int(new)], "reason": "try it"}
    )
    assert refused.state == DagRunState.FAILED
    assert reg.version_by_alias(DIABETES, Alias.CHAMPION).version == new

    done = stack.run(
        "modelops_retirement",
        {"models": [DIABETES], "versions": [int(old)], "reason": "replaced by a retrain"},
    )
    assert done.state == DagRunState.SUCCESS
    tags = reg.version(DIABETES, old).tags
    assert tags[Tag.RETIRED] == "true" and tags[Tag.RETIRED_REASON].endswith("replaced by a retrain")
    assert Alias.PREVIOUS_CHAMPION not in reg.aliases(DIABETES)
    archive = Path(tags[Tag.RETIRED_ARCHIVE_URI].removeprefix("file://"))
    manifest = json.loads((archive / "manifest.json").read_text())
    assert manifest["files"], "the archive is empty"
    for entry in manifest["files"]:
        assert hashlib.sha256((archive / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    assert any(entry["path"].endswith("MLmodel") for entry in manifest["files"])
    # The monthly run over every registered model leaves the other model alone.
    monthly = stack.run(
        "modelops_retirement", {"models": [], "versions": [], "reason": None, "dry_run": True}
    )
    assert monthly.state == DagRunState.SUCCESS
    assert {CTR, DIABETES} <= set(mapped_states(monthly, "retire_versions"))


def running_run(dag_id: str) -> str:
    """A run of ``dag_id`` in state running in Airflow's metadata database; its run id."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    now = datetime.now(UTC)
    run_id = f"manual__{now.isoformat()}"
    with create_session() as session:
        session.add(
            DagRun(
                dag_id=dag_id,
                run_id=run_id,
                run_type="manual",
                state=DagRunState.RUNNING,
                run_after=now,
                start_date=now,
            )
        )
    return run_id


def running_run_holding(stack: Stack, dag_id: str, task_id: str, action: str, subject: str) -> str:
    """A running run of ``dag_id`` whose plan task took ``subject`` up (the record as that task writes
    it); its run id."""
    run_id = running_run(dag_id)
    audit(stack).append(
        actor=f"airflow:{dag_id}.{task_id}",
        action=action,
        subject=subject,
        decision=Decision.TAKEN_UP,
        dag_id=dag_id,
        run_id=run_id,
        task_id=task_id,
    )
    return run_id


def set_run_state(dag_id: str, run_id: str, state: DagRunState) -> None:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        session.execute(
            sa.update(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id).values(state=state)
        )


def task_states(run) -> dict[str, str | None]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.execute(
            sa.select(TaskInstance.task_id, TaskInstance.state).where(
                TaskInstance.dag_id == run.dag_id, TaskInstance.run_id == run.run_id
            )
        ).all()
    return {task_id: state for task_id, state in rows}


def test_rejected_version_moves_no_alias(stack: Stack, chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    strict = stack.root / f"include-strict-{uuid.uuid4().hex[:6]}"
    shutil.copytree(PROJECT_ROOT / "include", strict)
    spec = strict / "models" / f"{CTR}.yaml"
    spec.write_text(spec.read_text().replace("holdout_roc_auc: {min: 0.65}", "holdout_roc_auc: {min: 0.999}"))
    monkeypatch.setenv("MODELOPS_INCLUDE_DIR", str(strict))
    reg = registry(stack)
    champion = reg.version_by_alias(CTR, Alias.CHAMPION).version

    assert stack.run("modelops_training", {"model": CTR}).state == DagRunState.SUCCESS
    candidate = reg.version_by_alias(CTR, Alias.CANDIDATE).version
    aliases_before = reg.aliases(CTR)
    (gate,) = [r for r in stack.run_queued() if r.dag_id == "modelops_compliance_gate"]
    assert gate.state == DagRunState.FAILED
    assert reg.version(CTR, candidate).tags[Tag.COMPLIANCE_STATUS] == "rejected"
    assert reg.aliases(CTR) == aliases_before
    decision = audit(stack).last(action=AuditAction.GATE_DECIDED, subject=model_subject(CTR, candidate))
    assert decision.decision == "rejected"
    assert decision.details["failed"] == ["metrics"]
    # A person asks the gate again: the rejected run decided, so it no longer holds the version.
    subject = model_subject(CTR, candidate)
    again = stack.run("modelops_compliance_gate", {"model": CTR, "model_version": int(candidate)})
    assert again.state == DagRunState.FAILED
    taken = audit(stack).records(action=AuditAction.GATE_TAKEN_UP, subject=subject)
    assert [r.run_id for r in taken] == [gate.run_id, again.run_id]
    assert taken[-1].details == {"after_run": gate.run_id}
    # A run that took the version up and has not decided yet holds it while it runs: a person's manual run
    # is refused at its plan, naming that run. (Its take-up is written as its plan task writes one.)
    busy = running_run_holding(
        stack, "modelops_compliance_gate", "plan_gate", AuditAction.GATE_TAKEN_UP, subject
    )
    held = stack.run("modelops_compliance_gate", {"model": CTR, "model_version": int(candidate)})
    assert held.state == DagRunState.FAILED
    assert task_states(held)["plan_gate"] == TaskInstanceState.FAILED
    # Once that run has ended without deciding, the version is free again.
    set_run_state("modelops_compliance_gate", busy, DagRunState.FAILED)
    third = stack.run("modelops_compliance_gate", {"model": CTR, "model_version": int(candidate)})
    assert third.state == DagRunState.FAILED  # rejected again, by the same strict metric bound
    taken = audit(stack).records(action=AuditAction.GATE_TAKEN_UP, subject=subject)
    assert [r.run_id for r in taken] == [gate.run_id, again.run_id, busy, third.run_id]
    assert taken[-1].details == {"after_run": busy}
    decided = audit(stack).records(action=AuditAction.GATE_DECIDED, subject=subject)
    assert [r.run_id for r in decided] == [gate.run_id, again.run_id, third.run_id]

    # Deployment holds a whole model while its run is live (a canary may soak for hours): a manual run of
    # a model another live deployment run took up fails at its plan and records nothing on the version.
    deploying = running_run_holding(
        stack, "modelops_deployment", "plan_deployment", AuditAction.DEPLOYMENT_TAKEN_UP, model_subject(CTR)
    )
    held = stack.run("modelops_deployment", {"model": CTR, "model_version": int(candidate)})
    assert held.state == DagRunState.FAILED
    assert task_states(held)["plan_deployment"] == TaskInstanceState.FAILED
    assert audit(stack).last(action=AuditAction.MODEL_DEPLOYED, subject=subject) is None
    set_run_state("modelops_deployment", deploying, DagRunState.SUCCESS)

    # Deployment refuses a version the gate did not approve, and the champion keeps serving.
    run = stack.run("modelops_deployment", {"model": CTR, "model_version": int(candidate)})
    assert run.state == DagRunState.FAILED
    taken = audit(stack).records(action=AuditAction.DEPLOYMENT_TAKEN_UP, subject=model_subject(CTR))
    assert [r.run_id for r in taken][-2:] == [deploying, run.run_id] and taken[-1].details[
        "after_run"
    ] == deploying
    assert reg.version_by_alias(CTR, Alias.CHAMPION).version == champion
    refusal = audit(stack).last(action=AuditAction.MODEL_DEPLOYED, subject=model_subject(CTR, candidate))
    assert refusal.decision == "refused"


def test_audit_chain_verifies_and_catches_tampering(stack: Stack, chain: Chain, tmp_path: Path) -> None:
    from modelops.audit.anchors import anchor_store_from_uri

    store = audit(stack)
    anchors = anchor_store_from_uri(os.environ["MODELOPS_AUDIT_ANCHORS"])
    result = store.verify(anchors)
    assert result.ok, result.problem
    # Every decision of the run anchored the head on the way (only the newest may be pending).
    assert result.anchors_checked >= 5 and result.unanchored == 0
    records = store.records()
    assert {
        AuditAction.DATASET_VALIDATED,
        AuditAction.MODEL_REGISTERED,
        AuditAction.GATE_DECIDED,
        AuditAction.MODEL_DEPLOYED,
    } <= {record.action for record in records}
    gate_seq = next(r.seq for r in records if r.action == AuditAction.GATE_DECIDED)
    deploy_seq = next(r.seq for r in records if r.action == AuditAction.MODEL_DEPLOYED)

    db = Path(stack.audit_url.removeprefix("sqlite:///"))
    edited, deleted = tmp_path / "edited.db", tmp_path / "deleted.db"
    # SQLite's backup API, not a file copy: the log runs in WAL mode, so recent records may still sit
    # in the -wal file beside the database.
    for target in (edited, deleted):
        with sqlite3.connect(db) as source, sqlite3.connect(target) as copy:
            source.backup(copy)
    engine = sa.create_engine(f"sqlite:///{edited}")
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE modelops_audit_log SET decision = 'approved' WHERE seq = :seq"),
            {"seq": deploy_seq},
        )
    engine.dispose()
    broken = AuditStore(f"sqlite:///{edited}", keyring=keyring_for_tests()).verify()
    assert not broken.ok and broken.first_bad_seq == deploy_seq

    engine = sa.create_engine(f"sqlite:///{deleted}")
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM modelops_audit_log WHERE seq = :seq"), {"seq": gate_seq})
    engine.dispose()
    broken = AuditStore(f"sqlite:///{deleted}", keyring=keyring_for_tests()).verify()
    assert not broken.ok and str(gate_seq) in broken.problem

    # The newest records deleted (what hides a deployment): only the anchors catch it.
    truncated = tmp_path / "truncated.db"
    with sqlite3.connect(db) as source, sqlite3.connect(truncated) as copy:
        source.backup(copy)
    engine = sa.create_engine(f"sqlite:///{truncated}")
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM modelops_audit_log WHERE seq > :seq"), {"seq": records[-1].seq - 3})
    engine.dispose()
    assert AuditStore(f"sqlite:///{truncated}", keyring=keyring_for_tests()).verify().ok  # chain alone: fine
    broken = AuditStore(f"sqlite:///{truncated}", keyring=keyring_for_tests()).verify(anchors)
    assert not broken.ok and "were deleted, or the log was restored from an older backup" in broken.problem
