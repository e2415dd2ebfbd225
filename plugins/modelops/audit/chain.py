"""The tamper-evident audit log: one append-only, hash-chained table shared by every lifecycle stage.

Each record stores ``prev_hash`` (the previous record's ``record_hash``; 64 zeros for the first) and
``record_hash`` = sha256 over the canonical JSON of all its other fields, ``seq`` and ``prev_hash``
included. ``seq`` is the primary key and ``prev_hash`` is UNIQUE, so two writers can never both extend
the same tail: the database refuses the fork and the loser re-reads the tail and retries.

What the chain proves: any in-place edit, deletion, insertion or reordering of records *before the
head* breaks the chain at a record that :meth:`AuditStore.verify` names. What it does not prove: an
attacker with write access can delete the newest records, or rewrite every record from some point on
and recompute all hashes after it; the result is a self-consistent chain. Those are caught only by
comparing against a head hash kept outside this database (see :meth:`AuditStore.head`). The chain
also says nothing about whether a record was true when written; it only shows it was not changed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from modelops import db
from modelops.errors import ConfigurationError, ModelOpsError

TABLE_NAME = "modelops_audit_log"
GENESIS_HASH = "0" * 64

# Writers are serialised by a lock (BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL), so a
# conflict is rare: only a writer that bypasses the lock, or the idempotency key racing, gets here.
MAX_APPEND_ATTEMPTS = 10
# Arbitrary constant naming the audit log's advisory lock on PostgreSQL ("MOAUDIT" in ASCII).
_PG_ADVISORY_LOCK_KEY = 0x4D4F4155444954
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

_metadata = sa.MetaData()
audit_table = sa.Table(
    TABLE_NAME,
    _metadata,
    sa.Column(
        "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=False
    ),
    sa.Column("recorded_at", sa.String(40), nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("dag_id", sa.Text, nullable=True),
    sa.Column("run_id", sa.Text, nullable=True),
    sa.Column("task_id", sa.Text, nullable=True),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("decision", sa.Text, nullable=False),
    # Canonical JSON text, not a JSON column type: the hash is over exact text on every backend.
    sa.Column("details", sa.Text, nullable=False),
    sa.Column("evidence", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("record_hash", sa.String(64), nullable=False, unique=True),
    # sha256 of (dag_id, run_id, task_id, action, subject, decision) for records written by a task run,
    # NULL otherwise; UNIQUE so a retried task cannot record the same decision twice even when racing.
    sa.Column("idempotency_key", sa.String(64), nullable=True, unique=True),
)

_FIELDS = (
    "seq",
    "recorded_at",
    "actor",
    "dag_id",
    "run_id",
    "task_id",
    "action",
    "subject",
    "decision",
    "details",
    "evidence",
    "prev_hash",
    "record_hash",
)


def canonical_json(value: Any) -> str:
    """The one serialisation that is hashed: sorted keys, no whitespace, no NaN/Infinity."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def compute_record_hash(fields: Mapping[str, Any]) -> str:
    """sha256 hex over the canonical JSON of every record field except ``record_hash``."""
    content = {name: fields[name] for name in _FIELDS if name != "record_hash"}
    return hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()


def idempotency_key(
    *, dag_id: str | None, run_id: str | None, task_id: str | None, action: str, subject: str, decision: str
) -> str | None:
    """Key of "this decision by this task in this run"; None outside a run (then no dedup applies)."""
    if dag_id is None or run_id is None:
        return None
    identity = [dag_id, run_id, task_id, action, subject, decision]
    return hashlib.sha256(canonical_json(identity).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    recorded_at: str
    actor: str
    dag_id: str | None
    run_id: str | None
    task_id: str | None
    action: str
    subject: str
    decision: str
    details: dict[str, Any] = field(default_factory=dict)
    evidence: dict[str, str] = field(default_factory=dict)
    prev_hash: str = GENESIS_HASH
    record_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_log_line(self) -> str:
        return "AUDIT " + canonical_json(self.to_dict())


@dataclass(frozen=True)
class ChainVerification:
    ok: bool
    count: int
    problem: str | None = None
    # The first seq at which the chain is not intact (for a deleted record: the missing seq).
    first_bad_seq: int | None = None


def _json_safe_details(details: Mapping[str, Any] | None) -> dict[str, Any]:
    if details is None:
        return {}
    if not isinstance(details, Mapping):
        raise ModelOpsError(f"audit details must be a mapping, got {type(details).__name__}")
    try:
        # Round-trip so the stored dict is exactly what was hashed (tuples become lists, and so on).
        return json.loads(canonical_json(dict(details)))
    except (TypeError, ValueError) as exc:
        raise ModelOpsError(
            f"audit details are not JSON-safe ({exc}); convert values to str, int, float, bool, None, "
            "lists or dicts with string keys before recording"
        ) from exc


def _checked_evidence(evidence: Mapping[str, str] | None) -> dict[str, str]:
    checked: dict[str, str] = {}
    for name, digest in (evidence or {}).items():
        if (
            not isinstance(name, str)
            or not isinstance(digest, str)
            or not _SHA256_HEX.fullmatch(digest.lower())
        ):
            raise ModelOpsError(
                f"audit evidence {name!r} must map a name to a sha256 hex digest (64 hex characters), "
                f"got {digest!r}; hash the evidence file or payload with hashlib.sha256(...).hexdigest()"
            )
        checked[name] = digest.lower()
    return checked


def _record_from_row(row: sa.Row[Any]) -> AuditRecord:
    values = row._mapping
    return AuditRecord(
        seq=int(values["seq"]),
        recorded_at=values["recorded_at"],
        actor=values["actor"],
        dag_id=values["dag_id"],
        run_id=values["run_id"],
        task_id=values["task_id"],
        action=values["action"],
        subject=values["subject"],
        decision=values["decision"],
        details=json.loads(values["details"]),
        evidence=json.loads(values["evidence"]),
        prev_hash=values["prev_hash"],
        record_hash=values["record_hash"],
    )


class AuditStore:
    """The audit log at a SQLAlchemy URL (``sqlite:///path`` by default, ``postgresql+psycopg2://`` in
    production). ``create=False`` refuses to create a missing database or table, for readers such as
    the CLI where an empty new log would hide a wrong URL."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        parsed = db.parse_url(url)
        self.url = db.safe_url(parsed)
        database_file = db.sqlite_file(parsed)
        if database_file is not None and not create and not database_file.is_file():
            raise ConfigurationError(
                f"no audit log database at {database_file}; check the URL or connection "
                "(it is created by the first task that records a decision)"
            )
        self._engine: Engine = db.create_engine(parsed, what="the audit log", immediate_transactions=True)
        if create:
            with self._write_transaction() as conn:
                _metadata.create_all(conn, checkfirst=True)
        elif not sa.inspect(self._engine).has_table(TABLE_NAME):
            self._engine.dispose()
            raise ConfigurationError(
                f"{self.url} has no table {TABLE_NAME!r}; check the URL or connection "
                "(it is created by the first task that records a decision)"
            )

    @contextmanager
    def _write_transaction(self) -> Iterator[Connection]:
        """A transaction holding the audit log's write lock, so appends queue instead of colliding."""
        with db.write_transaction(self._engine) as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_ADVISORY_LOCK_KEY)))
            yield conn

    # --- writing ---------------------------------------------------------------------------------

    def append(
        self,
        *,
        actor: str,
        action: str,
        subject: str,
        decision: str,
        details: Mapping[str, Any] | None = None,
        evidence: Mapping[str, str] | None = None,
        dag_id: str | None = None,
        run_id: str | None = None,
        task_id: str | None = None,
    ) -> AuditRecord:
        """Append one record and return it; a retry of the same decision in the same task run returns
        the record already written instead of writing another."""
        for name, value in (
            ("actor", actor),
            ("action", action),
            ("subject", subject),
            ("decision", decision),
        ):
            if not isinstance(value, str) or not value:
                raise ModelOpsError(f"audit record needs a non-empty string {name}, got {value!r}")
        clean_details = _json_safe_details(details)
        clean_evidence = _checked_evidence(evidence)
        key = idempotency_key(
            dag_id=dag_id, run_id=run_id, task_id=task_id, action=action, subject=subject, decision=decision
        )
        last_error: sa.exc.IntegrityError | None = None
        for attempt in range(MAX_APPEND_ATTEMPTS):
            try:
                with self._write_transaction() as conn:
                    if key is not None:
                        existing = conn.execute(
                            sa.select(audit_table).where(audit_table.c.idempotency_key == key)
                        ).first()
                        if existing is not None:
                            return _record_from_row(existing)
                    tail_seq, tail_hash = self._tail(conn)
                    fields: dict[str, Any] = {
                        "seq": tail_seq + 1,
                        "recorded_at": datetime.now(UTC).isoformat(timespec="microseconds"),
                        "actor": actor,
                        "dag_id": dag_id,
                        "run_id": run_id,
                        "task_id": task_id,
                        "action": action,
                        "subject": subject,
                        "decision": decision,
                        "details": clean_details,
                        "evidence": clean_evidence,
                        "prev_hash": tail_hash,
                    }
                    fields["record_hash"] = compute_record_hash(fields)
                    conn.execute(
                        audit_table.insert().values(
                            **(
                                fields
                                | {
                                    "details": canonical_json(clean_details),
                                    "evidence": canonical_json(clean_evidence),
                                    "idempotency_key": key,
                                }
                            )
                        )
                    )
                return AuditRecord(**fields)
            except sa.exc.IntegrityError as exc:
                # A racing writer took this seq/prev_hash (or wrote the same decision): re-read and retry.
                last_error = exc
                time.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        raise ModelOpsError(
            f"could not append to the audit log at {self.url} after {MAX_APPEND_ATTEMPTS} attempts: every "
            f"attempt lost the race for the chain's tail to another writer (last error: {last_error}); "
            "retry the task, and check that no process writes the table without the write lock"
        ) from last_error

    @staticmethod
    def _tail(conn: Connection) -> tuple[int, str]:
        row = conn.execute(
            sa.select(audit_table.c.seq, audit_table.c.record_hash)
            .order_by(audit_table.c.seq.desc())
            .limit(1)
        ).first()
        return (0, GENESIS_HASH) if row is None else (int(row.seq), row.record_hash)

    # --- reading ---------------------------------------------------------------------------------

    def _select(self, action: str | None, subject: str | None) -> sa.Select[Any]:
        query = sa.select(audit_table)
        if action is not None:
            query = query.where(audit_table.c.action == action)
        if subject is not None:
            query = query.where(audit_table.c.subject == subject)
        return query

    def records(
        self, *, action: str | None = None, subject: str | None = None, limit: int | None = None
    ) -> list[AuditRecord]:
        """Matching records in seq order; with ``limit``, only the newest ``limit`` of them."""
        query = self._select(action, subject)
        with self._engine.connect() as conn:
            if limit is None:
                rows = conn.execute(query.order_by(audit_table.c.seq)).all()
            else:
                rows = conn.execute(query.order_by(audit_table.c.seq.desc()).limit(limit)).all()[::-1]
        return [_record_from_row(row) for row in rows]

    def last(self, *, action: str | None = None, subject: str | None = None) -> AuditRecord | None:
        """The newest matching record, or None."""
        with self._engine.connect() as conn:
            row = conn.execute(
                self._select(action, subject).order_by(audit_table.c.seq.desc()).limit(1)
            ).first()
        return None if row is None else _record_from_row(row)

    def count(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(audit_table)).scalar_one())

    def head(self) -> tuple[int, str] | None:
        """``(seq, record_hash)`` of the newest record, or None for an empty log. Keep it somewhere
        else (a ticket, object storage with retention, a signed message): only a head kept outside this
        database catches truncation or a rewrite of the chain's newest records."""
        with self._engine.connect() as conn:
            seq, record_hash = self._tail(conn)
        return None if seq == 0 else (seq, record_hash)

    # --- verifying -------------------------------------------------------------------------------

    def verify(self) -> ChainVerification:
        """Walk the chain in seq order and name the first record that breaks it."""
        count = 0
        expected_seq, expected_prev = 1, GENESIS_HASH
        with self._engine.connect() as conn:
            for row in conn.execute(sa.select(audit_table).order_by(audit_table.c.seq)):
                values = row._mapping
                seq = int(values["seq"])
                count += 1
                if seq != expected_seq:
                    if expected_seq == 1:
                        problem = f"record seq=1 is missing (deleted): the chain starts at seq={seq}"
                    else:
                        problem = (
                            f"record seq={expected_seq} is missing (deleted): "
                            f"seq={seq} follows seq={expected_seq - 1}"
                        )
                    return ChainVerification(False, count, problem, expected_seq)
                if values["prev_hash"] != expected_prev:
                    after = "the start of the chain" if seq == 1 else f"seq={seq - 1}"
                    problem = (
                        f"record seq={seq} does not follow {after}: prev_hash mismatch (inserted or reordered)"
                        f"; {self._where_prev_hash_points(values['prev_hash'])}"
                    )
                    return ChainVerification(False, count, problem, seq)
                if self._stored_hash_mismatch(values):
                    problem = f"record seq={seq} was altered: its stored hash does not match its content"
                    return ChainVerification(False, count, problem, seq)
                expected_seq, expected_prev = seq + 1, values["record_hash"]
        return ChainVerification(True, count)

    @staticmethod
    def _stored_hash_mismatch(values: Mapping[str, Any]) -> bool:
        fields = dict(values)
        try:
            fields["details"] = json.loads(values["details"])
            fields["evidence"] = json.loads(values["evidence"])
        except (TypeError, ValueError):
            return True  # edited into something that is not even JSON
        fields["seq"] = int(fields["seq"])
        return compute_record_hash(fields) != values["record_hash"]

    def _where_prev_hash_points(self, prev_hash: str) -> str:
        if prev_hash == GENESIS_HASH:
            return "its prev_hash is the genesis hash, so it was moved from the start of the chain"
        with self._engine.connect() as conn:
            owner = conn.execute(
                sa.select(audit_table.c.seq).where(audit_table.c.record_hash == prev_hash)
            ).first()
        if owner is not None:
            return f"its prev_hash is the hash of seq={owner.seq}, so records were reordered"
        return "its prev_hash matches no record in the log, so it was inserted or a record before it was rewritten"

    def dispose(self) -> None:
        self._engine.dispose()

    def __repr__(self) -> str:
        return f"AuditStore({self.url!r})"
