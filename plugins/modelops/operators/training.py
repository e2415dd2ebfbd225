"""Operator for stage 2: train on a validated dataset and register a version with lineage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context

from modelops.assets import RETRAINING_REQUEST, VALIDATED_DATASET
from modelops.errors import TrainingError
from modelops.hooks.audit import AuditHook
from modelops.hooks.registry import MlflowRegistryHook
from modelops.operators._common import emit, sha256_json, triggering_extras
from modelops.operators.validation import latest_passed_validation
from modelops.settings import model_spec, platform_settings


def resolve_training_data(
    context: Context, audit: AuditHook, dataset_sha256: str
) -> tuple[str, dict[str, Any], str]:
    """Which validated dataset to train on, and why this run trains: (sha256, validation record, trigger).

    An explicit ``dataset_sha256`` (the trigger form) wins; then the validated-dataset event that
    triggered the run; otherwise (a retraining request, or a manual run with no hash) the most recent
    dataset that passed validation.
    """
    dataset_events = triggering_extras(context, VALIDATED_DATASET)
    retrain_events = triggering_extras(context, RETRAINING_REQUEST)
    if dataset_events:
        trigger = "new_data"
    elif retrain_events:
        trigger = "retraining_request"
    else:
        trigger = "manual"
    sha = dataset_sha256 or (dataset_events[-1]["sha256"] if dataset_events else "")
    record = latest_passed_validation(audit.store, sha)
    if record is None and sha:
        raise TrainingError(
            f"dataset sha256 {sha} has no passing validation record; validate it with the "
            "modelops_data_validation DAG before training on it"
        )
    if record is None:
        raise TrainingError(
            "no dataset has passed validation yet; run the modelops_data_validation DAG first, "
            "or give dataset_sha256"
        )
    sha = sha or record.subject.rsplit(":", 1)[-1]
    return sha, record.details, trigger


class TrainModelOperator(BaseOperator):
    """Train the model spec, register a version tagged with its lineage, move alias ``candidate``."""

    template_fields: Sequence[str] = ("dataset_sha256", "model")
    ui_color = "#e8eef8"

    def __init__(
        self,
        *,
        dataset_sha256: str = "",
        model: str = "",
        mlflow_conn_id: str = MlflowRegistryHook.default_conn_name,
        audit_conn_id: str = AuditHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dataset_sha256 = dataset_sha256
        self.model = model
        self.mlflow_conn_id = mlflow_conn_id
        self.audit_conn_id = audit_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from modelops.stages.training import train_and_register
        from modelops.stages.validation import read_dataset

        spec = model_spec(self.model or None)
        audit = AuditHook(audit_conn_id=self.audit_conn_id)
        sha, validation, trigger = resolve_training_data(context, audit, self.dataset_sha256.strip())
        snapshot = validation.get("snapshot_uri")
        if not snapshot:
            raise TrainingError(
                f"the validation record of dataset {sha[:12]}... names no snapshot to train on"
            )
        frame = read_dataset(snapshot)
        dag_run = context["dag_run"]
        result = train_and_register(
            registry=MlflowRegistryHook(mlflow_conn_id=self.mlflow_conn_id),
            spec=spec,
            experiment_name=platform_settings().experiment_name,
            frame=frame,
            dataset_sha256=sha,
            dataset_uri=snapshot,
            trigger=trigger,
            dag_id=dag_run.dag_id,
            run_id=dag_run.run_id,
        )
        audit.record(
            action="model.registered",
            subject=f"model:{result.model_name}@{result.version}",
            decision="candidate",
            details={
                "run_id": result.run_id,
                "metrics": result.metrics,
                "tags": result.tags,
                "trigger": trigger,
            },
            evidence={"dataset": sha, "lineage_tags": sha256_json(result.tags)},
            context=context,
        )
        emit(
            context,
            self.outlets,
            {"model_name": result.model_name, "version": result.version, "train_data_sha256": sha},
        )
        auc = result.metrics.get("holdout_roc_auc", float("nan"))
        return {
            **result.to_dict(),
            "summary": f"{result.model_name} v{result.version} (candidate), holdout AUC {auc:.3f}, trigger {trigger}",
        }
