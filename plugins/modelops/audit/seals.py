"""Sealed prediction logs: batches of prediction-log records whose Merkle roots are audit records.

The prediction log (``modelops_predictions``, see :mod:`modelops.serving.prediction_log`) is written by
the gateway, not by the audit log, so on its own anyone with database access could edit a call's
outputs, delete a call or insert one. Sealing closes that: the rows not sealed yet, in the order
``(received_at, request_id)``, are cut into batches of at most ``batch_size`` records, taking only rows
older than ``now - settle`` (the gateway's batched writer may still be writing the newest ones). Each
batch is one contiguous range of that order: it holds every row after the previous batch's last row up
to and including its own last row, so no row can later appear between two batches unseen.

For each batch:

- every row is a **leaf**: sha256 over ``0x00`` and a canonical JSON encoding of every column of the
  row (request id, received_at as UTC ISO text, caller, model, version, status, latency, rows, inputs and
  outputs as the stored JSON text, error, traceparent, arm, flags);
- the leaves make a **Merkle tree** as in RFC 6962 (a node is sha256 over ``0x01``, left, right), whose
  **root** is recorded in the audit chain as an authentic ``predictions.sealed`` record (its details:
  batch id, count, root and the range) and so is protected by the chain's HMAC and its anchors;
- a row in ``modelops_prediction_seals`` (in the prediction log's database) indexes the batch: its range,
  count, root, the audit record's seq, and its leaves (request id and leaf hash, in order). The leaves
  are not trusted as such: they count only when they hash to the authentic root, and then they name
  which record of a broken batch was altered, deleted or inserted.

Labels (``modelops_labels``) are **not** sealed: ground truth arrives after the call, often long after
its batch was sealed, and a redelivery may replace it. Nor are rows newer than the newest batch (written
since the last sealing run, or younger than ``settle``).

:func:`verify_seals` proves, given the audit store's keyring: every record in a sealed range is as it
was sealed (an altered, deleted or inserted record is named with its batch, and by its request id when
the batch's leaves are intact); a batch removed whole (rows and seal row) is named by the audit record
that still holds its root; a seal row that matches no authentic audit record (forged, or edited) is
named. A batch removed whole by retention (:mod:`modelops.audit.retention`) is accepted only when an
authentic ``predictions.expired`` record names it with the same root and count, recorded no earlier than its
newest call plus the retention it states; removed earlier, or without such a record, it is still named.
It cannot see rows that were never written, rows changed before they were sealed, nor (if the
audit chain itself is rewritten) anything the chain's own verification would not: run it with
:meth:`~modelops.audit.chain.AuditStore.verify` and the anchors, as ``modelops audit verify`` does.

:func:`inclusion_proof` gives one record's leaf, its audit path and the batch's root and audit record;
:func:`verify_proof` checks it (and, with the audit store, that the root is the authentic record's).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from modelops.errors import AuditChainBroken, ConfigurationError, ModelOpsError
from modelops.serving.prediction_log import predictions_table
from modelops.stages.outcome import AuditEntry
from modelops.vocabulary import AuditAction, Decision, prediction_batch_subject

if TYPE_CHECKING:
    from modelops.audit.chain import AuditRecord, AuditStore

SEALS_TABLE = "modelops_prediction_seals"
DEFAULT_BATCH_SIZE = 1_000
DEFAULT_SETTLE = timedelta(minutes=1)
LEAF_ENCODING = "modelops.prediction.v1"
"""Names the leaf encoding in every seal record, so a later encoding can be told apart."""

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
# Sealed rows are read back this many at a time when a batch is recomputed.
_FETCH_BATCH = 1_000
_ORDER_INDEX = "ix_modelops_predictions_received_request"

_metadata = sa.MetaData()
seals_table = sa.Table(
    SEALS_TABLE,
    _metadata,
    sa.Column("batch_id", sa.Integer, primary_key=True, autoincrement=False),
    # The range (after, last]: the previous batch's last row (NULL for the first batch) and this one's.
    sa.Column("after_received_at", sa.String(40), nullable=True),
    sa.Column("after_request_id", sa.String(32), nullable=True),
    sa.Column("first_received_at", sa.String(40), nullable=False),
    sa.Column("first_request_id", sa.String(32), nullable=False),
    sa.Column("last_received_at", sa.String(40), nullable=False),
    sa.Column("last_request_id", sa.String(32), nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("root", sa.String(64), nullable=False),
    sa.Column("sealed_at", sa.String(40), nullable=False),
    sa.Column("audit_seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
    # JSON [[request_id, leaf_hex], ...] in order: trusted only when it hashes to the authentic root.
    sa.Column("leaves", sa.Text, nullable=False),
)

EXPIRED_IDS_TABLE = "modelops_prediction_expired_ids"
expired_ids_table = sa.Table(
    EXPIRED_IDS_TABLE,
    _metadata,
    # sha256 of the request id, hex: which batch and expiry record removed a call, without keeping its id.
    sa.Column("request_hash", sa.String(64), primary_key=True),
    sa.Column("batch_id", sa.Integer, nullable=False),
    sa.Column("expiry_seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
)

_COLUMNS = tuple(column.name for column in predictions_table.columns)


class SealError(ModelOpsError):
    """The prediction log cannot be sealed or proven as asked."""


class NotSealed(SealError, KeyError):
    """The request is not in a sealed batch (unknown, or newer than the newest batch)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RecordExpired(SealError):
    """The request was in a sealed batch that retention removed whole, on an authentic expiry record."""

    def __init__(self, message: str, *, batch_id: int, expiry_seq: int) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.expiry_seq = expiry_seq


# --- leaves and the Merkle tree (RFC 6962) ------------------------------------------------------------


def iso(value: datetime) -> str:
    """The one text form of a ``received_at``: UTC, microseconds, ``+00:00``; sorts as it compares."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value.isoformat()}; the prediction log stores UTC")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def leaf_content(row: Mapping[str, Any]) -> bytes:
    """The canonical encoding of every column of one prediction row (what a leaf hashes)."""
    values: dict[str, Any] = {name: row[name] for name in _COLUMNS}
    values["received_at"] = iso(row["received_at"])
    values["latency_ms"] = float(row["latency_ms"])
    values["encoding"] = LEAF_ENCODING
    # allow_nan: a NaN latency is still one exact text; sorted keys and no whitespace make it canonical.
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def leaf_hash(row: Mapping[str, Any]) -> str:
    """The leaf of one prediction row: sha256(0x00 || canonical row), hex."""
    return hashlib.sha256(_LEAF_PREFIX + leaf_content(row)).hexdigest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """The tree bottom-up; an odd last node moves up unchanged, which is RFC 6962's tree."""
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        below = levels[-1]
        above = [_node(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
        if len(below) % 2:
            above.append(below[-1])
        levels.append(above)
    return levels


def merkle_root(leaves: Sequence[str]) -> str:
    """The RFC 6962 Merkle tree hash of the leaf hashes (hex), hex; sha256 of nothing for no leaf."""
    if not leaves:
        return hashlib.sha256(b"").hexdigest()
    return _levels([bytes.fromhex(leaf) for leaf in leaves])[-1][0].hex()


def audit_path(leaves: Sequence[str], index: int) -> list[str]:
    """The RFC 6962 audit path of leaf ``index``: the sibling hashes from the leaf up to the root."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf index {index} is outside a tree of {len(leaves)} leaves")
    path: list[str] = []
    for level in _levels([bytes.fromhex(leaf) for leaf in leaves])[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling].hex())
        index //= 2
    return path


def root_from_path(leaf: str, index: int, size: int, path: Sequence[str]) -> str | None:
    """The root that ``leaf`` at ``index`` of a tree of ``size`` leaves and its ``path`` lead to (RFC 9162,
    2.1.3.2), or None when the path cannot belong to such a tree."""
    if not 0 <= index < size:
        return None
    fn, sn = index, size - 1
    result = bytes.fromhex(leaf)
    for sibling_hex in path:
        if sn == 0:
            return None
        sibling = bytes.fromhex(sibling_hex)
        if fn & 1 or fn == sn:
            result = _node(sibling, result)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            result = _node(result, sibling)
        fn >>= 1
        sn >>= 1
    return result.hex() if sn == 0 else None


# --- reading the log ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """A place in the order ``(received_at, request_id)`` of the prediction log."""

    received_at: str
    request_id: str

    def to_dict(self) -> dict[str, str]:
        return {"received_at": self.received_at, "request_id": self.request_id}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any] | None) -> Position | None:
        if value is None:
            return None
        return cls(str(value["received_at"]), str(value["request_id"]))


def _bytewise(column: sa.ColumnElement[str], dialect: str) -> sa.ColumnElement[str]:
    """``column`` compared byte by byte on every backend: the order of request ids must not depend on the
    database's locale (a restore into a server with another collation would move rows between batches).
    SQLite compares bytes already; PostgreSQL does with the collation "C"."""
    return column.collate("C") if dialect == "postgresql" else column


def _after(position: Position | None, dialect: str) -> sa.ColumnElement[bool]:
    table = predictions_table
    if position is None:
        return sa.true()
    at = datetime.fromisoformat(position.received_at)
    # The first condition is implied by the second; it lets the database use the index on received_at.
    return sa.and_(
        table.c.received_at >= at,
        sa.or_(
            table.c.received_at > at,
            sa.and_(table.c.received_at == at, _bytewise(table.c.request_id, dialect) > position.request_id),
        ),
    )


def _up_to(position: Position, dialect: str) -> sa.ColumnElement[bool]:
    table = predictions_table
    at = datetime.fromisoformat(position.received_at)
    return sa.and_(
        table.c.received_at <= at,
        sa.or_(
            table.c.received_at < at,
            sa.and_(table.c.received_at == at, _bytewise(table.c.request_id, dialect) <= position.request_id),
        ),
    )


def _ordered(query: sa.Select[Any], dialect: str) -> sa.Select[Any]:
    return query.order_by(predictions_table.c.received_at, _bytewise(predictions_table.c.request_id, dialect))


def in_range(after: Position | None, last: Position, dialect: str) -> sa.ColumnElement[bool]:
    """The SQL condition on ``modelops_predictions`` that holds for exactly the rows in the range
    (``after``, ``last``] of the order ``(received_at, request_id)``: a batch's rows when given its
    ``after`` and ``last``. ``after`` None: from the first row. ``dialect`` is the engine's
    (``engine.dialect.name``), so request ids compare byte by byte on every backend."""
    return sa.and_(_after(after, dialect), _up_to(last, dialect))


def range_leaves(conn: Connection, after: Position | None, last: Position) -> list[tuple[str, str]]:
    """``(request_id, leaf)`` of every row now in the range (``after``, ``last``], in order: what a batch
    with that range hashes to now (compare with its authentic root to tell whether it is intact)."""
    dialect = conn.dialect.name
    query = _ordered(sa.select(predictions_table).where(in_range(after, last, dialect)), dialect)
    result = conn.execute(query.execution_options(yield_per=_FETCH_BATCH))
    return [(row.request_id, leaf_hash(row._mapping)) for row in result]


def ensure_seal_table(engine: Engine) -> None:
    """Create the seal table, and the index sealing reads the prediction log by, where missing."""
    _metadata.create_all(engine, checkfirst=True)
    # Not in the prediction log's own table definition: only sealing needs it, and create_all adds no
    # index to a table that exists. On PostgreSQL the first run holds writes while the index is built.
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE INDEX IF NOT EXISTS {_ORDER_INDEX} ON {predictions_table.name} (received_at, request_id)"
        )


def has_seal_table(engine: Engine) -> bool:
    """Whether the prediction log's database holds the seal table (False: nothing was ever sealed there)."""
    return sa.inspect(engine).has_table(SEALS_TABLE)


# --- seal records in the audit chain ------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """One sealed batch as its authentic audit record states it."""

    batch_id: int
    count: int
    root: str
    after: Position | None
    first: Position
    last: Position
    audit_seq: int
    recorded_at: str
    record_hash: str = ""

    @classmethod
    def from_record(cls, record: AuditRecord) -> Batch:
        details = record.details
        first = Position.from_dict(details.get("first"))
        last = Position.from_dict(details.get("last"))
        if first is None or last is None:
            raise SealError(
                f"seal record seq={record.seq} names no first or last record: it was not written by "
                "modelops.audit.seals; run `modelops audit verify`"
            )
        return cls(
            batch_id=int(details["batch_id"]),
            count=int(details["count"]),
            root=str(details["root"]),
            after=Position.from_dict(details.get("after")),
            first=first,
            last=last,
            audit_seq=record.seq,
            recorded_at=record.recorded_at,
            record_hash=record.record_hash,
        )


def seal_records(audit: AuditStore) -> list[AuditRecord]:
    """Every ``predictions.sealed`` record with the decision ``sealed``, in seq order, authentic or not:
    check each with :meth:`~modelops.audit.chain.AuditStore.authentic` before trusting what it states."""
    records = audit.records(action=AuditAction.PREDICTIONS_SEALED)
    return [record for record in records if record.decision == Decision.SEALED]


def _newest_authentic_batch(audit: AuditStore) -> Batch | None:
    """The newest batch an authentic seal record states (read from the newest records first)."""
    limit = 16
    while True:
        records = audit.records(action=AuditAction.PREDICTIONS_SEALED, limit=limit)
        for record in reversed(records):
            if record.decision == Decision.SEALED and audit.authentic(record):
                return Batch.from_record(record)
        if len(records) < limit:
            return None
        limit *= 4


# --- sealing ------------------------------------------------------------------------------------------

Recorder = Callable[[AuditEntry], Mapping[str, Any]]
"""Writes one entry to the audit log now and returns the record as a dict (``seq``, ``details``...)."""


@dataclass(frozen=True)
class SealRun:
    """What one call of :func:`seal` did."""

    batches: tuple[int, ...]
    records: int
    restored: tuple[int, ...] = ()
    """Seal rows written again from their audit record (a run that stopped between the two)."""
    cutoff: str = ""
    newest_batch: int | None = None

    @property
    def summary(self) -> str:
        if not self.batches:
            sealed = "nothing new to seal"
        else:
            sealed = f"sealed {self.records} prediction records in {len(self.batches)} batches " + (
                f"({self.batches[0]}..{self.batches[-1]})"
            )
        restored = f"; restored the seal rows of batches {list(self.restored)}" if self.restored else ""
        return f"{sealed} (rows received before {self.cutoff}){restored}"


def store_recorder(audit: AuditStore, actor: str) -> Recorder:
    """A recorder for use outside Airflow: appends with ``actor`` (the caller anchors the head after)."""

    def record(entry: AuditEntry) -> Mapping[str, Any]:
        return audit.append(
            actor=actor,
            action=entry.action,
            subject=entry.subject,
            decision=entry.decision,
            details=entry.details,
            evidence=entry.evidence,
        ).to_dict()

    return record


def seal(
    engine: Engine,
    audit: AuditStore,
    record: Recorder,
    *,
    now: datetime,
    batch_size: int = DEFAULT_BATCH_SIZE,
    settle: timedelta = DEFAULT_SETTLE,
) -> SealRun:
    """Seal every prediction row received before ``now - settle`` that no batch holds yet, in batches of
    at most ``batch_size``: per batch, the root goes to the audit log through ``record``, then its seal
    row is written. Safe to rerun after a failure: where to continue is read from the newest authentic
    seal record, and a seal row that a stopped run did not write is written from it."""
    if batch_size < 1:
        raise ConfigurationError(f"batch_size must be at least 1, got {batch_size}")
    if settle < timedelta(0):
        raise ConfigurationError(f"settle must not be negative, got {settle}")
    ensure_seal_table(engine)
    cutoff = now - settle
    newest = _newest_authentic_batch(audit)
    restored: list[int] = []
    if newest is not None and _restore_missing_seal_row(engine, newest):
        restored.append(newest.batch_id)
    after = None if newest is None else newest.last
    next_id = 1 if newest is None else newest.batch_id + 1
    sealed: list[int] = []
    total = 0
    table = predictions_table
    dialect = engine.dialect.name
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                _ordered(
                    sa.select(table).where(_after(after, dialect), table.c.received_at < cutoff), dialect
                ).limit(batch_size)
            ).all()
        if not rows:
            break
        leaves = [(row.request_id, leaf_hash(row._mapping)) for row in rows]
        root = merkle_root([leaf for _, leaf in leaves])
        first = Position(iso(rows[0].received_at), rows[0].request_id)
        last = Position(iso(rows[-1].received_at), rows[-1].request_id)
        details = {
            "batch_id": next_id,
            "count": len(rows),
            "root": root,
            "after": None if after is None else after.to_dict(),
            "first": first.to_dict(),
            "last": last.to_dict(),
            "encoding": LEAF_ENCODING,
            "table": SEALS_TABLE,
        }
        written = record(
            AuditEntry(
                action=AuditAction.PREDICTIONS_SEALED,
                subject=prediction_batch_subject(next_id),
                decision=Decision.SEALED,
                details=details,
                evidence={"merkle_root": root},
            )
        )
        if written.get("details", {}).get("root") != root:
            # The recorder returned an earlier record of this batch id (a retried task) that seals other
            # rows: the log changed under the sealed range since. Never write a second, different seal.
            raise AuditChainBroken(
                f"batch {next_id} is already recorded (audit seq={written.get('seq')}) with another root "
                "than its rows have now; run `modelops audit verify` to see what changed"
            )
        _insert_seal_row(engine, next_id, details, int(written["seq"]), str(written["recorded_at"]), leaves)
        sealed.append(next_id)
        total += len(rows)
        after = last
        next_id += 1
    return SealRun(
        batches=tuple(sealed),
        records=total,
        restored=tuple(restored),
        cutoff=iso(cutoff),
        newest_batch=(next_id - 1) or None,
    )


def _insert_seal_row(
    engine: Engine,
    batch_id: int,
    details: Mapping[str, Any],
    audit_seq: int,
    sealed_at: str,
    leaves: Sequence[tuple[str, str]],
) -> None:
    after = details["after"] or {}
    values = {
        "batch_id": batch_id,
        "after_received_at": after.get("received_at"),
        "after_request_id": after.get("request_id"),
        "first_received_at": details["first"]["received_at"],
        "first_request_id": details["first"]["request_id"],
        "last_received_at": details["last"]["received_at"],
        "last_request_id": details["last"]["request_id"],
        "count": details["count"],
        "root": details["root"],
        "sealed_at": sealed_at,
        "audit_seq": audit_seq,
        "leaves": json.dumps([list(pair) for pair in leaves], separators=(",", ":")),
    }
    try:
        with engine.begin() as conn:
            conn.execute(seals_table.insert().values(**values))
    except sa.exc.IntegrityError as exc:
        raise SealError(
            f"{SEALS_TABLE} already holds a row for batch {batch_id} that its authentic audit record "
            f"(seq={audit_seq}) did not write: another sealer ran at the same time, or the row was forged; "
            "run `modelops audit verify` and seal again"
        ) from exc


def _restore_missing_seal_row(engine: Engine, batch: Batch) -> bool:
    """Write ``batch``'s seal row from its record if it is missing and its rows still hash to the root."""
    with engine.connect() as conn:
        present = conn.execute(
            sa.select(seals_table.c.batch_id).where(seals_table.c.batch_id == batch.batch_id)
        ).first()
        if present is not None:
            return False
        leaves = range_leaves(conn, batch.after, batch.last)
    if len(leaves) != batch.count or merkle_root([leaf for _, leaf in leaves]) != batch.root:
        return False  # not a stopped run: verify names what happened to the batch
    details = {
        "count": batch.count,
        "root": batch.root,
        "after": None if batch.after is None else batch.after.to_dict(),
        "first": batch.first.to_dict(),
        "last": batch.last.to_dict(),
    }
    _insert_seal_row(engine, batch.batch_id, details, batch.audit_seq, batch.recorded_at, leaves)
    return True


# --- expiry records (written by modelops.audit.retention, read by verify and prove) ---------------------


def request_hash(request_id: str) -> str:
    """sha256 of a request id (hex): the key of an expired call in ``modelops_prediction_expired_ids``."""
    return hashlib.sha256(request_id.encode("utf-8")).hexdigest()


def earliest_expiry(batch: Batch, retention: timedelta) -> datetime:
    """When ``batch`` may be removed under ``retention``: its newest call's time plus the retention."""
    return datetime.fromisoformat(batch.last.received_at) + retention


@dataclass(frozen=True)
class Expiry:
    """One batch's removal as its authentic ``predictions.expired`` record states it."""

    batch_id: int
    count: int
    root: str
    last: Position
    retention_days: float
    audit_seq: int
    recorded_at: str

    @property
    def due_at(self) -> datetime:
        return datetime.fromisoformat(self.last.received_at) + timedelta(days=self.retention_days)

    @property
    def was_due(self) -> bool:
        """Recorded no earlier than the batch's newest call plus the (positive) retention it applied."""
        return self.retention_days > 0 and datetime.fromisoformat(self.recorded_at) >= self.due_at

    def names(self, batch: Batch) -> bool:
        return (self.batch_id, self.count, self.root, self.last) == (
            batch.batch_id,
            batch.count,
            batch.root,
            batch.last,
        )

    @classmethod
    def from_record(cls, record: AuditRecord) -> Expiry:
        details = record.details
        last = Position.from_dict(details.get("last"))
        if last is None or "retention_days" not in details:
            raise SealError(
                f"expiry record seq={record.seq} names no last record or retention: it was not written by "
                "modelops.audit.retention; run `modelops audit verify`"
            )
        return cls(
            batch_id=int(details["batch_id"]),
            count=int(details["count"]),
            root=str(details["root"]),
            last=last,
            retention_days=float(details["retention_days"]),
            audit_seq=record.seq,
            recorded_at=record.recorded_at,
        )


def authentic_expiries(audit: AuditStore) -> tuple[dict[int, list[Expiry]], list[AuditRecord]]:
    """Every authentic expiry record by batch id, and the expiry records that fail their HMAC check."""
    expiries: dict[int, list[Expiry]] = {}
    forged: list[AuditRecord] = []
    for record in audit.records(action=AuditAction.PREDICTIONS_EXPIRED):
        if record.decision != Decision.EXPIRED:
            continue
        if not audit.authentic(record):
            forged.append(record)
            continue
        expiry = Expiry.from_record(record)
        expiries.setdefault(expiry.batch_id, []).append(expiry)
    return expiries, forged


def excusing_expiry(batch: Batch, expiries: Sequence[Expiry]) -> Expiry | None:
    """The first authentic expiry record that names ``batch`` as sealed and was due when recorded."""
    return next((expiry for expiry in expiries if expiry.names(batch) and expiry.was_due), None)


# --- verifying ----------------------------------------------------------------------------------------


class SealProblem(StrEnum):
    """What :func:`verify_seals` found."""

    RECORD_ALTERED = "record_altered"
    RECORD_DELETED = "record_deleted"
    RECORD_INSERTED = "record_inserted"
    BATCH_ALTERED = "batch_altered"
    """The batch's rows do not hash to its root, and its leaves cannot say which record changed."""
    BATCH_REMOVED = "batch_removed"
    """The audit chain holds the batch's root but its rows and seal row are gone."""
    SEAL_ROW_MISSING = "seal_row_missing"
    """The rows match the authentic root but the seal row is gone (restored by the next sealing run)."""
    SEAL_ROW_FORGED = "seal_row_forged"
    """A seal row that matches no authentic audit record, or differs from it."""
    SEAL_RECORD_FORGED = "seal_record_forged"
    """A ``predictions.sealed`` record that fails its hash or HMAC check (ignored)."""
    BATCHES_NOT_CONTIGUOUS = "batches_not_contiguous"
    BATCH_EXPIRED_EARLY = "batch_expired_early"
    """The batch was removed under an authentic expiry record written before its retention ran out."""
    EXPIRY_RECORD_FORGED = "expiry_record_forged"
    """A ``predictions.expired`` record that fails its hash or HMAC check (excuses nothing)."""


@dataclass(frozen=True)
class SealFinding:
    kind: SealProblem
    message: str
    batch_id: int | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class SealVerification:
    ok: bool
    batches: int
    """Authentic seal records checked."""
    records: int
    """Prediction rows in sealed ranges now."""
    unsealed: int
    """Prediction rows after the newest sealed batch (not sealed yet)."""
    findings: tuple[SealFinding, ...] = ()
    expired: int = 0
    """Batches removed whole by retention on an authentic expiry record that was due."""

    @property
    def problem(self) -> str | None:
        return "; ".join(finding.message for finding in self.findings) or None

    @property
    def attack(self) -> SealProblem | None:
        return self.findings[0].kind if self.findings else None


def verify_seals(engine: Engine, audit: AuditStore) -> SealVerification:
    """Recompute every sealed batch from the prediction log and compare it with its authentic audit
    record; name every problem (see the module docstring for what this proves)."""
    findings: list[SealFinding] = []
    batches: dict[int, Batch] = {}
    for record in seal_records(audit):
        if not audit.authentic(record):
            findings.append(
                SealFinding(
                    SealProblem.SEAL_RECORD_FORGED,
                    f"seal record seq={record.seq} fails its hash or HMAC check: written or altered without "
                    "the audit key (ignored; `modelops audit verify` names it in the chain)",
                )
            )
            continue
        batch = Batch.from_record(record)
        earlier = batches.get(batch.batch_id)
        if earlier is not None and (earlier.root, earlier.count) != (batch.root, batch.count):
            findings.append(
                SealFinding(
                    SealProblem.BATCHES_NOT_CONTIGUOUS,
                    f"batch {batch.batch_id} is sealed twice with different roots (seq={earlier.audit_seq} "
                    f"and seq={batch.audit_seq}): two sealers ran at once over a changing log",
                    batch.batch_id,
                )
            )
        batches.setdefault(batch.batch_id, batch)
    expiries, forged_expiries = authentic_expiries(audit)
    findings.extend(
        SealFinding(
            SealProblem.EXPIRY_RECORD_FORGED,
            f"expiry record seq={record.seq} fails its hash or HMAC check: written or altered without the "
            "audit key (it excuses no removal)",
        )
        for record in forged_expiries
    )
    seal_rows = _seal_rows(engine)
    findings.extend(_forged_seal_rows(seal_rows, batches))
    findings.extend(_gaps(batches))
    checked = 0
    expired = 0
    with engine.connect() as conn:
        for batch in sorted(batches.values(), key=lambda item: item.batch_id):
            leaves = range_leaves(conn, batch.after, batch.last)
            checked += len(leaves)
            of_batch = expiries.get(batch.batch_id, [])
            if not leaves and excusing_expiry(batch, of_batch) is not None:
                expired += 1  # removed whole under its retention, on record
                continue
            findings.extend(_batch_findings(engine, batch, leaves, seal_rows.get(batch.batch_id), of_batch))
        newest = max(batches.values(), key=lambda item: item.batch_id).last if batches else None
        unsealed = int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(predictions_table)
                .where(_after(newest, conn.dialect.name))
            ).scalar_one()
        )
    return SealVerification(not findings, len(batches), checked, unsealed, tuple(findings), expired)


def _seal_rows(engine: Engine) -> dict[int, Mapping[str, Any]]:
    """Every seal row without its leaves (read only for a batch that does not verify)."""
    if not has_seal_table(engine):
        return {}
    columns = [column for column in seals_table.columns if column.name != "leaves"]
    with engine.connect() as conn:
        return {int(row.batch_id): dict(row._mapping) for row in conn.execute(sa.select(*columns))}


def _stored_leaves(engine: Engine, batch_id: int) -> str | None:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(seals_table.c.leaves).where(seals_table.c.batch_id == batch_id)
        ).scalar()


def _forged_seal_rows(
    seal_rows: Mapping[int, Mapping[str, Any]], batches: Mapping[int, Batch]
) -> list[SealFinding]:
    findings = []
    for batch_id, row in sorted(seal_rows.items()):
        batch = batches.get(batch_id)
        if batch is None:
            findings.append(
                SealFinding(
                    SealProblem.SEAL_ROW_FORGED,
                    f"seal row of batch {batch_id} matches no authentic seal record in the audit log "
                    f"(it names seq={row['audit_seq']}): forged",
                    batch_id,
                )
            )
            continue
        differs = [
            name
            for name, expected in (
                ("root", batch.root),
                ("count", batch.count),
                ("audit_seq", batch.audit_seq),
                ("last_received_at", batch.last.received_at),
                ("last_request_id", batch.last.request_id),
                ("after_received_at", None if batch.after is None else batch.after.received_at),
                ("after_request_id", None if batch.after is None else batch.after.request_id),
            )
            if row[name] != expected
        ]
        if differs:
            findings.append(
                SealFinding(
                    SealProblem.SEAL_ROW_FORGED,
                    f"seal row of batch {batch_id} differs from its authentic audit record seq={batch.audit_seq} "
                    f"in {', '.join(differs)}: edited",
                    batch_id,
                )
            )
    return findings


def _gaps(batches: Mapping[int, Batch]) -> list[SealFinding]:
    findings = []
    ordered = sorted(batches.values(), key=lambda item: item.batch_id)
    previous: Batch | None = None
    for batch in ordered:
        expected = None if previous is None else previous.last
        if (previous is None and batch.batch_id != 1) or (
            previous is not None and batch.batch_id != previous.batch_id + 1
        ):
            findings.append(
                SealFinding(
                    SealProblem.BATCHES_NOT_CONTIGUOUS,
                    f"no authentic seal record of batch {1 if previous is None else previous.batch_id + 1} "
                    f"before batch {batch.batch_id}: its record was deleted or forged",
                    batch.batch_id,
                )
            )
        elif batch.after != expected:
            findings.append(
                SealFinding(
                    SealProblem.BATCHES_NOT_CONTIGUOUS,
                    f"batch {batch.batch_id} does not start where batch {batch.batch_id - 1} ends",
                    batch.batch_id,
                )
            )
        previous = batch
    return findings


def _batch_findings(
    engine: Engine,
    batch: Batch,
    leaves: list[tuple[str, str]],
    seal_row: Mapping[str, Any] | None,
    expiries: Sequence[Expiry] = (),
) -> list[SealFinding]:
    intact = len(leaves) == batch.count and merkle_root([leaf for _, leaf in leaves]) == batch.root
    where = f"batch {batch.batch_id} (audit seq={batch.audit_seq})"
    if intact:
        if seal_row is None:
            return [
                SealFinding(
                    SealProblem.SEAL_ROW_MISSING,
                    f"the seal row of {where} is missing; its {batch.count} records still match the "
                    "authentic root (deleted, or a sealing run stopped before writing it: the next "
                    "`modelops audit seal` writes the newest batch's row again)",
                    batch.batch_id,
                )
            ]
        return []
    early = [expiry for expiry in expiries if expiry.names(batch) and not expiry.was_due]
    if not leaves and early:
        return [
            SealFinding(
                SealProblem.BATCH_EXPIRED_EARLY,
                f"{where} was removed early: its expiry record seq={early[0].audit_seq} was recorded at "
                f"{early[0].recorded_at}, before its earliest expiry {iso(early[0].due_at)} (newest call "
                f"{batch.last.received_at} plus {early[0].retention_days:g} days of retention)",
                batch.batch_id,
            )
        ]
    if not leaves and seal_row is None:
        return [
            SealFinding(
                SealProblem.BATCH_REMOVED,
                f"{where} was removed whole: the audit log holds its root over {batch.count} records received "
                f"{batch.first.received_at}..{batch.last.received_at}, but its seal row and every one of its "
                "records are gone",
                batch.batch_id,
            )
        ]
    sealed = None if seal_row is None else _trusted_leaves(batch, _stored_leaves(engine, batch.batch_id))
    if sealed is None:
        return [
            SealFinding(
                SealProblem.BATCH_ALTERED,
                f"{where} does not match its authentic root: {len(leaves)} records now, {batch.count} sealed "
                "(its seal row's leaves are missing or altered too, so the record cannot be named)",
                batch.batch_id,
            )
        ]
    return _diff(where, batch.batch_id, sealed, leaves)


def _trusted_leaves(batch: Batch, stored: str | None) -> list[tuple[str, str]] | None:
    """A seal row's leaves (its JSON text) if they hash to the authentic root (then each is as sealed)."""
    if stored is None:
        return None
    try:
        leaves = [(str(request_id), str(leaf)) for request_id, leaf in json.loads(stored)]
        if len(leaves) == batch.count and merkle_root([leaf for _, leaf in leaves]) == batch.root:
            return leaves
    except (TypeError, ValueError):
        pass  # not JSON pairs of hex: edited, so not trusted
    return None


def _diff(
    where: str, batch_id: int, sealed: list[tuple[str, str]], now: list[tuple[str, str]]
) -> list[SealFinding]:
    sealed_leaves = {leaf for _, leaf in sealed}
    now_leaves = {leaf for _, leaf in now}
    changed_now = {request_id for request_id, leaf in now if leaf not in sealed_leaves}
    gone = {request_id for request_id, leaf in sealed if leaf not in now_leaves}
    findings = []
    # Request ids are the gateway's own (or, for an insertion, the intruder's); never the data.
    for request_id in sorted(changed_now & gone):
        findings.append(
            SealFinding(
                SealProblem.RECORD_ALTERED,
                f"prediction record {request_id} in {where} was altered after sealing",
                batch_id,
                request_id,
            )
        )
    for request_id in sorted(gone - changed_now):
        findings.append(
            SealFinding(
                SealProblem.RECORD_DELETED,
                f"prediction record {request_id} in {where} was deleted after sealing",
                batch_id,
                request_id,
            )
        )
    for request_id in sorted(changed_now - gone):
        findings.append(
            SealFinding(
                SealProblem.RECORD_INSERTED,
                f"prediction record {request_id} was inserted into {where} after sealing",
                batch_id,
                request_id,
            )
        )
    if not findings:  # e.g. rows reordered by an edited received_at within the batch
        findings.append(
            SealFinding(
                SealProblem.BATCH_ALTERED,
                f"{where} does not match its authentic root although every sealed record is present",
                batch_id,
            )
        )
    return findings


# --- proving ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InclusionProof:
    """That one prediction record, as it is now, is leaf ``leaf_index`` of a sealed batch's tree."""

    request_id: str
    batch_id: int
    leaf_index: int
    tree_size: int
    leaf: str
    """sha256(0x00 || canonical row) of the record as it is in the log now."""
    path: list[str] = field(default_factory=list)
    root: str = ""
    audit_seq: int = 0
    audit_record_hash: str = ""
    encoding: str = LEAF_ENCODING

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> InclusionProof:
        return cls(**{name: value[name] for name in cls.__dataclass_fields__ if name in value})


@dataclass(frozen=True)
class ProofCheck:
    ok: bool
    reason: str


def inclusion_proof(engine: Engine, audit: AuditStore, request_id: str) -> InclusionProof:
    """The proof that the record ``request_id`` is in its sealed batch, built from the record as it is now
    and the batch's leaves (the seal row's if they hash to the authentic root, else the rows'). A record
    altered after sealing still gets a proof, which then fails :func:`verify_proof`."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(predictions_table).where(predictions_table.c.request_id == request_id)
        ).first()
    if row is None:
        _raise_if_expired(engine, audit, request_id)
        raise NotSealed(f"request id {request_id!r} is not in the prediction log; check the X-Request-Id")
    leaf = leaf_hash(row._mapping)
    seal_row = _seal_row_holding(engine, iso(row.received_at), request_id)
    batch = (
        None
        if seal_row is None
        else _authentic_batch(audit, int(seal_row["batch_id"]), int(seal_row["audit_seq"]))
    )
    if batch is None:
        raise NotSealed(
            f"request {request_id} (received {iso(row.received_at)}) is in no sealed batch: it is newer than "
            "the newest batch (run `modelops audit seal`), or the seal table was changed (run "
            "`modelops audit verify`)"
        )
    position = Position(iso(row.received_at), request_id)
    if batch.after is not None and (position.received_at, position.request_id) <= (
        batch.after.received_at,
        batch.after.request_id,
    ):
        raise NotSealed(
            f"request {request_id} lies before batch {batch.batch_id}, but the seal table has no row for the "
            "batch that holds it; run `modelops audit verify` (and `modelops audit seal` to restore the row)"
        )
    leaves = _trusted_leaves(batch, None if seal_row is None else seal_row["leaves"])
    if leaves is None:
        with engine.connect() as conn:
            leaves = range_leaves(conn, batch.after, batch.last)
    ids = [pair[0] for pair in leaves]
    if request_id not in ids:
        raise SealError(
            f"request {request_id} lies in the range of batch {batch.batch_id} but was not sealed in it "
            "(inserted after sealing); run `modelops audit verify`"
        )
    index = ids.index(request_id)
    return InclusionProof(
        request_id=request_id,
        batch_id=batch.batch_id,
        leaf_index=index,
        tree_size=len(leaves),
        leaf=leaf,
        path=audit_path([pair[1] for pair in leaves], index),
        root=batch.root,
        audit_seq=batch.audit_seq,
        audit_record_hash=batch.record_hash,
    )


def _raise_if_expired(engine: Engine, audit: AuditStore, request_id: str) -> None:
    """Raise :class:`RecordExpired` naming the expiry record if retention removed ``request_id``'s batch."""
    if not sa.inspect(engine).has_table(EXPIRED_IDS_TABLE):
        return
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(expired_ids_table).where(expired_ids_table.c.request_hash == request_hash(request_id))
        ).first()
    if row is None:
        return
    batch_id, seq = int(row.batch_id), int(row.expiry_seq)
    for record in audit.records(
        action=AuditAction.PREDICTIONS_EXPIRED, subject=prediction_batch_subject(batch_id)
    ):
        if record.seq == seq and record.decision == Decision.EXPIRED and audit.authentic(record):
            expiry = Expiry.from_record(record)
            raise RecordExpired(
                f"request {request_id} expired: batch {batch_id} (root {expiry.root}, {expiry.count} records) "
                f"was removed whole under {expiry.retention_days:g} days of retention by the authentic expiry "
                f"record seq={seq} at {expiry.recorded_at}; its leaves went with it, so no inclusion proof "
                "can be given any more",
                batch_id=batch_id,
                expiry_seq=seq,
            )
    raise SealError(
        f"the expiry index names batch {batch_id} and expiry record seq={seq} for request {request_id}, but "
        "no such authentic expiry record exists: the index was edited; run `modelops audit verify`"
    )


def _seal_row_holding(engine: Engine, received_at: str, request_id: str) -> Mapping[str, Any] | None:
    """The seal row whose range holds the position (the first batch ending at or after it)."""
    if not has_seal_table(engine):
        return None
    table = seals_table
    last_at = _bytewise(table.c.last_received_at, engine.dialect.name)
    last_id = _bytewise(table.c.last_request_id, engine.dialect.name)
    ends_after = sa.or_(last_at > received_at, sa.and_(last_at == received_at, last_id >= request_id))
    with engine.connect() as conn:
        row = conn.execute(sa.select(table).where(ends_after).order_by(table.c.batch_id).limit(1)).first()
    return None if row is None else dict(row._mapping)


def _authentic_batch(audit: AuditStore, batch_id: int, seq: int) -> Batch | None:
    for record in audit.records(
        action=AuditAction.PREDICTIONS_SEALED, subject=prediction_batch_subject(batch_id)
    ):
        if record.seq == seq and record.decision == Decision.SEALED and audit.authentic(record):
            return Batch.from_record(record)
    return None


def verify_proof(
    proof: InclusionProof, audit: AuditStore | None = None, *, row: Mapping[str, Any] | None = None
) -> ProofCheck:
    """Check ``proof``: its path leads from its leaf to its root; with ``row`` (the record), the leaf is
    that record's; with ``audit``, the root and size are those of the authentic seal record it names."""
    if row is not None and leaf_hash(row) != proof.leaf:
        return ProofCheck(False, f"the record {proof.request_id} given does not hash to the proof's leaf")
    if root_from_path(proof.leaf, proof.leaf_index, proof.tree_size, proof.path) != proof.root:
        return ProofCheck(
            False,
            f"the record {proof.request_id} as it is now does not lead to the root of batch {proof.batch_id}: "
            "it was altered after sealing (or the proof was)",
        )
    if audit is not None:
        batch = _authentic_batch(audit, proof.batch_id, proof.audit_seq)
        if batch is None:
            return ProofCheck(
                False,
                f"no authentic seal record of batch {proof.batch_id} at audit seq={proof.audit_seq}",
            )
        if (batch.root, batch.count) != (proof.root, proof.tree_size):
            return ProofCheck(
                False,
                f"the proof's root or size is not that of batch {proof.batch_id}'s authentic record "
                f"seq={proof.audit_seq}",
            )
    checked = "the authentic audit record" if audit is not None else "the proof's root"
    return ProofCheck(
        True,
        f"record {proof.request_id} is leaf {proof.leaf_index} of {proof.tree_size} in batch {proof.batch_id}, "
        f"whose root is {checked} seq={proof.audit_seq}",
    )
