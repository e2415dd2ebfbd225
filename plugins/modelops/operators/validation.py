"""Operator for stage 1: hash, validate and snapshot one dataset file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from modelops.operators.base import ModelOpsBaseOperator
from modelops.vocabulary import AuditAction, dataset_location_subject

if TYPE_CHECKING:
    from airflow.sdk import Context

    from modelops.stages.outcome import StageOutcome


class ValidateDatasetOperator(ModelOpsBaseOperator):
    """Validate one file against one dataset spec; on success emit the validated-dataset Asset event.

    The full result goes to the audit log before the task fails, so a rejection keeps its evidence.
    """

    # Not templated: a dropped file's name must never be rendered as Jinja.
    template_fields: Sequence[str] = ()
    ui_color = "#e8f4ea"
    audit_action = AuditAction.DATASET_VALIDATED

    def __init__(self, *, dataset: str, dataset_uri: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dataset = dataset
        self.dataset_uri = dataset_uri

    def audit_subject(self) -> str:
        return dataset_location_subject(str(self.dataset_uri))

    def run_stage(self, context: Context) -> StageOutcome:
        from modelops.stages.validation import validate

        spec = self.catalog.dataset(self.dataset)
        return validate(self.dataset_uri, spec, self.catalog, self.storage)
