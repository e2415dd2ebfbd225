"""Retention of the sealed prediction log: whole batches removed, on record, once their time is up.

A sealed batch (see :mod:`modelops.audit.seals`) may be removed when its newest call is older than the
retention (``prediction_log_retention_days`` in ``include/modelops.yaml``, default 365). Removal is always
of the **whole** batch: its prediction rows, the labels of those rows and its seal row, in one transaction,
never part of it. Before anything is deleted an authentic ``predictions.expired`` audit record is written
(batch id, count, root, range, the retention applied and when it fell due), so
:func:`~modelops.audit.seals.verify_seals` can tell an expiry from a batch removed by someone else: it
accepts a removed batch only when such a record names it with the same root and was recorded no earlier
than its newest call plus that retention. Each removed call's request id is kept only as a sha256, with its
batch and expiry record, so ``modelops audit prove`` says that it expired rather than "not found".

Asked for a batch before its time (``batch_ids``, ``modelops audit expire --batch N``), it refuses with
:class:`ExpiryRefused`, naming the batch and its earliest expiry, and changes nothing. A batch whose rows
no longer match their authentic root is held back (named in the run): removing it would erase the evidence
of tampering. A run that stopped between the record and the deletion is completed by the next run (the
authentic record is found and the deletion done), and a retried task finds its record already written.

Audit records themselves are never removed: lifecycle records are kept for the model's life plus its
archive, and the chain must stay verifiable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from modelops.audit.seals import (
    SEALS_TABLE,
    Batch,
    Expiry,
    Recorder,
    SealError,
    authentic_expiries,
    earliest_expiry,
    ensure_seal_table,
    excusing_expiry,
    expired_ids_table,
    has_seal_table,
    in_range,
    iso,
    merkle_root,
    range_leaves,
    request_hash,
    seal_records,
    seals_table,
)
from modelops.errors import AuditChainBroken, ConfigurationError, GateFailed
from modelops.serving.prediction_log import labels_table, predictions_table
from modelops.stages.outcome import AuditEntry
from modelops.vocabulary import AuditAction, Decision, prediction_batch_subject

if TYPE_CHECKING:
    from modelops.audit.chain import AuditStore

DEFAULT_RETENTION = timedelta(days=365)


class ExpiryRefused(GateFailed):
    """A batch was asked to expire before its retention ran out (or is not a sealed batch)."""


@dataclass(frozen=True)
class ExpiryRun:
    """What one call of :func:`expire_batches` did (or, dry, would do)."""

    expired: tuple[int, ...]
    """Batches removed by this run (dry: that would be removed)."""
    records: int
    labels: int
    completed: tuple[int, ...] = ()
    """Of ``expired``, batches whose expiry record an earlier, stopped run had written already."""
    held: tuple[tuple[int, str], ...] = ()
    """Due batches kept: (batch id, why): their rows do not match their authentic root, or are gone
    without an expiry record."""
    retention_days: float = 0
    dry_run: bool = False
    next_due: str | None = None
    """When the oldest batch still kept falls due (None: no batch left)."""

    @property
    def summary(self) -> str:
        verb = "would expire" if self.dry_run else "expired"
        if self.expired:
            done = (
                f"{verb} {len(self.expired)} sealed batches ({self.expired[0]}..{self.expired[-1]}): "
                f"{self.records} prediction records and {self.labels} labels"
            )
        else:
            done = f"{verb} nothing"
        text = f"{done} (retention {self.retention_days:g} days)"
        if self.completed:
            text += f"; completed the removal of batches {list(self.completed)} recorded by a stopped run"
        if self.held:
            text += "; HELD, kept as evidence (run `modelops audit verify`): " + ", ".join(
                f"batch {batch_id} ({why})" for batch_id, why in self.held
            )
        if self.next_due is not None:
            text += f"; next due {self.next_due}"
        return text


def _authentic_batches(audit: AuditStore) -> dict[int, Batch]:
    batches: dict[int, Batch] = {}
    for record in seal_records(audit):
        if audit.authentic(record):
            batch = Batch.from_record(record)
            batches.setdefault(batch.batch_id, batch)
    return batches


def _batch_rows(engine: Engine, batch: Batch) -> list[tuple[str, str]]:
    """The batch's ``(request_id, leaf)`` now."""
    with engine.connect() as conn:
        return range_leaves(conn, batch.after, batch.last)


def _intact(batch: Batch, leaves: list[tuple[str, str]]) -> bool:
    return len(leaves) == batch.count and merkle_root([leaf for _, leaf in leaves]) == batch.root


def expire_batches(
    engine: Engine,
    audit: AuditStore,
    record: Recorder,
    now: datetime,
    retention: timedelta = DEFAULT_RETENTION,
    *,
    batch_ids: Iterable[int] | None = None,
    dry_run: bool = False,
) -> ExpiryRun:
    """Remove every sealed batch whose newest call is older than ``now - retention`` (or only
    ``batch_ids``, each of which must be due), whole: per batch, an authentic expiry record through
    ``record`` first, then its rows, their labels and its seal row in one transaction. ``dry_run``
    writes and deletes nothing. See the module docstring."""
    if retention <= timedelta(0):
        raise ConfigurationError(f"retention must be positive, got {retention}")
    if now.tzinfo is None:
        raise ConfigurationError(f"now must be timezone-aware (UTC), got {now.isoformat()}")
    retention_days = retention / timedelta(days=1)
    if not has_seal_table(engine):
        return ExpiryRun((), 0, 0, retention_days=retention_days, dry_run=dry_run)
    batches = _authentic_batches(audit)
    expiries, _ = authentic_expiries(audit)
    if batch_ids is not None:
        wanted = sorted(set(batch_ids))
        unknown = [batch_id for batch_id in wanted if batch_id not in batches]
        if unknown:
            raise ExpiryRefused(
                f"batches {unknown} have no authentic seal record, so there is nothing to expire; list the "
                "sealed batches with `modelops audit query --action predictions.sealed`"
            )
        early = [
            (batch_id, earliest_expiry(batches[batch_id], retention))
            for batch_id in wanted
            if earliest_expiry(batches[batch_id], retention) > now
        ]
        if early:
            raise ExpiryRefused(
                "refused, nothing removed: "
                + "; ".join(
                    f"batch {batch_id} may not expire before {iso(at)} (its newest call plus "
                    f"{retention_days:g} days of retention)"
                    for batch_id, at in early
                )
                + ". Wait until then, or leave the batch to the scheduled expiry"
            )
        candidates = [batches[batch_id] for batch_id in wanted]
    else:
        candidates = [
            batch for _, batch in sorted(batches.items()) if earliest_expiry(batch, retention) <= now
        ]
    if not dry_run:
        ensure_seal_table(engine)  # the index of expired request ids
    with engine.connect() as conn:
        seal_rows = set(conn.execute(sa.select(seals_table.c.batch_id)).scalars())
    expired: list[int] = []
    completed: list[int] = []
    held: list[tuple[int, str]] = []
    records = labels = 0
    for batch in candidates:
        recorded = excusing_expiry(batch, expiries.get(batch.batch_id, []))
        if recorded is not None and batch.batch_id not in seal_rows:
            continue  # expired by an earlier run (whether its rows stay gone is verify's to check)
        leaves = _batch_rows(engine, batch)
        if not leaves:
            if recorded is None:
                # Gone without a record: expiring it now would cover the deletion up; verify names it.
                held.append((batch.batch_id, "its rows were removed without an expiry record"))
                continue
        elif not _intact(batch, leaves):
            held.append((batch.batch_id, "its rows do not match its authentic root"))
            continue
        if dry_run:
            expired.append(batch.batch_id)
            records += len(leaves)
            labels += _count_labels(engine, batch)
            continue
        if recorded is None:
            recorded = _record_expiry(record, batch, retention_days, len(leaves), engine)
        else:
            completed.append(batch.batch_id)
        removed, removed_labels = _remove(engine, batch, recorded)
        if removed is None:
            held.append((batch.batch_id, "its rows changed while it was being removed"))
            continue
        expired.append(batch.batch_id)
        records += removed
        labels += removed_labels
    kept = [
        batch
        for batch in batches.values()
        if batch.batch_id not in expired and earliest_expiry(batch, retention) > now
    ]
    next_due = min((earliest_expiry(batch, retention) for batch in kept), default=None)
    return ExpiryRun(
        expired=tuple(expired),
        records=records,
        labels=labels,
        completed=tuple(completed),
        held=tuple(held),
        retention_days=retention_days,
        dry_run=dry_run,
        next_due=None if next_due is None else iso(next_due),
    )


def _in_batch(batch: Batch, dialect: str) -> sa.ColumnElement[bool]:
    return in_range(batch.after, batch.last, dialect)


def _count_labels(engine: Engine, batch: Batch) -> int:
    ids = sa.select(predictions_table.c.request_id).where(_in_batch(batch, engine.dialect.name))
    with engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(labels_table)
        return int(conn.execute(query.where(labels_table.c.request_id.in_(ids))).scalar_one())


def _record_expiry(
    record: Recorder, batch: Batch, retention_days: float, rows: int, engine: Engine
) -> Expiry:
    due = datetime.fromisoformat(batch.last.received_at) + timedelta(days=retention_days)
    details = {
        "batch_id": batch.batch_id,
        "count": batch.count,
        "root": batch.root,
        "seal_seq": batch.audit_seq,
        "after": None if batch.after is None else batch.after.to_dict(),
        "first": batch.first.to_dict(),
        "last": batch.last.to_dict(),
        "retention_days": retention_days,
        "due_at": iso(due),
        "records": rows,
        "labels": _count_labels(engine, batch),
        "table": SEALS_TABLE,
    }
    written = record(
        AuditEntry(
            action=AuditAction.PREDICTIONS_EXPIRED,
            subject=prediction_batch_subject(batch.batch_id),
            decision=Decision.EXPIRED,
            details=details,
            evidence={"merkle_root": batch.root},
        )
    )
    if written.get("details", {}).get("root") != batch.root:
        raise AuditChainBroken(
            f"batch {batch.batch_id} already has an expiry record (audit seq={written.get('seq')}) with "
            "another root than its authentic seal record; run `modelops audit verify`"
        )
    expiry = Expiry(
        batch_id=batch.batch_id,
        count=batch.count,
        root=batch.root,
        last=batch.last,
        retention_days=float(written["details"]["retention_days"]),
        audit_seq=int(written["seq"]),
        recorded_at=str(written["recorded_at"]),
    )
    if not expiry.was_due:
        # The clock given as ``now`` runs ahead of the audit log's: a removal now would read as early.
        raise ExpiryRefused(
            f"batch {batch.batch_id}'s expiry record seq={expiry.audit_seq} was recorded at "
            f"{expiry.recorded_at}, before its earliest expiry {iso(expiry.due_at)}: the clock passed as now "
            "is ahead of the audit log's; nothing was removed, the next run after that time removes it"
        )
    return expiry


def _remove(engine: Engine, batch: Batch, expiry: Expiry) -> tuple[int | None, int]:
    """Delete the batch's labels, rows and seal row in one transaction, after checking once more that the
    rows are the sealed ones (or gone); the removed request ids are indexed by hash. None: rows changed."""
    dialect = engine.dialect.name
    in_batch = _in_batch(batch, dialect)
    with engine.begin() as conn:
        leaves = range_leaves(conn, batch.after, batch.last)
        if leaves and not _intact(batch, leaves):
            return None, 0
        ids = sa.select(predictions_table.c.request_id).where(in_batch)
        labels = conn.execute(sa.delete(labels_table).where(labels_table.c.request_id.in_(ids))).rowcount
        removed = conn.execute(sa.delete(predictions_table).where(in_batch)).rowcount
        if removed != len(leaves):  # raised inside the transaction: nothing is deleted
            raise SealError(
                f"batch {batch.batch_id}: {removed} rows matched its range but {len(leaves)} were checked; "
                "nothing was removed; run `modelops audit verify`"
            )
        conn.execute(sa.delete(seals_table).where(seals_table.c.batch_id == batch.batch_id))
        if leaves:
            hashes = [request_hash(request_id) for request_id, _ in leaves]
            present = set(
                conn.execute(
                    sa.select(expired_ids_table.c.request_hash).where(
                        expired_ids_table.c.request_hash.in_(hashes)
                    )
                ).scalars()
            )
            rows = [
                {"request_hash": value, "batch_id": batch.batch_id, "expiry_seq": expiry.audit_seq}
                for value in hashes
                if value not in present
            ]
            if rows:
                conn.execute(expired_ids_table.insert(), rows)
    return removed, labels
