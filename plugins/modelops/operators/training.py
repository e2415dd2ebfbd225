"""Operator for stage 2: train one model on validated data and register a version with lineage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from modelops.operators.base import ModelOpsBaseOperator
from modelops.vocabulary import AuditAction, Trigger, model_subject

if TYPE_CHECKING:
    from airflow.sdk import Context

    from modelops.stages.outcome import StageOutcome


class TrainModelOperator(ModelOpsBaseOperator):
    """Train one model spec, register a version tagged with its lineage, move alias ``candidate``."""

    # Inputs come from the plan task (expand_kwargs), not from templates: a value that started as an
    # Asset event extra or a trigger-form string is never rendered as Jinja.
    template_fields: Sequence[str] = ()
    ui_color = "#e8eef8"
    audit_action = AuditAction.MODEL_REGISTERED

    def __init__(
        self,
        *,
        model: str,
        dataset_sha256: str | None = None,
        trigger: str = Trigger.MANUAL.value,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.dataset_sha256 = dataset_sha256
        self.trigger = trigger

    def audit_subject(self) -> str:
        return model_subject(self.model)

    def run_stage(self, context: Context) -> StageOutcome:
        from modelops.stages.training import train

        dag_run = context["dag_run"]
        return train(
            spec=self.catalog.model(self.model),
            catalog=self.catalog,
            registry=self.registry,
            audit=self.audit_hook.store,
            dataset_sha256=self.dataset_sha256 or None,
            trigger=Trigger(self.trigger),
            dag_id=dag_run.dag_id,
            run_id=dag_run.run_id,
        )
