"""Operator for stage 3: the compliance gate for one model version."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from modelops.operators.base import ModelOpsBaseOperator
from modelops.vocabulary import AuditAction, model_subject

if TYPE_CHECKING:
    from airflow.sdk import Context

    from modelops.stages.outcome import StageOutcome


class ComplianceGateOperator(ModelOpsBaseOperator):
    """Evaluate a model's compliance policy against a version: approve (alias ``challenger``) or reject."""

    # Inputs come from the plan task (expand_kwargs), not from templates: a value that started as an
    # Asset event extra or a trigger-form string is never rendered as Jinja.
    template_fields: Sequence[str] = ()
    ui_color = "#f8f0e0"
    audit_action = AuditAction.GATE_DECIDED

    def __init__(self, *, model: str, model_version: str | int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.model_version = model_version

    def audit_subject(self) -> str:
        return model_subject(self.model, self.model_version or None)

    def run_stage(self, context: Context) -> StageOutcome:
        from modelops.stages.compliance import gate

        return gate(
            spec=self.catalog.model(self.model),
            catalog=self.catalog,
            registry=self.registry,
            audit=self.audit_hook.store,
            version=None if self.model_version in (None, "") else str(self.model_version),
        )
