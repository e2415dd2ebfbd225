"""Stage 1: data hashing and validation.

A dataset version is identified by the SHA-256 of its bytes, streamed in fixed-size chunks. It is
checked against a Great Expectations suite from ``include/expectations/`` and scanned for PII. A passing
version is copied to a content-addressed snapshot (``<storage_root>/datasets/<name>/<sha256>/data.csv``)
with a data card beside it, so training and monitoring read exactly the bytes that were validated even
if the incoming file is later overwritten.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelops.errors import DatasetError
from modelops.locations import is_within
from modelops.pii import PiiMatcher, mask
from modelops.settings import Catalog, DatasetSpec
from modelops.stages.outcome import AuditEntry, StageOutcome, sha256_json
from modelops.storage import (
    as_storage_path,
    copy_file,
    dataset_chunks,
    files_in,
    read_dataset,
    sha256_of,
)
from modelops.vocabulary import (
    AuditAction,
    Decision,
    EventField,
    dataset_location_subject,
    dataset_subject,
)

if TYPE_CHECKING:
    import pandas as pd
    from airflow.sdk import ObjectStoragePath

    from modelops.audit import AuditStore


@dataclass(frozen=True)
class ExpectationOutcome:
    expectation: str
    column: str | None
    success: bool
    detail: str

    def describe(self) -> str:
        where = f" on column '{self.column}'" if self.column else ""
        return f"{self.expectation}{where}: {self.detail}"


@dataclass(frozen=True)
class PiiFinding:
    column: str
    pattern: str
    matching_rows: int
    example: str

    def describe(self) -> str:
        return f"column '{self.column}' holds {self.pattern} values ({self.matching_rows} rows, e.g. {self.example})"


PII_SCAN_CHUNK_ROWS = 50_000
"""Rows read at a time by the PII scan: every row is scanned, memory stays flat."""

EXAMPLES_QUOTED = 2
"""How many (masked) examples of unexpected values a problem shows."""

_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_ .%()-]{0,63}$")
"""A column name that reads as a name; anything else in a header may be data (a file that is no
dataset parses as CSV with its first line as the header) and is masked."""


@dataclass(frozen=True)
class PiiScan:
    """What the PII scan looked at, for the data card, and what it found."""

    rows_scanned: int
    columns_scanned: list[str]
    patterns: list[str]
    findings: list[PiiFinding]

    def summary(self) -> dict[str, Any]:
        return {
            "rows_scanned": self.rows_scanned,
            "columns_scanned": self.columns_scanned,
            "patterns": self.patterns,
            "findings": [finding.describe() for finding in self.findings],
            "result": "no PII pattern found" if not self.findings else f"{len(self.findings)} finding(s)",
        }


@dataclass
class DatasetValidationReport:
    dataset: str
    source_uri: str
    sha256: str
    size_bytes: int
    row_count: int
    columns: list[str]
    suite: str
    expectations: list[ExpectationOutcome]
    pii_findings: list[PiiFinding]
    pii_scan: dict[str, Any] = field(default_factory=dict)
    validated_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    snapshot_uri: str | None = None
    data_card_uri: str | None = None

    @property
    def failed_expectations(self) -> list[ExpectationOutcome]:
        return [outcome for outcome in self.expectations if not outcome.success]

    @property
    def passed(self) -> bool:
        return not self.failed_expectations and not self.pii_findings

    def problems(self) -> list[str]:
        return [o.describe() for o in self.failed_expectations] + [f.describe() for f in self.pii_findings]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data

    def lineage(self) -> dict[str, Any]:
        """What downstream stages need, small enough for an Asset event's extra and an XCom."""
        return {
            "dataset": self.dataset,
            "uri": self.source_uri,
            "snapshot_uri": self.snapshot_uri,
            "sha256": self.sha256,
            "row_count": self.row_count,
            "columns": self.columns,
            "suite": self.suite,
        }


def snapshot_dir(storage: ObjectStoragePath, dataset: str, sha256: str) -> ObjectStoragePath:
    return storage / "datasets" / dataset / sha256


def _observed(result: dict[str, Any]) -> str:
    """What GX saw, without quoting data: problems go to the audit log, the task log and the refusal.

    Unexpected values are given as a count, a share and masked examples only (a value in any column may
    be PII, even in one that should hold categories); an observed aggregate is quoted only if a number.
    """
    mismatched = (result.get("details") or {}).get("mismatched") or {}
    if mismatched.get("missing") or mismatched.get("unexpected"):
        parts = [
            f"{kind} columns {sorted(safe_name(str(col)) for col in cols)}"
            for kind, cols in sorted(mismatched.items())
            if cols
        ]
        return "; ".join(parts)
    if "observed_value" in result:
        observed = result["observed_value"]
        if isinstance(observed, int | float) and not isinstance(observed, bool):
            return f"observed {observed!r}"
        return f"observed a {type(observed).__name__} value (not quoted)"
    if result.get("unexpected_count") is not None:
        sample = result.get("partial_unexpected_list") or []
        pct = result.get("unexpected_percent")
        share = f" ({pct:.2f}%)" if isinstance(pct, int | float) else ""
        examples = [_mask(str(value)) for value in sample[:EXAMPLES_QUOTED]]
        shown = f", e.g. {', '.join(examples)} (masked)" if examples else ""
        return f"{result['unexpected_count']} unexpected values{share}{shown}"
    return "failed"


def safe_name(name: str) -> str:
    """A column name as it may be quoted in a record: as is if it reads as a name, else masked."""
    return name if _PLAIN_NAME.match(name) else _mask(name)


_QUOTED = re.compile(r"""(['"])(.*?)\1""")


def _scrubbed(message: str, names: set[str]) -> str:
    # A library's error may quote the value it choked on; keep quoted column names, mask the rest.
    def mask_quoted(match: re.Match[str]) -> str:
        inner = match.group(2)
        return match.group(0) if inner in names and _PLAIN_NAME.match(inner) else f"'{_mask(inner)}'"

    return _QUOTED.sub(mask_quoted, message)[:500]


def _exception_message(info: dict[str, Any] | None) -> str | None:
    """The message of an exception GX raised while evaluating an expectation, or None.

    GX 1.x reports a failed metric (e.g. a missing column) nested under its metric id rather than at
    the top level of ``exception_info``; both shapes are read.
    """
    if not info:
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None


def run_expectations(frame: pd.DataFrame, suite_file: Path) -> tuple[str, list[ExpectationOutcome]]:
    """Validate ``frame`` with the GX suite in ``suite_file``; one outcome per expectation."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    try:
        suite_data = json.loads(suite_file.read_text())
        suite = gx.ExpectationSuite(**suite_data)
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as exc:
        from modelops.errors import SettingsError

        raise SettingsError(f"{suite_file}: not a valid Great Expectations suite: {exc}") from exc
    context = gx.get_context(mode="ephemeral")
    # Progress bars would fill the task log (read as audit evidence) with carriage-return noise.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("modelops")
        .add_dataframe_asset(suite.name)
        .add_batch_definition_whole_dataframe("whole")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    result = batch.validate(suite, result_format="SUMMARY")
    names = {str(column) for column in frame.columns} | {
        str(item.expectation_config.kwargs.get("column")) for item in result.results
    }
    outcomes = []
    for item in result.results:
        config = item.expectation_config
        error = _exception_message(item.exception_info)
        if error is not None:
            detail = f"could not be evaluated: {_scrubbed(error, names)}"
        else:
            detail = "passed" if item.success else _observed(item.result or {})
        outcomes.append(
            ExpectationOutcome(
                expectation=config.type,
                column=config.kwargs.get("column"),
                success=bool(item.success),
                detail=detail,
            )
        )
    return suite.name, outcomes


def scan_pii(uri: str, spec: DatasetSpec, chunk_rows: int = PII_SCAN_CHUNK_ROWS) -> PiiScan:
    """Look for PII patterns in every row of the file, read ``chunk_rows`` at a time.

    Every column but floating-point ones is scanned (a float cannot hold an address or a phone number;
    a whole number can be a card number), each chunk as pandas reads it, so a text value anywhere in a
    column makes that chunk of it text and is seen.
    """
    matcher = PiiMatcher(spec.pii_patterns)
    counts: dict[tuple[str, str], int] = {}
    examples: dict[tuple[str, str], str] = {}
    scanned: dict[str, None] = {}
    rows = 0
    for chunk in dataset_chunks(uri, chunk_rows):
        rows += len(chunk)
        for column in chunk.columns:
            series = chunk[column]
            if series.dtype.kind in "fc":
                continue
            scanned[str(column)] = None
            if not matcher.patterns:
                continue
            for name, (hits, example) in matcher.matches(series.dropna().astype(str)).items():
                key = (str(column), name)
                counts[key] = counts.get(key, 0) + hits
                examples.setdefault(key, example)
    findings = [
        PiiFinding(
            column=safe_name(column), pattern=name, matching_rows=count, example=examples[(column, name)]
        )
        for (column, name), count in counts.items()
    ]
    return PiiScan(
        rows_scanned=rows,
        columns_scanned=[safe_name(column) for column in scanned],
        patterns=[name for name, _ in matcher.patterns],
        findings=findings,
    )


_mask = mask


def validate_dataset(
    uri: str, spec: DatasetSpec, suite_file: Path, storage: ObjectStoragePath
) -> DatasetValidationReport:
    """Hash, validate and PII-scan a dataset; on success write the snapshot and the data card.

    The report is returned whether or not the dataset passed: the caller records it in the audit log
    and then fails the task, so the evidence of a rejection is never lost.
    """
    source = as_storage_path(uri)
    if not source.exists():
        raise DatasetError(f"dataset not found at {uri}; check the dataset_uri param or drop the file there")
    if not source.is_file():
        raise DatasetError(f"{uri} is a folder, not a dataset file; name one file in it as dataset_uri")
    sha256, size = sha256_of(source)
    if size == 0:
        raise DatasetError(f"dataset {uri} is empty (0 bytes); it needs a header row and data")
    frame = read_dataset(uri)
    suite_name, outcomes = run_expectations(frame, suite_file)
    pii = scan_pii(uri, spec)
    report = DatasetValidationReport(
        dataset=spec.name,
        source_uri=str(source),
        sha256=sha256,
        size_bytes=size,
        row_count=len(frame),
        columns=[str(c) for c in frame.columns],
        suite=suite_name,
        expectations=outcomes,
        pii_findings=pii.findings,
        pii_scan=pii.summary(),
    )
    if report.passed:
        _write_snapshot(report, source, frame, storage, sensitive=spec.sensitive_columns)
    return report


def _write_snapshot(
    report: DatasetValidationReport,
    source: ObjectStoragePath,
    frame: pd.DataFrame,
    storage: ObjectStoragePath,
    *,
    sensitive: list[str] | None = None,
) -> None:
    target_dir = snapshot_dir(storage, report.dataset, report.sha256)
    target = target_dir / "data.csv"
    # Content-addressed: an existing snapshot with the right hash is the same bytes (a retry, or the
    # same file dropped twice), so it is kept rather than rewritten.
    if not (target.exists() and sha256_of(target)[0] == report.sha256):
        written = copy_file(source, target)
        if written != report.sha256:
            raise DatasetError(
                f"dataset {report.source_uri} changed while it was being validated "
                f"(hashed {report.sha256[:12]}, copied {written[:12]}); drop the file again and rerun"
            )
    report.snapshot_uri = str(target)
    card = target_dir / "data_card.json"
    card.write_text(json.dumps(data_card(report, frame, sensitive), indent=2, sort_keys=True, default=str))
    report.data_card_uri = str(card)


def data_card(
    report: DatasetValidationReport, frame: pd.DataFrame, sensitive: list[str] | None = None
) -> dict[str, Any]:
    """A data card: what the dataset is, where it came from, what it looks like, and which of its columns
    its spec marks sensitive (the compliance gate keeps their values out of model artifacts)."""
    sensitive_present = [column for column in (sensitive or []) if column in frame.columns]
    columns = {}
    for name in frame.columns:
        series = frame[name]
        entry: dict[str, Any] = {"dtype": str(series.dtype), "nulls": int(series.isna().sum())}
        if series.dtype.kind in "if":
            entry.update(
                min=float(series.min()), max=float(series.max()), mean=round(float(series.mean()), 6)
            )
        else:
            distinct = int(series.nunique())
            entry["distinct"] = distinct
            if _is_free_text_or_identifier(series, distinct):
                # Values unique to a row (names, ids, notes) are not quoted: they describe a person.
                entry["kind"] = "free text or identifier (values not quoted)"
            else:
                entry["kind"] = "categorical"
                entry["top_values"] = {
                    str(k): int(v) for k, v in series.value_counts().head(10).items() if _quotable(str(k))
                }
        columns[safe_name(str(name))] = entry
    return {
        "dataset": report.dataset,
        "sha256": report.sha256,
        "source_uri": report.source_uri,
        "size_bytes": report.size_bytes,
        "row_count": report.row_count,
        "validated_at": report.validated_at,
        "expectation_suite": report.suite,
        "expectations_evaluated": len(report.expectations),
        "pii_scan": report.pii_scan,
        "sensitive_columns": sensitive_present,
        "columns": columns,
    }


def _is_free_text_or_identifier(series: pd.Series, distinct: int) -> bool:
    present = int(series.notna().sum())
    return distinct > 50 and distinct > present // 2


def _quotable(value: str) -> bool:
    # A category that looks like an address, a number or a sentence is not a category to quote.
    return bool(_PLAIN_NAME.match(value)) and not any(ch.isdigit() for ch in value)


# --- the stage: one file against one dataset spec ---------------------------------------------------


def validate(uri: str, spec: DatasetSpec, catalog: Catalog, storage: ObjectStoragePath) -> StageOutcome:
    """Validate one dataset file against ``spec``; the outcome passes, or refuses with every problem."""
    suite_file = catalog.suite_path(spec)
    spec_file = catalog.source_of("datasets", spec.name)
    used = f"dataset spec {spec.name!r} ({spec_file}) and suite {suite_file.name}"
    roots = allowed_roots(catalog, spec)
    # Checked on the spelling alone, before anything opens the location (no exists, hash or read).
    if not is_within(uri, roots):
        message = (
            f"{uri} is outside the folders datasets may be read from ({', '.join(roots)}); drop the file "
            f"into {spec.incoming_uri}, or add its folder to allowed_roots in {spec_file} (or to "
            "dataset_roots in modelops.yaml). Nothing was read."
        )
        return StageOutcome(
            decision=Decision.REFUSED,
            summary=f"{uri} is outside the allowed dataset folders; not read",
            details={"dataset": spec.name, "uri": uri, "allowed_roots": roots},
            records=(
                AuditEntry(
                    AuditAction.DATASET_VALIDATED,
                    dataset_location_subject(uri),
                    Decision.REFUSED,
                    details={"dataset": spec.name, "uri": uri, "allowed_roots": roots, "error": message},
                ),
            ),
            refusal=message,
        )
    try:
        report = validate_dataset(uri, spec, suite_file, storage)
    except DatasetError as exc:
        message = f"{exc} (checked against {used})"
        # The same spelling as a validated file's record, so the poller recognises it as seen.
        location = str(as_storage_path(uri))
        return StageOutcome(
            decision=Decision.UNREADABLE,
            summary=f"{uri} could not be read as dataset {spec.name}",
            details={"dataset": spec.name, "uri": location},
            records=(
                AuditEntry(
                    AuditAction.DATASET_VALIDATED,
                    _unreadable_subject(uri),
                    Decision.UNREADABLE,
                    details={"dataset": spec.name, "uri": location, "error": message},
                ),
            ),
            refusal=message,
        )
    suite_sha, _ = sha256_of(as_storage_path(suite_file))
    problems = report.problems()
    details = {
        "dataset": spec.name,
        "dataset_spec": str(spec_file),
        "uri": report.source_uri,
        "snapshot_uri": report.snapshot_uri,
        "data_card_uri": report.data_card_uri,
        "row_count": report.row_count,
        "columns": [safe_name(column) for column in report.columns],
        "suite": report.suite,
        "suite_file": str(suite_file),
        "expectations_evaluated": len(report.expectations),
        "problems": problems,
    }
    record = AuditEntry(
        AuditAction.DATASET_VALIDATED,
        dataset_subject(report.sha256),
        Decision.PASSED if report.passed else Decision.FAILED,
        details=details,
        evidence={
            "dataset": report.sha256,
            "expectation_suite": suite_sha,
            "report": sha256_json(report.to_dict()),
        },
    )
    if not report.passed:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        return StageOutcome(
            decision=Decision.FAILED,
            summary=f"{uri} failed validation as dataset {spec.name}",
            details=details,
            records=(record,),
            refusal=(
                f"dataset {uri} (sha256 {report.sha256[:12]}...) failed validation against {used} with "
                f"{len(problems)} problem(s):\n{listed}\nFix the data and drop it again; nothing was "
                "snapshotted and no training was started."
            ),
        )
    passed = len(report.expectations)
    lineage = {
        **report.lineage(),
        EventField.MODEL_NAMES: [model.name for model in catalog.models_for_dataset(spec.name)],
    }
    return StageOutcome(
        decision=Decision.PASSED,
        summary=f"{spec.name} sha256 {report.sha256[:12]}... {report.row_count} rows, "
        f"{passed}/{passed} expectations ({report.suite}), no PII",
        details={**details, **lineage},
        records=(record,),
        asset_extra=lineage,
    )


def _unreadable_subject(uri: str) -> str:
    # A file that exists has bytes to hash even if they are no CSV: name it by content, so the poller
    # does not try the same bytes again every few minutes.
    path = as_storage_path(uri)
    if path.is_file():
        return dataset_subject(sha256_of(path)[0])
    return dataset_location_subject(uri)


def allowed_roots(catalog: Catalog, spec: DatasetSpec) -> list[str]:
    """The folders a file validated against ``spec`` may be read from: ``spec``'s own first, then every
    other dataset's (a file may be checked against another dataset's spec), then the platform's."""
    roots = [spec.incoming_uri, *spec.allowed_roots]
    for other in catalog.datasets.values():
        roots += [other.incoming_uri, *other.allowed_roots]
    roots += catalog.platform.dataset_roots
    return list(dict.fromkeys(roots))


# --- what to validate -------------------------------------------------------------------------------


def plan_validation(
    *, catalog: Catalog, audit: AuditStore, datasets: list[str], dataset_uri: str | None
) -> list[dict[str, str]]:
    """The files to validate, each with the dataset spec it is validated against.

    With ``dataset_uri`` that one file, against the one dataset named in ``datasets`` or else the dataset
    whose incoming folder holds it. Otherwise every file in the incoming folder of each dataset named
    (all datasets when none is) not validated before at that location: the validation DAG polls this,
    so a file dropped in a folder needs no hand trigger, and one seen before is not redone.
    """
    for name in datasets:
        catalog.dataset(name)  # an unknown name fails here, listing the known ones
    if dataset_uri:
        if len(datasets) > 1:
            raise DatasetError(
                f"dataset_uri names one file but datasets names {datasets}; name at most one dataset"
            )
        spec = catalog.dataset(datasets[0]) if datasets else catalog.dataset_for_location(dataset_uri)
        roots = allowed_roots(catalog, spec)
        if not is_within(dataset_uri, roots):
            raise DatasetError(
                f"dataset_uri {dataset_uri} is outside the folders datasets may be read from "
                f"({', '.join(roots)}); drop the file into {spec.incoming_uri}, or add its folder to the "
                "dataset spec's allowed_roots (or dataset_roots in modelops.yaml)"
            )
        return [{"dataset": spec.name, "dataset_uri": dataset_uri}]
    # A delivery is a file at a location: the same bytes dropped again under a new name are a new delivery
    # (and are validated, snapshotted once, and trained on again); the same file seen again is not.
    seen = {
        (record.subject, record.details.get("uri"))
        for record in audit.records(action=AuditAction.DATASET_VALIDATED)
    }
    plan = []
    for name in datasets or sorted(catalog.datasets):
        spec = catalog.dataset(name)
        roots = allowed_roots(catalog, spec)
        for path in files_in(spec.incoming_uri, spec.file_pattern):
            # A link out of the folder is not hashed (that would read it); validate() records its refusal.
            if is_within(str(path), roots):
                subject = dataset_subject(sha256_of(path)[0])
            else:
                subject = dataset_location_subject(str(path))
            if (subject, str(path)) not in seen:
                plan.append({"dataset": name, "dataset_uri": str(path)})
    return plan
