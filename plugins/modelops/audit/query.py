"""Questions to the evidence, as a Python API and behind ``modelops audit query``.

:func:`query_records` finds audit records by model and version, dataset hash, caller id, time range, dag
run and action, each with whether it is authentic (a record altered or forged without the key is listed,
marked, never hidden). :func:`query_predictions` lists the scoring calls of the prediction log: who called
which version when, through which arm, with which status and how many rows; never the inputs nor the
outputs (those columns are not even read). :func:`render_records` and :func:`render_predictions` print them as a table, JSON or CSV.

Imports nothing of Airflow.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from modelops.audit.chain import AuditRecord
from modelops.errors import AuditChainBroken, ModelOpsError
from modelops.vocabulary import Tag, dataset_subject, model_subject

if TYPE_CHECKING:
    from modelops.audit.chain import AuditStore
    from modelops.serving.prediction_log import PredictionLog

FORMATS = ("table", "json", "csv")

# Details keys naming a dataset version a record is about (besides a dataset:<sha> subject).
_DATASET_EVIDENCE = ("dataset", "reference_dataset")


class QueryError(ModelOpsError):
    """A query that cannot be answered as asked (a bad time, a version without its model, a format)."""


@dataclass(frozen=True)
class AuditMatch(AuditRecord):
    """An audit record a query found, with whether it is authentic (None: no keyring to check with)."""

    authentic: bool | None = None


@dataclass(frozen=True)
class PredictionCall:
    """One scoring call of the prediction log, without its inputs and outputs."""

    request_id: str
    received_at: str
    caller_id: str
    model: str
    version: str | None
    arm: str | None
    status: int
    n_rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_time(value: str | datetime | None, *, what: str) -> datetime | None:
    """An ISO 8601 time (a date alone is its midnight); without a zone it is UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError as exc:
            raise QueryError(
                f"{what} {value!r} is not an ISO 8601 time; write e.g. 2026-11-27 or 2026-11-27T14:00:00+00:00"
            ) from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _window(since: Any, until: Any) -> tuple[datetime | None, datetime | None]:
    start, end = parse_time(since, what="since"), parse_time(until, what="until")
    if start is not None and end is not None and end <= start:
        raise QueryError(f"until ({end.isoformat()}) is not after since ({start.isoformat()}); swap them")
    return start, end


def read_records(store: AuditStore, **filters: Any) -> list[AuditRecord]:
    """``store.records(**filters)``, refusing (naming the record and the fix) when one of them was edited
    into details or evidence that are not a JSON object (``record.unreadable``): no record of the pipeline
    looks like that, and a query or lineage drawn around it would leave out what it was."""
    found = store.records(**filters)
    unreadable = [record for record in found if record.unreadable is not None]
    if unreadable:
        named = "; ".join(f"seq={record.seq} ({record.unreadable})" for record in unreadable)
        raise AuditChainBroken(
            f"record(s) of the audit log at {store.url} cannot be read: {named}; they are not authentic, "
            "altered in the database; run `modelops audit verify` to name what was changed"
        )
    return found


def _names_caller(record: AuditRecord, caller_id: str) -> bool:
    details = record.details
    if details.get("caller_id") == caller_id:
        return True
    callers = details.get("callers")  # a drift assessment's per-caller drift
    return isinstance(callers, Mapping) and caller_id in callers


def _names_dataset(record: AuditRecord, sha256: str) -> bool:
    if record.subject == dataset_subject(sha256):
        return True
    details = record.details
    tags = details.get("tags")
    if details.get(Tag.TRAIN_DATA_SHA256) == sha256 or details.get("dataset_sha256") == sha256:
        return True
    if isinstance(tags, Mapping) and tags.get(Tag.TRAIN_DATA_SHA256) == sha256:
        return True
    return any(record.evidence.get(name) == sha256 for name in _DATASET_EVIDENCE)


def query_records(
    store: AuditStore,
    *,
    caller_id: str | None = None,
    model: str | None = None,
    version: str | int | None = None,
    dataset_sha256: str | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
    action: str | None = None,
) -> list[AuditMatch]:
    """The audit records matching every filter given, oldest first, each with whether it is authentic.

    ``model`` (and ``version``) match the record's subject ``model:NAME[@VERSION]``; ``dataset_sha256`` a
    ``dataset:SHA`` subject, a model record's ``train_data_sha256`` (detail or tag) or its dataset
    evidence; ``caller_id`` a record whose details name that caller (a batch scoring's ``caller_id``, a
    drift assessment's per-caller drift); ``since`` (inclusive) and ``until`` (exclusive) the time the
    record was written; ``dag_id``/``run_id`` the Airflow run that wrote it.
    """
    if version not in (None, "") and not model:
        raise QueryError("a version needs its model: give model (--model NAME) with version (--version V)")
    start, end = _window(since, until)
    subject = prefix = None
    if model and version not in (None, ""):
        subject = model_subject(model, str(version))
    elif model:
        prefix = model_subject(model, "")
    dataset_sha256 = dataset_sha256.lower() if dataset_sha256 else None
    found = read_records(store, action=action or None, subject=subject, subject_prefix=prefix)
    if model and not version:
        # The model's own records (model:NAME) besides those of each version (model:NAME@V).
        found += read_records(store, action=action or None, subject=model_subject(model))
        found.sort(key=lambda record: record.seq)
    matches: list[AuditMatch] = []
    for record in found:
        if dag_id is not None and record.dag_id != dag_id:
            continue
        if run_id is not None and record.run_id != run_id:
            continue
        if caller_id is not None and not _names_caller(record, caller_id):
            continue
        if dataset_sha256 is not None and not _names_dataset(record, dataset_sha256):
            continue
        if start is not None or end is not None:
            written = parse_time(record.recorded_at, what="recorded_at")
            if (start is not None and written < start) or (end is not None and written >= end):
                continue
        authentic = store.authentic(record) if store.keyring is not None else None
        matches.append(AuditMatch(**asdict(record), authentic=authentic))
    return matches


def query_predictions(
    prediction_log: PredictionLog,
    *,
    caller_id: str | None = None,
    model: str | None = None,
    version: str | int | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    limit: int | None = None,
) -> list[PredictionCall]:
    """The scoring calls matching every filter given, oldest first (with ``limit``, the newest ``limit``).

    Only who, what, when and how: the inputs and outputs columns are never selected, so no raw value leaves
    the log through a query.
    """
    import sqlalchemy as sa

    from modelops.serving.prediction_log import predictions_table as table

    if version not in (None, "") and not model:
        raise QueryError("a version needs its model: give model (--model NAME) with version (--version V)")
    start, end = _window(since, until)
    query = sa.select(
        table.c.request_id,
        table.c.received_at,
        table.c.caller_id,
        table.c.model_name,
        table.c.model_version,
        table.c.arm,
        table.c.status_code,
        table.c.n_rows,
    )
    if caller_id is not None:
        query = query.where(table.c.caller_id == caller_id)
    if model:
        query = query.where(table.c.model_name == model)
    if version not in (None, ""):
        query = query.where(table.c.model_version == str(version))
    if start is not None:
        query = query.where(table.c.received_at >= start)
    if end is not None:
        query = query.where(table.c.received_at < end)
    if limit is None:
        query = query.order_by(table.c.received_at, table.c.request_id)
    else:
        query = query.order_by(table.c.received_at.desc(), table.c.request_id.desc()).limit(limit)
    with prediction_log.engine.connect() as conn:
        rows = conn.execute(query).all()
    if limit is not None:
        rows = rows[::-1]
    return [
        PredictionCall(
            request_id=row.request_id,
            received_at=row.received_at.isoformat(),
            caller_id=row.caller_id,
            model=row.model_name,
            version=row.model_version,
            arm=row.arm,
            status=int(row.status_code),
            n_rows=int(row.n_rows),
        )
        for row in rows
    ]


# --- output ---------------------------------------------------------------------------------------------

RECORD_COLUMNS = ("seq", "recorded_at", "action", "subject", "decision", "actor", "dag_run", "authentic")
"""The columns of audit records in a table and in CSV (CSV adds record_hash, details and evidence)."""
PREDICTION_COLUMNS = ("request_id", "received_at", "caller_id", "model", "version", "arm", "status", "n_rows")


def _authentic_text(value: bool | None) -> str:
    return "not checked" if value is None else ("yes" if value else "NO")


def record_row(match: AuditMatch, *, full: bool = False) -> dict[str, Any]:
    """One flat row of a matched record: the table's columns, with ``full`` also its hash, details and
    evidence as JSON text (for CSV)."""
    row: dict[str, Any] = {
        "seq": match.seq,
        "recorded_at": match.recorded_at,
        "action": match.action,
        "subject": match.subject,
        "decision": match.decision,
        "actor": match.actor,
        "dag_run": f"{match.dag_id}/{match.run_id}" if match.dag_id else "",
        "authentic": _authentic_text(match.authentic),
    }
    if full:
        row["record_hash"] = match.record_hash
        row["details"] = json.dumps(match.details, sort_keys=True)
        row["evidence"] = json.dumps(match.evidence, sort_keys=True)
    return row


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, empty: str) -> str:
    if not rows:
        return empty
    cells = [["" if row.get(column) is None else str(row[column]) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    ]
    return "\n".join(lines)


def _csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: "" if row.get(column) is None else row.get(column) for column in columns})
    return out.getvalue().rstrip("\n")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def render_records(matches: Sequence[AuditMatch], fmt: str = "table") -> str:
    """Records as a table (a header line, one line each), JSON (a list of objects with their details,
    evidence and ``authentic``) or CSV (a header row; details and evidence as JSON text)."""
    _check_format(fmt)
    if fmt == "json":
        return json.dumps([match.to_dict() for match in matches], indent=2, sort_keys=True)
    rows = [record_row(match, full=fmt == "csv") for match in matches]
    if fmt == "csv":
        return _csv(rows, (*RECORD_COLUMNS, "record_hash", "details", "evidence"))
    return _table(rows, RECORD_COLUMNS, empty="no matching records")


def render_predictions(calls: Sequence[PredictionCall], fmt: str = "table") -> str:
    """Scoring calls as a table, JSON or CSV: request id, time, caller, model, version, arm, status, rows."""
    _check_format(fmt)
    rows = [call.to_dict() for call in calls]
    if fmt == "json":
        return json.dumps(rows, indent=2, sort_keys=True)
    if fmt == "csv":
        return _csv(rows, PREDICTION_COLUMNS)
    return _table(rows, PREDICTION_COLUMNS, empty="no matching calls")
