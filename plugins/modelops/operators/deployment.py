"""Operator for stage 4: deploy one approved version of one model to the scoring gateway."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

from modelops.operators.base import ModelOpsBaseOperator
from modelops.vocabulary import AuditAction, model_subject

if TYPE_CHECKING:
    from airflow.sdk import Context

    from modelops.stages.outcome import StageOutcome


class DeployModelOperator(ModelOpsBaseOperator):
    """Stage, smoke-test and promote an approved version; the previous champion serves until it passes."""

    # Inputs come from the plan task (expand_kwargs), not from templates: a value that started as an
    # Asset event extra or a trigger-form string is never rendered as Jinja.
    template_fields: Sequence[str] = ()
    ui_color = "#efe6f7"
    audit_action = AuditAction.MODEL_DEPLOYED

    def __init__(self, *, model: str, model_version: str | int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.model_version = model_version

    def audit_subject(self) -> str:
        return model_subject(self.model, self.model_version or None)

    def run_stage(self, context: Context) -> StageOutcome:
        from modelops.stages.deployment import deploy

        spec = self.catalog.model(self.model)
        return deploy(
            spec=spec,
            registry=self.registry,
            gateway=self.serving_target(spec),
            audit=self.audit_hook.store,
            # The promotion is recorded before the alias moves, so the stage writes it mid-way.
            record=lambda entry: self.record_entry(entry, context),
            version=None if self.model_version in (None, "") else str(self.model_version),
        )


class CanaryOperator(ModelOpsBaseOperator):
    """Watch a model's canary to its end: soak without holding a worker slot (deferred to the triggerer),
    compare the arms, promote or roll back. With no canary running (a first deployment, a refused one) it
    has nothing to do and says so."""

    template_fields: Sequence[str] = ()
    ui_color = "#f7efe6"
    audit_action = AuditAction.TRAFFIC_SHARE_SET

    def __init__(
        self,
        *,
        model: str,
        model_version: str | int | None = None,
        deploy_task_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.model_version = model_version
        self.deploy_task_id = deploy_task_id
        """The task that deployed this model in the same run (same map index): when it did not complete and
        no canary runs, this task fails too, so the run is failed, not carried to success by its last task."""

    def audit_subject(self) -> str:
        return model_subject(self.model, self.model_version or None)

    def run_stage(self, context: Context) -> StageOutcome:
        from modelops.stages.canary import canary_step

        spec = self.catalog.model(self.model)
        return canary_step(
            spec=spec,
            policy=self.catalog.policies_for(spec).monitoring,
            registry=self.registry,
            gateway=self.gateway,
            audit=self.audit_hook.store,
            record=lambda entry: self.record_entry(entry, context),
            prediction_log=self.prediction_log,
        )

    def execute(self, context: Context) -> dict[str, Any]:
        outcome = self.decide(lambda: self.run_stage(context), context)
        if outcome.decision == "no_canary" and self.deploy_task_id:
            ti = context["ti"]
            if ti.xcom_pull(task_ids=self.deploy_task_id, map_indexes=ti.map_index) is None:
                raise AirflowFailException(
                    f"{self.model}: task {self.deploy_task_id} did not complete (refused or failed: its log says "
                    "why), so there is no canary to watch"
                )
        next_check = outcome.details.get("next_check")
        if next_check:
            from datetime import datetime

            from airflow.providers.standard.triggers.temporal import DateTimeTrigger

            for entry in outcome.records:  # a soak that runs on past its time is on record each look
                self.record_entry(entry, context)
            self.log.info("%s", outcome.summary)
            self.defer(
                trigger=DateTimeTrigger(moment=datetime.fromisoformat(next_check)),
                method_name="execute_complete",
            )
        return self.act_on(outcome, context)

    def execute_complete(self, context: Context, event: Any = None) -> dict[str, Any]:
        return self.execute(context)


class RollbackOperator(ModelOpsBaseOperator):
    """A manual rollback: end the model's running canary, or (none running) put its previous champion back.

    The model and the reason come from the trigger form's params at run time, never rendered as templates.
    """

    template_fields: Sequence[str] = ()
    ui_color = "#f7e6e6"
    audit_action = AuditAction.MODEL_ROLLED_BACK

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model: str | None = None

    def audit_subject(self) -> str:
        return model_subject(self.model or "unknown", None)

    def run_stage(self, context: Context) -> StageOutcome:
        from modelops.stages.canary import manual_rollback

        params = context["params"]
        self.model = str(params["model"])
        by = getattr(context["dag_run"], "triggering_user_name", None) or "unknown user"
        spec = self.catalog.model(self.model)
        return manual_rollback(
            spec=spec,
            registry=self.registry,
            gateway=self.serving_target(spec),
            audit=self.audit_hook.store,
            record=lambda entry: self.record_entry(entry, context),
            reason=f"manual rollback by {by}: {str(params['reason']).strip()}",
        )
