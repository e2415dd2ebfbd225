"""The whole lifecycle, stage by stage, with ``dag.test()`` against a real MLflow registry, real files,
a real scoring gateway over HTTP, and the real audit log.

The tests in this module share one stack and run in order: each stage builds on the previous one.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from airflow.utils.state import DagRunState, TaskInstanceState

from modelops.audit import AuditStore
from modelops.data.synthetic import DriftShift, generate_clicks, write_csv
from modelops.data.traffic import simulate_traffic

from .conftest import MODEL_NAME, PROJECT_ROOT, Stack

pytestmark = pytest.mark.e2e

# Facts one test hands to the next (the tests are steps of one story).
facts: dict = {}


def registry(stack: Stack):
    from mlflow import MlflowClient

    return MlflowClient(stack.tracking_uri)


def audit(stack: Stack) -> AuditStore:
    return AuditStore(stack.audit_url)


def task_state(dag_run, task_id: str):
    return next(ti.state for ti in dag_run.get_task_instances() if ti.task_id == task_id)


def test_1_data_validation_snapshots_and_records(stack: Stack) -> None:
    csv = write_csv(generate_clicks(8000, seed=7), stack.root / "incoming" / "ctr_clicks.csv")
    run = stack.run("modelops_data_validation", {"dataset_uri": str(csv)})
    assert run.state == DagRunState.SUCCESS

    record = audit(stack).last(action="dataset.validated")
    assert record.decision == "passed"
    sha = record.subject.rsplit(":", 1)[-1]
    import hashlib

    assert sha == hashlib.sha256(csv.read_bytes()).hexdigest()
    snapshot = Path(record.details["snapshot_uri"].removeprefix("file://"))
    assert snapshot.read_bytes() == csv.read_bytes()
    card = json.loads((snapshot.parent / "data_card.json").read_text())
    assert card["row_count"] == 8000 and card["sha256"] == sha
    facts["sha256"] = sha


def test_1b_defective_data_is_rejected_with_every_problem_named(stack: Stack) -> None:
    bad = write_csv(
        generate_clicks(500, seed=3, defects=["out_of_range"], with_pii=True), stack.root / "bad.csv"
    )
    run = stack.run("modelops_data_validation", {"dataset_uri": str(bad)})
    assert run.state == DagRunState.FAILED
    record = audit(stack).last(action="dataset.validated")
    assert record.decision == "failed"
    problems = " | ".join(record.details["problems"])
    assert "hour_of_day" in problems and "item_price" in problems and "email" in problems
    assert record.details["snapshot_uri"] is None


def test_2_training_registers_a_version_with_lineage(stack: Stack) -> None:
    run = stack.run("modelops_training", {"dataset_sha256": facts["sha256"]})
    assert run.state == DagRunState.SUCCESS
    client = registry(stack)
    version = client.get_model_version_by_alias(MODEL_NAME, "candidate")
    tags = version.tags
    assert tags["train_data_sha256"] == facts["sha256"]
    assert tags["framework"] == "scikit-learn" and tags["framework_version"]
    assert tags["python_version"] and tags["code_commit"]
    assert tags["airflow_dag_id"] == "modelops_training" and tags["airflow_run_id"] == run.run_id
    assert tags["trigger"] == "manual"
    assert "TreePredictor" in tags["skops_trusted_types"]
    metrics = client.get_run(version.run_id).data.metrics
    assert metrics["holdout_roc_auc"] > 0.7
    facts["v1"] = str(version.version)


def test_3_compliance_gate_approves(stack: Stack) -> None:
    run = stack.run("modelops_compliance_gate", {"model_version": facts["v1"]})
    assert run.state == DagRunState.SUCCESS
    client = registry(stack)
    version = client.get_model_version(MODEL_NAME, facts["v1"])
    assert version.tags["compliance_status"] == "approved"
    assert str(client.get_model_version_by_alias(MODEL_NAME, "challenger").version) == facts["v1"]
    local = client.download_artifacts(
        version.run_id, f"compliance/gate_report_v{facts['v1']}.json", str(stack.root)
    )
    report = json.loads(Path(local).read_text())
    assert report["verdict"] == "approved" and all(check["passed"] for check in report["checks"])


def test_4_deployment_serves_through_http(stack: Stack) -> None:
    run = stack.run("modelops_deployment", {"model_version": facts["v1"]})
    assert run.state == DagRunState.SUCCESS
    assert str(registry(stack).get_model_version_by_alias(MODEL_NAME, "champion").version) == facts["v1"]
    row = generate_clicks(1, seed=99).drop(columns=["user_id", "clicked"])
    response = httpx.post(
        f"{stack.gateway_url}/invocations",
        json={"dataframe_records": row.to_dict(orient="records")},
        headers={"X-Caller-Id": "e2e"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Version"] == facts["v1"]
    ((p0, p1),) = response.json()["predictions"]
    assert abs(p0 + p1 - 1) < 1e-6


def test_5_monitoring_ok_on_stationary_traffic_and_critical_on_drift(stack: Stack) -> None:
    start = datetime.now(UTC)
    report = simulate_traffic(stack.gateway_url, requests=80, rows_per_request=5, seed=11)
    end = datetime.now(UTC) + timedelta(seconds=1)
    assert report.ok == 80 and report.failed == 0

    from modelops.serving.prediction_log import PredictionLog

    window = PredictionLog(stack.predictions_url).window(MODEL_NAME, start, end)
    assert len(window) == 400 and set(window["model_version"]) == {facts["v1"]}
    assert {"web-shop", "mobile-app", "email-campaign"} <= set(window["caller_id"])

    run = stack.run(
        "modelops_drift_monitoring", {"window_start": start.isoformat(), "window_end": end.isoformat()}
    )
    assert run.state == DagRunState.SUCCESS
    verdict = audit(stack).last(action="drift.assessed")
    assert verdict.decision == "ok", verdict.details
    assert (
        Path(verdict.details["report_uri"].removeprefix("file://"))
        .read_text()
        .strip()
        .lower()
        .startswith("<!doctype html>")
    )
    assert task_state(run, "request_retraining") == TaskInstanceState.SKIPPED
    artifacts = [a.path for a in registry(stack).list_artifacts(verdict.details["mlflow_run_id"], "drift")]
    assert {"drift/drift_report.html", "drift/assessment.json"} <= set(artifacts)

    start = datetime.now(UTC)
    drift = DriftShift(
        age_shift=15, out_of_range_share=0.2, category_weights={"fashion": 5, "toys": 1}, price_factor=1.5
    )
    simulate_traffic(stack.gateway_url, requests=80, rows_per_request=5, seed=12, shift=drift)
    end = datetime.now(UTC) + timedelta(seconds=1)
    run = stack.run(
        "modelops_drift_monitoring", {"window_start": start.isoformat(), "window_end": end.isoformat()}
    )
    assert run.state == DagRunState.SUCCESS
    verdict = audit(stack).last(action="drift.assessed")
    assert verdict.decision == "critical", verdict.details
    assert "user_age" in verdict.details["drifted_features"]
    assert verdict.details["out_of_range_features"].get("user_age", 0) > 0
    assert task_state(run, "request_retraining") == TaskInstanceState.SUCCESS
    assert audit(stack).last(action="retraining.requested").decision == "requested"


def test_5b_backfilled_hour_reproduces_its_verdict(stack: Stack) -> None:
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
                model_name=MODEL_NAME,
                model_version=facts["v1"],
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
        run = stack.run("modelops_drift_monitoring", logical_date=hour + timedelta(hours=1))
        assert run.state == DagRunState.SUCCESS
        record = audit(stack).last(action="drift.assessed")
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


def test_6_second_version_replaces_the_champion_and_the_first_is_retired(stack: Stack) -> None:
    for dag_id in ("modelops_training", "modelops_compliance_gate", "modelops_deployment"):
        assert stack.run(dag_id).state == DagRunState.SUCCESS, dag_id
    client = registry(stack)
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) != facts["v1"]
    assert str(client.get_model_version_by_alias(MODEL_NAME, "previous_champion").version) == facts["v1"]
    assert client.get_model_version(MODEL_NAME, facts["v1"]).tags["superseded_by"] == str(champion.version)
    facts["v2"] = str(champion.version)

    # Nothing is old enough for the policy, and a dry run changes nothing.
    assert stack.run(
        "modelops_retirement", {"versions": facts["v1"], "reason": "replaced", "dry_run": True}
    ).state == (DagRunState.SUCCESS)
    assert "retired" not in client.get_model_version(MODEL_NAME, facts["v1"]).tags

    # The serving champion is refused.
    run = stack.run("modelops_retirement", {"versions": facts["v2"], "reason": "try the champion"})
    assert run.state == DagRunState.FAILED
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == facts["v2"]

    run = stack.run("modelops_retirement", {"versions": facts["v1"], "reason": "replaced by a retrain"})
    assert run.state == DagRunState.SUCCESS
    tags = client.get_model_version(MODEL_NAME, facts["v1"]).tags
    assert tags["retired"] == "true" and tags["retired_reason"].endswith("replaced by a retrain")
    assert "previous_champion" not in client.get_registered_model(MODEL_NAME).aliases
    archive = Path(tags["retired_archive_uri"].removeprefix("file://"))
    manifest = json.loads((archive / "manifest.json").read_text())
    import hashlib

    assert manifest["files"], "the archive is empty"
    for entry in manifest["files"]:
        assert hashlib.sha256((archive / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    assert any(entry["path"].endswith("MLmodel") for entry in manifest["files"])
    assert any(entry["path"] == "modelops_metadata.json" for entry in manifest["files"])


def test_7_rejected_version_moves_no_alias(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    strict = stack.root / "include-strict"
    shutil.copytree(PROJECT_ROOT / "include", strict)
    policy = strict / "policies" / "compliance.yaml"
    policy.write_text(
        policy.read_text().replace("holdout_roc_auc: {min: 0.65}", "holdout_roc_auc: {min: 0.999}")
    )
    monkeypatch.setenv("MODELOPS_INCLUDE_DIR", str(strict))
    assert stack.run("modelops_training").state == DagRunState.SUCCESS
    client = registry(stack)
    candidate = str(client.get_model_version_by_alias(MODEL_NAME, "candidate").version)
    aliases_before = dict(client.get_registered_model(MODEL_NAME).aliases)

    run = stack.run("modelops_compliance_gate")
    assert run.state == DagRunState.FAILED
    assert client.get_model_version(MODEL_NAME, candidate).tags["compliance_status"] == "rejected"
    assert dict(client.get_registered_model(MODEL_NAME).aliases) == aliases_before
    decision = audit(stack).last(action="gate.decided")
    assert decision.decision == "rejected" and decision.details["failed"] == ["metric:holdout_roc_auc"]

    # Deployment refuses a version the gate did not approve, and the champion keeps serving.
    run = stack.run("modelops_deployment", {"model_version": candidate})
    assert run.state == DagRunState.FAILED
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == facts["v2"]


def test_8_audit_chain_verifies_and_catches_tampering(stack: Stack, tmp_path: Path) -> None:
    store = audit(stack)
    result = store.verify()
    assert result.ok, result.problem
    actions = {record.action for record in store.records()}
    assert {
        "dataset.validated",
        "model.registered",
        "gate.decided",
        "model.deployed",
        "drift.assessed",
        "model.retired",
    } <= actions

    db = Path(stack.audit_url.removeprefix("sqlite:///"))
    edited, deleted = tmp_path / "edited.db", tmp_path / "deleted.db"
    # SQLite's backup API, not a file copy: the log runs in WAL mode, so recent records may still sit
    # in the -wal file beside the database.
    for target in (edited, deleted):
        with sqlite3.connect(db) as source, sqlite3.connect(target) as copy:
            source.backup(copy)
    engine = sa.create_engine(f"sqlite:///{edited}")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE modelops_audit_log SET decision = 'approved' WHERE seq = 3"))
    engine.dispose()
    broken = AuditStore(f"sqlite:///{edited}").verify()
    assert not broken.ok and broken.first_bad_seq == 3

    engine = sa.create_engine(f"sqlite:///{deleted}")
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM modelops_audit_log WHERE seq = 4"))
    engine.dispose()
    broken = AuditStore(f"sqlite:///{deleted}").verify()
    assert not broken.ok and "4" in broken.problem
