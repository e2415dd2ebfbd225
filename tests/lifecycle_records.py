"""A real audit log (SQLite, the test keyring) holding the records the stages write over one model's life,
with the details and evidence they really carry (copied from the stage functions), plus the files some of
them name (dataset snapshot, data card, archive manifest). For the audit query and lineage tests."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from modelops.audit import AuditStore
from modelops.evidence import CHALLENGER_FIELD, CHAMPION_FIELD, SHARE_FIELD, evidence_summary
from modelops.stages.outcome import sha256_json
from modelops.vocabulary import AuditAction, Decision, Tag, dataset_subject, model_subject
from tests.support import keyring_for_tests

MODEL = "ctr_recommender"
OTHER_MODEL = "diabetes_progression"
CALLER = "growth:growth-1a2b3c"
BATCH_CALLER = "batch:modelops_batch_scoring/manual__2026-11-20T09:00:00+00:00"
APPROVER = "risk_officer"
FILES_V1 = {"MLmodel": "1" * 64, "model.skops": "2" * 64, "training_ranges.json": "3" * 64}
FILES_V2 = {"MLmodel": "4" * 64, "model.skops": "5" * 64, "training_ranges.json": "6" * 64}


@dataclass
class Lifecycle:
    store: AuditStore
    url: str
    dataset_sha256: str
    snapshot: Path
    data_card: Path
    archive: Path
    seqs: dict[str, int] = field(default_factory=dict)
    """Name of a step -> the seq of its record."""


def _run(dag_id: str, day: int) -> dict[str, str]:
    return {"dag_id": dag_id, "run_id": f"manual__2026-11-{day:02d}T09:00:00+00:00"}


def _tags(sha: str, dag: dict[str, str]) -> dict[str, str]:
    return {
        Tag.TRAIN_DATA_SHA256: sha,
        Tag.TRAIN_DATA_URI: "",
        Tag.DATASET: "ctr_events",
        Tag.FRAMEWORK: "scikit-learn",
        Tag.FRAMEWORK_VERSION: "1.7.2",
        Tag.PYTHON_VERSION: "3.12.8",
        Tag.CODE_COMMIT: "a" * 40,
        Tag.AIRFLOW_DAG_ID: dag["dag_id"],
        Tag.AIRFLOW_RUN_ID: dag["run_id"],
        Tag.TRIGGER: "new_data",
        Tag.MODEL_SPEC: MODEL,
        Tag.TASK: "binary_classification",
        Tag.ESTIMATOR: "sklearn.linear_model.LogisticRegression",
        Tag.SKOPS_TRUSTED_TYPES: "[]",
    }


def build_lifecycle(tmp_path: Path) -> Lifecycle:
    """Validation, two trainings, the gate (automatic, then a person's approval), a first deployment, a canary
    promoted, monitoring with an alert, a batch scoring, a rollback on a critical verdict, v2 retired."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    store = AuditStore(url, keyring=keyring_for_tests())
    snapshot_dir = tmp_path / "datasets" / "ctr_events"
    snapshot_dir.mkdir(parents=True)
    snapshot = snapshot_dir / "data.csv"
    snapshot.write_text("user_age,clicked\n31,1\n45,0\n")
    sha = hashlib.sha256(snapshot.read_bytes()).hexdigest()
    card = snapshot_dir / "data_card.json"
    card.write_text(json.dumps({"dataset": "ctr_events", "sha256": sha, "row_count": 2}, indent=2))
    life = Lifecycle(store, url, sha, snapshot, card, tmp_path / "archive" / MODEL / "v2")
    seqs = life.seqs

    def add(
        step: str,
        actor: str,
        action: str,
        subject: str,
        decision: str,
        dag: dict[str, str] | None = None,
        **content: Any,
    ) -> None:
        record = store.append(
            actor=actor,
            action=action,
            subject=subject,
            decision=decision,
            task_id=actor.rpartition(".")[2],
            **(dag or {}),
            **content,
        )
        seqs[step] = record.seq

    validation = _run("modelops_data_validation", 1)
    add(
        "validated",
        "airflow:modelops_data_validation.validate",
        AuditAction.DATASET_VALIDATED,
        dataset_subject(sha),
        Decision.PASSED,
        validation,
        details={
            "dataset": "ctr_events",
            "uri": "/data/incoming/ctr_events.csv",
            "snapshot_uri": str(snapshot),
            "data_card_uri": str(card),
            "row_count": 2,
            "columns": ["user_age", "clicked"],
            "suite": "ctr_events",
            "expectations_evaluated": 7,
            "problems": [],
        },
        evidence={"dataset": sha, "expectation_suite": "e" * 64, "report": "f" * 64},
    )
    # Another model's record between, so queries have something to leave out.
    add(
        "other",
        "airflow:modelops_training.train",
        AuditAction.MODEL_REGISTERED,
        model_subject(OTHER_MODEL, 1),
        Decision.CANDIDATE,
        _run("modelops_training", 1),
        details={
            "run_id": "r-other",
            "metrics": {},
            "tags": {},
            "trigger": "manual",
            **evidence_summary(FILES_V1),
        },
        evidence={"dataset": "d" * 64},
    )
    for version, files, day in (("1", FILES_V1, 2), ("2", FILES_V2, 5)):
        dag = _run("modelops_training", day)
        tags = _tags(sha, dag) | {Tag.TRAIN_DATA_URI: str(snapshot)}
        add(
            f"registered_v{version}",
            "airflow:modelops_training.train",
            AuditAction.MODEL_REGISTERED,
            model_subject(MODEL, version),
            Decision.CANDIDATE,
            dag,
            details={
                "run_id": f"run-{version}",
                "metrics": {"holdout_roc_auc": 0.71},
                "tags": tags,
                "trigger": "new_data",
                "experiment": "ctr_recommender",
                **evidence_summary(files),
            },
            evidence={"dataset": sha, "lineage_tags": sha256_json(tags), "artifacts": sha256_json(files)},
        )
    now = datetime.now(UTC)
    gate_details = {
        "policy": "standard@3",
        "risk_tier": "medium",
        "checks": [],
        "failed": [],
        "run_id": "run-1",
        "gate_report_sha256": "c" * 64,
        Tag.TRAIN_DATA_SHA256: sha,
        **evidence_summary(FILES_V1),
    }
    approval = {
        "mode": "automatic",
        "by": "policy standard@3",
        "reason": "policy standard requires no human approval",
        "approved_at": now.isoformat(),
        "valid_until": (now + timedelta(hours=48)).isoformat(),
    }
    gate_evidence = {
        "policy": "9" * 64,
        "gate_report": "c" * 64,
        "artifacts": sha256_json(FILES_V1),
        "dataset": sha,
    }
    add(
        "gate_v1",
        "airflow:modelops_compliance_gate.evaluate_policy",
        AuditAction.GATE_DECIDED,
        model_subject(MODEL, 1),
        Decision.APPROVED,
        _run("modelops_compliance_gate", 2),
        details={**gate_details, "approval": approval},
        evidence={**gate_evidence, "approval": sha256_json(approval)},
    )
    deploy = _run("modelops_deployment", 3)
    add(
        "promoted_v1",
        "airflow:modelops_deployment.deploy",
        AuditAction.MODEL_DEPLOYED,
        model_subject(MODEL, 1),
        Decision.PROMOTED,
        deploy,
        details={
            CHAMPION_FIELD: "1",
            "previous_version": None,
            "smoke_test": {"rows": 5, "passed": True},
            **evidence_summary(FILES_V1),
        },
        evidence={"artifacts": sha256_json(FILES_V1), "smoke_test": "8" * 64},
    )
    add(
        "deployed_v1",
        "airflow:modelops_deployment.deploy",
        AuditAction.MODEL_DEPLOYED,
        model_subject(MODEL, 1),
        Decision.DEPLOYED,
        deploy,
        details={"model_name": MODEL, "version": "1", "gate_record_seq": seqs["gate_v1"], "environment": {}},
        evidence={"smoke_test": "8" * 64, "artifacts": sha256_json(FILES_V1), "dataset": sha},
    )
    # v2: a person's approval.
    gate2 = {**gate_details, "policy": "strict@2", "run_id": "run-2", **evidence_summary(FILES_V2)}
    gate2_evidence = {**gate_evidence, "artifacts": sha256_json(FILES_V2)}
    gate_run = _run("modelops_compliance_gate", 5)
    add(
        "awaiting_v2",
        "airflow:modelops_compliance_gate.evaluate_policy",
        AuditAction.GATE_DECIDED,
        model_subject(MODEL, 2),
        Decision.AWAITING_APPROVAL,
        gate_run,
        details={**gate2, "approvers": [APPROVER], "respond_by": (now + timedelta(hours=72)).isoformat()},
        evidence=gate2_evidence,
    )
    human = {
        "mode": "human",
        "answer": "Approve",
        "by": APPROVER,
        "by_name": "Risk Officer",
        "comment": "Model card reviewed",
        "responded_at": now.isoformat(),
        "awaiting_record_seq": seqs["awaiting_v2"],
        "approvers": [APPROVER],
        "approved_at": now.isoformat(),
        "valid_until": (now + timedelta(hours=48)).isoformat(),
    }
    add(
        "gate_v2",
        "airflow:modelops_compliance_gate.approve",
        AuditAction.GATE_DECIDED,
        model_subject(MODEL, 2),
        Decision.APPROVED,
        gate_run,
        details={**gate2, "approval": human},
        evidence={**gate2_evidence, "approval": sha256_json(human)},
    )
    deploy2 = _run("modelops_deployment", 6)
    canary = {
        CHAMPION_FIELD: "1",
        CHALLENGER_FIELD: "2",
        SHARE_FIELD: 0.5,
        "started_at": now.isoformat(),
        "soak_until": now.isoformat(),
        "max_soak_until": now.isoformat(),
        "smoke_test": {"rows": 5, "passed": True},
        **evidence_summary(FILES_V2),
    }
    add(
        "canary_v2",
        "airflow:modelops_deployment.deploy",
        AuditAction.TRAFFIC_SHARE_SET,
        model_subject(MODEL, 2),
        Decision.CANARY_STARTED,
        deploy2,
        details=canary,
        evidence={"artifacts": sha256_json(FILES_V2)},
    )
    add(
        "pending_v2",
        "airflow:modelops_deployment.canary",
        AuditAction.TRAFFIC_SHARE_SET,
        model_subject(MODEL, 2),
        Decision.CANARY_PENDING,
        deploy2,
        details={"reasons": ["the challenger has 12 calls, fewer than 30"], "evaluation": {}},
    )
    add(
        "promoted_v2",
        "airflow:modelops_deployment.canary",
        AuditAction.MODEL_DEPLOYED,
        model_subject(MODEL, 2),
        Decision.PROMOTED,
        deploy2,
        details={
            CHAMPION_FIELD: "2",
            "previous_version": "1",
            "canary_record_seq": seqs["canary_v2"],
            "reason": "as good or better",
            **evidence_summary(FILES_V2),
        },
        evidence={"artifacts": sha256_json(FILES_V2), "canary": "7" * 64},
    )
    add(
        "share_v2",
        "airflow:modelops_deployment.canary",
        AuditAction.TRAFFIC_SHARE_SET,
        model_subject(MODEL, 2),
        Decision.PROMOTED,
        deploy2,
        details={
            CHAMPION_FIELD: "2",
            CHALLENGER_FIELD: None,
            SHARE_FIELD: 0.0,
            "canary_version": "2",
            "canary_record_seq": seqs["canary_v2"],
            "reason": "as good or better",
            "evaluation": {},
        },
    )
    monitor = _run("modelops_monitoring", 7)
    add(
        "drift_v2",
        "airflow:modelops_monitoring.assess",
        AuditAction.DRIFT_ASSESSED,
        model_subject(MODEL, 2),
        "critical",
        monitor,
        details={
            "window_start": "2026-11-07T08:00:00+00:00",
            "window_end": "2026-11-07T09:00:00+00:00",
            "report_uri": str(tmp_path / "reports" / "drift.html"),
            "mlflow_run_id": "m-1",
            "policy": "default",
            "verdict": "critical",
            "rows": 400,
            "callers": {CALLER: {"rows": 300, "drift_share": 0.5}},
        },
        evidence={"assessment": "a" * 64, "policy": "b" * 64, "reference_dataset": sha},
    )
    add(
        "alert_v2",
        "airflow:modelops_monitoring.notify",
        AuditAction.ALERT_NOTIFIED,
        model_subject(MODEL, 2),
        Decision.SENT,
        monitor,
        details={
            "tier": "critical",
            "dedup_key": f"{MODEL}.v2.critical",
            "title": "critical: ctr_recommender v2",
            "recipients": ["growth-team"],
            "deliveries": [{"channel": "log", "delivered": True}],
        },
    )
    add(
        "batch_v2",
        "airflow:modelops_batch_scoring.score",
        AuditAction.BATCH_SCORED,
        model_subject(MODEL, 2),
        Decision.SCORED,
        _run("modelops_batch_scoring", 7),
        details={
            "model_name": MODEL,
            "version": "2",
            "champion_record_seq": seqs["promoted_v2"],
            "output": {"uri": "s3://scores/out.parquet", "sha256": "0" * 64, "bytes": 10},
            "rows": 2,
            "caller_id": BATCH_CALLER,
        },
        evidence={"inputs": "1" * 64, "output": "0" * 64},
    )
    add(
        "rollback_v2",
        "airflow:modelops_monitoring.roll_back",
        AuditAction.MODEL_ROLLED_BACK,
        model_subject(MODEL, 2),
        Decision.ROLLED_BACK,
        monitor,
        details={
            CHAMPION_FIELD: "1",
            "failed_version": "2",
            "reason": "critical monitoring verdict",
            **evidence_summary(FILES_V1),
        },
        evidence={"artifacts": sha256_json(FILES_V1)},
    )
    life.archive.mkdir(parents=True)
    manifest = {
        "model_name": MODEL,
        "version": "2",
        "archive_uri": str(life.archive),
        "created_at": now.isoformat(),
        "files": [{"path": "MLmodel", "sha256": "4" * 64, "bytes": 100}],
    }
    (life.archive / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    add(
        "retired_v2",
        "airflow:modelops_retirement.retire",
        AuditAction.MODEL_RETIRED,
        model_subject(MODEL, 2),
        Decision.RETIRED,
        _run("modelops_retirement", 20),
        details={
            "reason": "superseded for 10 days",
            "policy": "default",
            "archive_uri": str(life.archive),
            "files": 1,
            "aliases_removed": [],
        },
        evidence={"archive_manifest": sha256_json(manifest), "policy": "2" * 64},
    )
    return life
