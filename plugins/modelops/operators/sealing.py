"""Operator that seals the prediction log into batches whose Merkle roots go into the audit chain."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from modelops.operators.base import ModelOpsBaseOperator
from modelops.vocabulary import PREDICTION_LOG_SUBJECT, AuditAction

if TYPE_CHECKING:
    from airflow.sdk import Context

    from modelops.stages.outcome import StageOutcome


class SealPredictionLogOperator(ModelOpsBaseOperator):
    """Seal the prediction log's rows older than ``settle_seconds`` in batches of ``batch_size``: each
    batch's root is an audit record (stamped with this task run, the head anchored), then its seal row
    is written. A rerun continues where the newest authentic seal record ends."""

    template_fields: Sequence[str] = ()
    ui_color = "#e8e4f4"
    audit_action = AuditAction.PREDICTIONS_SEALED

    def __init__(self, *, batch_size: int = 1_000, settle_seconds: float = 60.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_size = batch_size
        self.settle_seconds = settle_seconds

    def audit_subject(self) -> str:
        return PREDICTION_LOG_SUBJECT

    def run_stage(self, context: Context) -> StageOutcome:
        from modelops.stages.sealing import seal_prediction_log

        return seal_prediction_log(
            engine=self.prediction_log.engine,
            audit=self.audit_hook.store,
            record=lambda entry: self.record_entry(entry, context),
            now=datetime.now(UTC),
            batch_size=self.batch_size,
            settle=timedelta(seconds=self.settle_seconds),
        )


class ExpirePredictionBatchesOperator(ModelOpsBaseOperator):
    """Remove whole the sealed batches of the prediction log older than the platform's
    ``prediction_log_retention_days`` (``include/modelops.yaml``): per batch an authentic
    ``predictions.expired`` record (stamped with this task run, the head anchored) first, then its rows,
    their labels and its seal row. A retry completes a removal whose record is written."""

    template_fields: Sequence[str] = ()
    ui_color = "#f4e4e4"
    audit_action = AuditAction.PREDICTIONS_EXPIRED

    def audit_subject(self) -> str:
        return PREDICTION_LOG_SUBJECT

    def run_stage(self, context: Context) -> StageOutcome:
        from modelops.settings import platform_settings
        from modelops.stages.sealing import expire_prediction_log

        return expire_prediction_log(
            engine=self.prediction_log.engine,
            audit=self.audit_hook.store,
            record=lambda entry: self.record_entry(entry, context),
            now=datetime.now(UTC),
            retention_days=platform_settings().prediction_log_retention_days,
        )
