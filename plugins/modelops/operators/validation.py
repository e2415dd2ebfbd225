"""Operator for stage 1: hash, validate and snapshot a dataset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context

from modelops.audit import AuditRecord, AuditStore
from modelops.errors import DatasetError, DataValidationFailed
from modelops.hooks.audit import AuditHook
from modelops.operators._common import emit, sha256_json
from modelops.settings import dataset_spec, expectation_suite_path
from modelops.storage import as_storage_path, sha256_of

VALIDATED_ACTION = "dataset.validated"


def dataset_subject(sha256: str) -> str:
    """How a dataset version is named in the audit log."""
    return f"dataset:sha256:{sha256}"


def latest_passed_validation(store: AuditStore, sha256: str = "") -> AuditRecord | None:
    """The newest passing validation record of ``sha256`` (of any dataset when blank), or None.

    The audit log is the system of record for which dataset versions passed validation.
    """
    subject = dataset_subject(sha256) if sha256 else None
    records = store.records(action=VALIDATED_ACTION, subject=subject)
    return next((record for record in reversed(records) if record.decision == "passed"), None)


class ValidateDatasetOperator(BaseOperator):
    """Validate one dataset version and, when it passes, emit the validated-dataset Asset event.

    The full result goes to the audit log before the task fails, so a rejection keeps its evidence.
    """

    template_fields: Sequence[str] = ("dataset_uri", "dataset")
    ui_color = "#e8f4ea"

    def __init__(
        self,
        *,
        dataset_uri: str = "",
        dataset: str = "",
        audit_conn_id: str = AuditHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dataset_uri = dataset_uri
        self.dataset = dataset
        self.audit_conn_id = audit_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from modelops.stages.validation import validate_dataset

        spec = dataset_spec(self.dataset or None)
        uri = self.dataset_uri or spec.incoming_uri
        audit = AuditHook(audit_conn_id=self.audit_conn_id)
        try:
            report = validate_dataset(uri, spec)
        except DatasetError as exc:
            audit.record(
                action=VALIDATED_ACTION,
                subject=f"dataset-uri:{uri}",
                decision="unreadable",
                details={"dataset": spec.name, "uri": uri, "error": str(exc)},
                context=context,
            )
            raise
        suite_sha, _ = sha256_of(as_storage_path(expectation_suite_path(spec)))
        details = {
            "dataset": spec.name,
            "uri": report.source_uri,
            "snapshot_uri": report.snapshot_uri,
            "data_card_uri": report.data_card_uri,
            "row_count": report.row_count,
            "columns": report.columns,
            "suite": report.suite,
            "expectations_evaluated": len(report.expectations),
            "problems": report.problems(),
        }
        audit.record(
            action=VALIDATED_ACTION,
            subject=dataset_subject(report.sha256),
            decision="passed" if report.passed else "failed",
            details=details,
            evidence={
                "dataset": report.sha256,
                "expectation_suite": suite_sha,
                "report": sha256_json(report.to_dict()),
            },
            context=context,
        )
        if not report.passed:
            problems = "\n".join(f"  - {problem}" for problem in report.problems())
            raise DataValidationFailed(
                f"dataset {uri} (sha256 {report.sha256[:12]}...) failed validation with "
                f"{len(report.problems())} problem(s):\n{problems}\nFix the data and drop it again; "
                "nothing was snapshotted and no training was started."
            )
        lineage = report.lineage()
        emit(context, self.outlets, lineage)
        passed = len(report.expectations)
        return {
            **lineage,
            "summary": f"sha256 {report.sha256[:12]}... {report.row_count} rows, {passed}/{passed} expectations, no PII",
        }
