"""Operators for stage 5: drift monitoring of one model's window of served predictions, and the
retraining request a verdict may call for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowSkipException

from modelops.operators.base import ModelOpsBaseOperator
from modelops.vocabulary import AuditAction, model_subject

if TYPE_CHECKING:
    from airflow.sdk import Context

    from modelops.stages.outcome import StageOutcome


class DriftMonitorOperator(ModelOpsBaseOperator):
    """Assess drift of one model for one window (the run's data interval, or ``window_start``/``window_end``);
    record the verdict; keep Evidently's HTML report in storage and in the model's MLflow experiment."""

    template_fields: Sequence[str] = ("window_start", "window_end")
    ui_color = "#fdeaea"
    audit_action = AuditAction.DRIFT_ASSESSED

    def __init__(
        self, *, model: str, window_start: str | None = None, window_end: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.window_start = window_start
        self.window_end = window_end

    def audit_subject(self) -> str:
        return model_subject(self.model)

    def run_stage(self, context: Context) -> StageOutcome:
        from modelops.stages.monitoring import assess, monitoring_window

        spec = self.catalog.model(self.model)
        start, end = monitoring_window(
            self.window_start,
            self.window_end,
            context.get("data_interval_start"),
            context.get("data_interval_end"),
        )
        return assess(
            spec=spec,
            policy=self.catalog.policies_for(spec).monitoring,
            registry=self.registry,
            prediction_log=self.prediction_log,
            storage=self.storage,
            start=start,
            end=end,
        )


class RequestRetrainingOperator(ModelOpsBaseOperator):
    """Ask for a retrain (an Asset event on the operator's outlets) when one assessment's verdict is one its
    model's monitoring policy lists in ``request_retraining_on``; skip otherwise, emitting nothing.

    Mapped over the assessments: ``RequestRetrainingOperator.partial(...).expand(assessment=assess.output)``.
    """

    template_fields: Sequence[str] = ()
    ui_color = "#fdeaea"
    audit_action = AuditAction.RETRAINING_REQUESTED

    def __init__(self, *, assessment: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.assessment = assessment

    def run_stage(self, context: Context) -> StageOutcome | None:  # type: ignore[override]
        from modelops.stages.monitoring import retraining_request

        policy = self.catalog.policies_for(self.assessment["model_name"]).monitoring
        return retraining_request(self.assessment, policy)

    def audit_subject(self) -> str:
        return model_subject(self.assessment.get("model_name", "?"), self.assessment.get("version"))

    def execute(self, context: Context) -> dict[str, Any]:
        try:
            outcome = self.run_stage(context)
        except Exception as exc:
            self.record_failure(exc, context, retried=True)
            raise
        if outcome is None:
            raise AirflowSkipException(
                f"verdict {self.assessment.get('verdict')!r} of {self.assessment.get('model_name')} does not "
                "call for retraining"
            )
        return self.act_on(outcome, context)
