"""Operator for batch scoring: score files with one model's recorded champion on Spark."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from modelops.operators.base import ModelOpsBaseOperator
from modelops.vocabulary import AuditAction, model_subject

if TYPE_CHECKING:
    from airflow.sdk import Context

    from modelops.stages.outcome import StageOutcome


class BatchScoreOperator(ModelOpsBaseOperator):
    """Score ``input_uri`` (a CSV or Parquet file, or a folder of them) with ``model``'s champion and write
    ``<output_uri>/scores.parquet`` (default ``<storage_root>/batch_scores/<model>/<run_id>``).

    Arguments left ``None`` are read from the run's trigger-form params of the same name, as values, never
    rendered as templates. One Spark session per task (``modelops.spark``), started only once the champion
    and the input are checked, stopped with its JVM at the end.
    """

    template_fields: Sequence[str] = ()
    ui_color = "#fdf1d8"
    audit_action = AuditAction.BATCH_SCORED

    def __init__(
        self,
        *,
        model: str | None = None,
        input_uri: str | None = None,
        output_uri: str | None = None,
        id_columns: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.input_uri = input_uri
        self.output_uri = output_uri
        self.id_columns = id_columns

    def audit_subject(self) -> str:
        return model_subject(self.model or "unknown")

    def run_stage(self, context: Context) -> StageOutcome:
        from modelops.spark import spark_session
        from modelops.stages.batch_scoring import batch_caller_id, default_output_uri, score_batch
        from modelops.stages.validation import allowed_roots

        params = context.get("params") or {}
        self.model = self.model or params.get("model")
        input_uri = self.input_uri or params.get("input_uri") or ""
        id_columns = self.id_columns if self.id_columns is not None else list(params.get("id_columns") or [])
        spec = self.catalog.model(str(self.model))
        dag_run = context["dag_run"]
        output_uri = (
            self.output_uri
            or params.get("output_uri")
            or default_output_uri(self.storage, spec.name, dag_run.run_id)
        )
        conn_id = self.catalog.platform.storage_conn_id or None
        return score_batch(
            spec=spec,
            registry=self.registry,
            audit=self.audit_hook.store,
            prediction_log=self.prediction_log,
            spark=spark_session(app_name=f"modelops-batch-{spec.name}"),
            input_uri=str(input_uri),
            output_uri=str(output_uri),
            input_roots=allowed_roots(self.catalog, self.catalog.dataset(spec.dataset)),
            caller_id=batch_caller_id(dag_run.dag_id, dag_run.run_id),
            id_columns=id_columns,
            pii_patterns=self.catalog.dataset(spec.dataset).pii_patterns,
            storage_conn_id=conn_id,
        )
