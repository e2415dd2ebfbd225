"""Operator for stage 6: retire the versions of one model its policy (or a person) selects."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from modelops.operators.base import ModelOpsBaseOperator
from modelops.vocabulary import AuditAction, model_subject

if TYPE_CHECKING:
    from airflow.sdk import Context

    from modelops.stages.outcome import StageOutcome


class RetireModelsOperator(ModelOpsBaseOperator):
    """Archive, verify and retire the selected versions of one model; ``dry_run`` only records what would
    be retired. ``versions`` (whole numbers) are retired on request, with a ``reason``, besides those the
    model's retirement policy selects."""

    # Inputs come from the plan task (expand_kwargs), not from templates: a value that started as an
    # Asset event extra or a trigger-form string is never rendered as Jinja.
    template_fields: Sequence[str] = ()
    ui_color = "#ececec"
    audit_action = AuditAction.MODEL_RETIRED

    def __init__(
        self,
        *,
        model: str,
        versions: list[int | str] | None = None,
        reason: str | None = None,
        dry_run: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.versions = versions
        self.reason = reason
        self.dry_run = dry_run

    def audit_subject(self) -> str:
        return model_subject(self.model)

    def run_stage(self, context: Context) -> StageOutcome:
        from modelops.stages.retirement import retire

        spec = self.catalog.model(self.model)
        return retire(
            spec=spec,
            policy=self.catalog.policies_for(spec).retirement,
            registry=self.registry,
            storage=self.storage,
            storage_conn_id=self.catalog.platform.storage_conn_id or None,
            versions=self.versions if self.versions is not None else [],
            reason=self.reason,
            dry_run=self.dry_run,
            now=datetime.now(UTC),
        )
