"""Operator for stage 4: deploy one approved version of one model to the scoring gateway."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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

        return deploy(
            spec=self.catalog.model(self.model),
            registry=self.registry,
            gateway=self.gateway,
            audit=self.audit_hook.store,
            # The promotion is recorded before the alias moves, so the stage writes it mid-way.
            record=lambda entry: self.record_entry(entry, context),
            version=None if self.model_version in (None, "") else str(self.model_version),
        )
