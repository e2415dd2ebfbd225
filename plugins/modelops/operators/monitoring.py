"""Operators for stage 5: drift monitoring of one model's window of served predictions, and the
retraining request a verdict may call for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowSkipException

from modelops.operators.base import ModelOpsBaseOperator
from modelops.stages.outcome import json_safe
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

    def execute(self, context: Context) -> dict[str, Any]:
        result = super().execute(context)
        self.notify(result, context)
        self.reassess_pending(context)
        return result

    def reassess_pending(self, context: Context) -> None:
        """Earlier windows whose labels have arrived since they were assessed are assessed again, recorded
        and alerted on like any window (their XCom is not this task's: this run's window is)."""
        from datetime import datetime

        from modelops.stages.monitoring import windows_to_reassess

        spec = self.catalog.model(self.model)
        policy = self.catalog.policies_for(spec).monitoring
        start = datetime.fromisoformat(self._window[0]) if self._window else None
        if start is None:
            return
        for window_start, window_end in windows_to_reassess(
            self.monitoring_history, self.prediction_log, spec, policy, start
        ):
            outcome = self.decide(lambda ws=window_start, we=window_end: self._assess(ws, we), context)
            for entry in outcome.records:
                self.record_entry(entry, context)
            for effect in outcome.effects:
                effect()
            self.log.info("re-assessed now that its labels arrived: %s", outcome.summary)
            self.notify(json_safe(outcome.xcom()), context)

    def notify(self, assessment: dict[str, Any], context: Context) -> None:
        """Alert the model's owners through the policy's channels (Airflow notifiers); the verdict is on
        record already, so a channel that is down is recorded (``failed``) and tried again next hour."""
        from datetime import UTC, datetime

        from modelops.notifications import deliver
        from modelops.stages.monitoring import alert_record, plan_alert

        spec = self.catalog.model(self.model)
        policy = self.catalog.policies_for(spec).monitoring
        plan = plan_alert(assessment, spec, policy, self.audit_hook.store, datetime.now(UTC))
        if plan is None:
            return
        deliveries = None
        if plan.alert is not None:
            results = deliver(plan.alert, policy.channels, context)
            deliveries = [result.model_dump(mode="json") for result in results]
            for result in results:
                if not result.delivered:
                    self.log.warning(
                        "alert to %s failed after %d tries: %s", result.channel, result.attempts, result.error
                    )
        self.record_entry(alert_record(spec, assessment.get("version"), plan, deliveries), context)

    def run_stage(self, context: Context) -> StageOutcome:
        from modelops.stages.monitoring import monitoring_window

        start, end = monitoring_window(
            self.window_start,
            self.window_end,
            context.get("data_interval_start"),
            context.get("data_interval_end"),
        )
        self._window = (start.isoformat(), end.isoformat())
        return self._assess(start, end)

    _window: tuple[str, str] | None = None

    def _assess(self, start: Any, end: Any) -> StageOutcome:
        from modelops.stages.monitoring import assess

        spec = self.catalog.model(self.model)
        return assess(
            spec=spec,
            policy=self.catalog.policies_for(spec).monitoring,
            registry=self.registry,
            prediction_log=self.prediction_log,
            storage=self.storage,
            start=start,
            end=end,
            audit=self.audit_hook.store,
            history=self.monitoring_history,
        )


class RollbackOnCriticalOperator(ModelOpsBaseOperator):
    """Put the previous approved champion back when one assessment is critical; skip otherwise.

    Mapped over the assessments, like :class:`RequestRetrainingOperator`.
    """

    template_fields: Sequence[str] = ()
    ui_color = "#fdeaea"
    audit_action = AuditAction.MODEL_ROLLED_BACK

    def __init__(self, *, assessment: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.assessment = assessment

    def audit_subject(self) -> str:
        return model_subject(self.assessment.get("model_name", "?"), self.assessment.get("version"))

    def execute(self, context: Context) -> dict[str, Any]:
        from modelops.stages.monitoring import roll_back_on_critical

        spec = self.catalog.model(self.assessment["model_name"])
        outcome = self.decide(
            lambda: roll_back_on_critical(
                spec=spec,
                policy=self.catalog.policies_for(spec).monitoring,
                assessment=self.assessment,
                registry=self.registry,
                gateway=self.gateway,
                audit=self.audit_hook.store,
                record=lambda entry: self.record_entry(entry, context),
            ),
            context,
        )
        if outcome is None:
            raise AirflowSkipException(
                f"verdict {self.assessment.get('verdict')!r} of {spec.name} calls for no rollback"
            )
        return self.act_on(outcome, context)


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
