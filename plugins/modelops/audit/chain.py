"""The tamper-evident audit log: one append-only, hash-chained, keyed table shared by every lifecycle stage.

Each record stores ``prev_hash`` (the previous record's ``record_hash``; 64 zeros for the first) and
``record_hash`` = sha256 over the canonical JSON of all its other fields, ``seq``, ``prev_hash`` and
``key_id`` included, and ``hmac`` = HMAC-SHA256 of ``record_hash`` under the key ``key_id`` names (see
:mod:`modelops.audit.keys`). ``seq`` is the primary key and ``prev_hash`` is UNIQUE, so two writers can
never both extend the same tail: the database refuses the fork and the loser re-reads the tail and
retries. After every lifecycle decision, and every 15 minutes, the head ``(seq, record_hash)`` is
signed and written to write-once storage outside this database as an anchor (see
:mod:`modelops.audit.anchors`).

What :meth:`AuditStore.verify` proves, given the keyring and the anchor store:

- every record is as a holder of the audit key wrote it: an edit, a forged or inserted record, or a
  chain recomputed after an edit by someone without the key fails the hash or the HMAC check, and the
  record is named;
- nothing was deleted, inserted or reordered before the head (seq gaps and prev_hash links);
- keys changed only through an ``audit.key_rotated`` record endorsed by the previous key, so a retired
  (or leaked) key cannot append after the rotation; a key missing from the keyring is named;
- the log agrees with every genuine anchor: deleting the newest records (tail truncation, or a restore
  from an older backup), rewriting records from some seq on (even by someone holding the key), a full
  rewrite, a replaced database and an emptied table are each named; forged, unreadable and replayed
  anchors are named too, and only anchors with a valid HMAC decide, so a replay cannot hide a
  truncation; a log with records but no anchors at all fails (anchoring is off or they were removed).

What it does not prove: records written after the newest anchor can be deleted or rewritten undetected
by someone holding the key (``verify`` reports how many records are not anchored yet: after every
decision the head is anchored, so normally none); someone holding the key *and* able to delete anchors
(root on a local anchor folder, not S3 Object Lock in COMPLIANCE mode) can rewrite history. And the
chain says nothing about whether a record was true when written; only that it was not changed since.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NotRequired, TypedDict, Unpack

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from modelops import db
from modelops.audit.anchors import Anchor, AnchorStore, ListedAnchor
from modelops.audit.keys import KEYRING_EXAMPLE, KEYS_ENV, AuditKeyring
from modelops.errors import AuditChainBroken, ConfigurationError, ModelOpsError
from modelops.vocabulary import AUDIT_KEYRING_SUBJECT, AuditAction, Decision

TABLE_NAME = "modelops_audit_log"
GENESIS_HASH = "0" * 64

# Writers are serialised by a lock (BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL), so a
# conflict is rare: only a writer that bypasses the lock, or the idempotency key racing, gets here.
MAX_APPEND_ATTEMPTS = 10
# Arbitrary constant naming the audit log's advisory lock on PostgreSQL ("MOAUDIT" in ASCII).
_PG_ADVISORY_LOCK_KEY = 0x4D4F4155444954
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Anchored seqs are looked up in the log in batches of this many (bound parameters per query).
_LOOKUP_BATCH = 500

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
    # Which key of the keyring signed the record (part of the hashed content) and the HMAC-SHA256 of
    # record_hash under it: without the key, a record cannot be forged or rewritten undetected.
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("hmac", sa.String(64), nullable=False),
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
    "key_id",
    "record_hash",
    "hmac",
)
# Not part of the hashed content: the hash itself and its HMAC.
_UNHASHED = ("record_hash", "hmac")


def canonical_json(value: Any) -> str:
    """The one serialisation that is hashed: sorted keys, no whitespace, no NaN/Infinity."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def compute_record_hash(fields: Mapping[str, Any]) -> str:
    """sha256 hex over the canonical JSON of every record field except ``record_hash`` and ``hmac``."""
    content = {name: fields[name] for name in _FIELDS if name not in _UNHASHED}
    return hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()


def rotation_message(new_key_id: str, prev_hash: str) -> str:
    """What the old key signs to endorse a rotation: the new key, bound to the place in the chain."""
    return f"rotate:{new_key_id}:{prev_hash}"


def idempotency_key(
    *, dag_id: str | None, run_id: str | None, task_id: str | None, action: str, subject: str, decision: str
) -> str | None:
    """Key of "this decision by this task in this run"; None outside a run (then no dedup applies)."""
    if dag_id is None or run_id is None:
        return None
    identity = [dag_id, run_id, task_id, action, subject, decision]
    return hashlib.sha256(canonical_json(identity).encode("utf-8")).hexdigest()


class RecordFields(TypedDict):
    """What a caller gives for a record (:meth:`AuditStore.append`); the store adds seq, time and hashes."""

    actor: str
    action: str
    subject: str
    decision: str
    details: NotRequired[Mapping[str, Any] | None]
    evidence: NotRequired[Mapping[str, str] | None]
    dag_id: NotRequired[str | None]
    run_id: NotRequired[str | None]
    task_id: NotRequired[str | None]


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
    key_id: str = ""
    record_hash: str = ""
    hmac: str = ""
    unreadable: str | None = None
    """Why the stored details or evidence could not be read as a JSON object (then both are empty here and
    the record is never authentic), or None. Set only when reading: the pipeline cannot write such a record,
    so it was edited in the database."""

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if values["unreadable"] is None:
            del values["unreadable"]  # every authentic record: its dict, log line and XCom stay as written
        return values

    def to_log_line(self) -> str:
        return "AUDIT " + canonical_json(self.to_dict())


class Problem(StrEnum):
    """What :meth:`AuditStore.verify` found: each names an attack (or a mistake that looks like one)."""

    RECORD_DELETED = "record_deleted"
    RECORD_INSERTED_OR_REORDERED = "record_inserted_or_reordered"
    RECORD_ALTERED = "record_altered"
    RECORD_FORGED = "record_forged"
    """A record's HMAC fails: written or rewritten by someone without the key."""
    UNKNOWN_KEY = "unknown_key"
    """Signed by a key not in the keyring (dropped from it, or never part of it)."""
    KEY_CHANGED_WITHOUT_ROTATION = "key_changed_without_rotation"
    BAD_ROTATION = "bad_rotation"
    TAIL_TRUNCATED = "tail_truncated"
    LOG_REWRITTEN = "log_rewritten"
    LOG_REPLACED = "log_replaced"
    """No anchor matches the log: fully rewritten, or the database replaced by another log."""
    LOG_EMPTIED = "log_emptied"
    NOT_ANCHORED = "not_anchored"
    FORGED_ANCHOR = "forged_anchor"
    REPLAYED_ANCHOR = "replayed_anchor"


@dataclass(frozen=True)
class Finding:
    kind: Problem
    message: str
    seq: int | None = None


@dataclass(frozen=True)
class ChainVerification:
    ok: bool
    count: int
    problem: str | None = None
    # The first seq at which the log is not intact (for a deleted record: the missing seq).
    first_bad_seq: int | None = None
    findings: tuple[Finding, ...] = ()
    # The keys that signed the records checked, in order of first use.
    key_ids: tuple[str, ...] = ()
    # Set when anchors were checked: the store, how many objects it holds, the newest anchored seq that
    # matches the log, and how many records after it are not anchored yet.
    anchor_store: str | None = None
    anchors_checked: int = 0
    newest_anchored_seq: int | None = None
    unanchored: int | None = None

    @property
    def attack(self) -> Problem | None:
        """The first problem found (the chain's own before the anchors'), or None."""
        return self.findings[0].kind if self.findings else None


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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON the audit log writes")


def _stored_object(text: Any, what: str) -> tuple[dict[str, Any], str | None]:
    """A record's stored details or evidence as a dict, or ``({}, why)`` when the text is not a JSON object
    as :func:`canonical_json` writes it (NaN and Infinity included: they could not even be hashed)."""
    verb = "are" if what == "details" else "is"
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (TypeError, ValueError, RecursionError):
        return {}, f"its {what} {verb} not JSON ({str(text)[:40]!r})"
    if not isinstance(value, dict):
        return {}, f"its {what} {verb} a JSON {type(value).__name__}, not an object ({str(text)[:40]!r})"
    return value, None


def _record_from_row(row: sa.Row[Any]) -> AuditRecord:
    """The record a row holds. A row whose details or evidence were edited into something that is not a JSON
    object is still returned, with empty details and evidence and ``unreadable`` saying why, so every
    reader sees it as a record that is not authentic instead of failing on it."""
    values = row._mapping
    details, details_problem = _stored_object(values["details"], "details")
    evidence, evidence_problem = _stored_object(values["evidence"], "evidence")
    problems = [problem for problem in (details_problem, evidence_problem) if problem is not None]
    if problems:
        details, evidence = {}, {}
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
        details=details,
        evidence=evidence,
        prev_hash=values["prev_hash"],
        key_id=values["key_id"],
        record_hash=values["record_hash"],
        hmac=values["hmac"],
        unreadable="; ".join(problems) or None,
    )


class AuditStore:
    """The audit log at a SQLAlchemy URL (``sqlite:///path`` by default, ``postgresql+psycopg2://`` in
    production). ``create=False`` refuses to create a missing database or table, for readers such as
    the CLI where an empty new log would hide a wrong URL."""

    def __init__(self, url: str, *, keyring: AuditKeyring | None = None, create: bool = True) -> None:
        # Without a keyring the store can read, but neither append (nothing to sign with) nor verify.
        self.keyring = keyring
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
        columns = {column["name"] for column in sa.inspect(self._engine).get_columns(TABLE_NAME)}
        if "hmac" not in columns:
            self._engine.dispose()
            raise ConfigurationError(
                f"the audit log at {self.url} was written by an earlier version without record HMACs; "
                "keep it as an archive (modelops audit verify of that version still reads it) and point the "
                "modelops_audit connection at a new database"
            )

    @contextmanager
    def _write_transaction(self) -> Iterator[Connection]:
        """A transaction holding the audit log's write lock, so appends queue instead of colliding."""
        with db.write_transaction(self._engine) as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_ADVISORY_LOCK_KEY)))
            yield conn

    # --- writing ---------------------------------------------------------------------------------

    def append(self, **record: Unpack[RecordFields]) -> AuditRecord:
        """Append one record and return it; a retry of the same decision in the same task run returns
        the record already written instead of writing another."""
        appended, _ = self._append(None, **record)
        assert appended is not None  # without a condition, _append always appends (or finds the retry's)
        return appended

    def append_if_newest(
        self, *, expected: AuditRecord | None, watch: Sequence[str], **record: Unpack[RecordFields]
    ) -> tuple[AuditRecord | None, bool]:
        """Compare and append, under the log's write lock: append only if ``subject``'s newest authentic
        record of an action in ``watch`` is still ``expected`` (None: there is none). Two runs that both
        saw a version free cannot then both take it up. Returns ``(the record appended, True)``, or
        ``(the newest such record, which got there first, False)``."""
        return self._append((expected.seq if expected is not None else None, tuple(watch)), **record)

    def newest_authentic(self, subject: str, actions: Sequence[str]) -> AuditRecord | None:
        """``subject``'s newest authentic record of one of ``actions``; forged or edited ones are passed
        over, as every reader of the record passes them over."""
        with self._engine.connect() as conn:
            return self._newest_authentic(conn, subject, actions)

    def _newest_authentic(self, conn: Connection, subject: str, actions: Sequence[str]) -> AuditRecord | None:
        query = (
            sa.select(audit_table)
            .where(audit_table.c.subject == subject, audit_table.c.action.in_(list(actions)))
            .order_by(audit_table.c.seq.desc())
        )
        for row in conn.execute(query):
            record = _record_from_row(row)
            if self.authentic(record):
                return record
        return None

    def _append(
        self,
        condition: tuple[int | None, tuple[str, ...]] | None,
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
    ) -> tuple[AuditRecord | None, bool]:
        keyring = self._require_keyring("append to")
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
                            return _record_from_row(existing), True
                    if condition is not None:
                        expected_seq, watch = condition
                        newest = self._newest_authentic(conn, subject, watch)
                        if (newest.seq if newest is not None else None) != expected_seq:
                            return newest, False
                    tail_seq, tail_hash = self._tail(conn)
                    tail_key_id = self._key_id_at(conn, tail_seq)
                    if tail_key_id is not None and tail_key_id != keyring.current:
                        # The keyring's current key changed since the tail was written: record the
                        # rotation first, endorsed by the old key, so the change itself is on the chain.
                        rotation = self._insert(
                            conn,
                            self._signed_fields(
                                keyring,
                                seq=tail_seq + 1,
                                prev_hash=tail_hash,
                                actor=actor,
                                action=AuditAction.KEY_ROTATED.value,
                                subject=AUDIT_KEYRING_SUBJECT,
                                decision=Decision.ROTATED.value,
                                details=self._rotation_details(keyring, tail_key_id, tail_hash),
                                evidence={},
                                dag_id=dag_id,
                                run_id=run_id,
                                task_id=task_id,
                            ),
                            idempotency=None,
                        )
                        tail_seq, tail_hash = rotation.seq, rotation.record_hash
                    record = self._insert(
                        conn,
                        self._signed_fields(
                            keyring,
                            seq=tail_seq + 1,
                            prev_hash=tail_hash,
                            actor=actor,
                            action=action,
                            subject=subject,
                            decision=decision,
                            details=clean_details,
                            evidence=clean_evidence,
                            dag_id=dag_id,
                            run_id=run_id,
                            task_id=task_id,
                        ),
                        idempotency=key,
                    )
                    return record, True
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
    def _signed_fields(keyring: AuditKeyring, **values: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "recorded_at": datetime.now(UTC).isoformat(timespec="microseconds"),
            **values,
            "key_id": keyring.current,
        }
        fields["record_hash"] = compute_record_hash(fields)
        fields["hmac"] = keyring.sign(fields["record_hash"])
        return fields

    @staticmethod
    def _insert(conn: Connection, fields: dict[str, Any], *, idempotency: str | None) -> AuditRecord:
        row = fields | {
            "details": canonical_json(fields["details"]),
            "evidence": canonical_json(fields["evidence"]),
            "idempotency_key": idempotency,
        }
        conn.execute(audit_table.insert().values(**row))
        return AuditRecord(**{name: fields[name] for name in _FIELDS})

    def _rotation_details(self, keyring: AuditKeyring, old_key_id: str, prev_hash: str) -> dict[str, Any]:
        if not keyring.knows(old_key_id):
            raise ConfigurationError(
                f"the audit log at {self.url} was last signed with key {old_key_id!r}, which is not in the "
                f"keyring {keyring.key_ids}; keep it as a retired key (extra.retired_keys of the connection "
                f'modelops_audit_key, or under "keys" in ${KEYS_ENV}) so it can endorse the rotation to '
                f"{keyring.current!r} and its records keep verifying"
            )
        return {
            "from_key_id": old_key_id,
            "to_key_id": keyring.current,
            "endorsement": keyring.sign(rotation_message(keyring.current, prev_hash), key_id=old_key_id),
        }

    @staticmethod
    def _key_id_at(conn: Connection, seq: int) -> str | None:
        if seq == 0:
            return None
        return conn.execute(sa.select(audit_table.c.key_id).where(audit_table.c.seq == seq)).scalar()

    def _require_keyring(self, doing: str) -> AuditKeyring:
        if self.keyring is None:
            raise ConfigurationError(
                f"cannot {doing} the audit log at {self.url} without its keyring; define the Airflow "
                f"connection modelops_audit_key or set {KEYS_ENV}={KEYRING_EXAMPLE}"
            )
        return self.keyring

    def authentic(self, record: AuditRecord) -> bool:
        """Whether ``record`` is exactly as its key holder wrote it: its content hashes to its
        ``record_hash`` and its ``hmac`` is that hash's HMAC under the key it names. A record written
        or rewritten by someone without the key fails; so does one signed by a key not in the keyring, and
        one whose details or evidence are not a JSON object (``record.unreadable``): the pipeline never
        writes such a record, so it was edited in the database."""
        keyring = self._require_keyring("authenticate records of")
        if record.unreadable is not None:
            return False
        fields = record.to_dict()
        return compute_record_hash(fields) == record.record_hash and keyring.check(
            record.record_hash, record.hmac, key_id=record.key_id
        )

    @staticmethod
    def _tail(conn: Connection) -> tuple[int, str]:
        row = conn.execute(
            sa.select(audit_table.c.seq, audit_table.c.record_hash)
            .order_by(audit_table.c.seq.desc())
            .limit(1)
        ).first()
        return (0, GENESIS_HASH) if row is None else (int(row.seq), row.record_hash)

    # --- reading ---------------------------------------------------------------------------------

    def _select(
        self, action: str | None, subject: str | None, subject_prefix: str | None = None
    ) -> sa.Select[Any]:
        query = sa.select(audit_table)
        if action is not None:
            query = query.where(audit_table.c.action == action)
        if subject is not None:
            query = query.where(audit_table.c.subject == subject)
        if subject_prefix is not None:
            # autoescape: a model name may hold % or _, which LIKE would read as wildcards.
            query = query.where(audit_table.c.subject.startswith(subject_prefix, autoescape=True))
        return query

    def records(
        self,
        *,
        action: str | None = None,
        subject: str | None = None,
        subject_prefix: str | None = None,
        limit: int | None = None,
    ) -> list[AuditRecord]:
        """Matching records in seq order (``subject_prefix``: subjects starting with it, e.g. every version
        of a model); with ``limit``, only the newest ``limit`` of them. A record edited into unreadable
        details or evidence is among them, marked ``unreadable`` and never :meth:`authentic`."""
        query = self._select(action, subject, subject_prefix)
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
        """``(seq, record_hash)`` of the newest record, or None for an empty log."""
        with self._engine.connect() as conn:
            seq, record_hash = self._tail(conn)
        return None if seq == 0 else (seq, record_hash)

    def links_at(self, seqs: Iterable[int]) -> dict[int, tuple[str, str]]:
        """``{seq: (prev_hash, record_hash)}`` of the records at ``seqs`` that exist: where a record sits in
        the chain (its neighbours' links), checked without walking the whole log."""
        wanted = sorted({int(seq) for seq in seqs if int(seq) > 0})
        found: dict[int, tuple[str, str]] = {}
        with self._engine.connect() as conn:
            for start in range(0, len(wanted), _LOOKUP_BATCH):
                rows = conn.execute(
                    sa.select(audit_table.c.seq, audit_table.c.prev_hash, audit_table.c.record_hash).where(
                        audit_table.c.seq.in_(wanted[start : start + _LOOKUP_BATCH])
                    )
                )
                found.update((int(row.seq), (row.prev_hash, row.record_hash)) for row in rows)
        return found

    # --- anchoring -------------------------------------------------------------------------------

    def anchor_head(self, anchors: AnchorStore) -> tuple[Anchor, bool] | None:
        """Sign the head and store it in ``anchors``: ``(anchor, written now)``, or None for an empty
        log. Anchoring a head that is already anchored writes nothing (``written now`` is False).

        Only an authentic head is anchored: signing a record someone without the key wrote would lend it
        the key's authority. Raises :class:`~modelops.audit.anchors.AnchorError` if the store fails.
        """
        keyring = self._require_keyring("anchor")
        head = self.last()
        if head is None:
            return None
        if not self.authentic(head):
            raise AuditChainBroken(
                f"the head of the audit log at {self.url} (seq={head.seq}) fails its hash or HMAC check, so "
                "it is not anchored; run `modelops audit verify` to see what was changed"
            )
        anchor = Anchor.sign(seq=head.seq, record_hash=head.record_hash, keyring=keyring)
        return anchor, anchors.put(anchor)

    # --- verifying -------------------------------------------------------------------------------

    def verify(self, anchors: AnchorStore | None = None) -> ChainVerification:
        """Check every record (hash, link, HMAC, key changes) and, given the anchor store, every anchor
        and the log against them; name each problem found (see the module docstring for what this
        proves). Without ``anchors`` only the chain and the HMACs are checked: that cannot see tail
        truncation, an emptied table or a rewrite by a key holder."""
        keyring = self._require_keyring("verify")
        count, key_ids, chain_finding = self._walk_chain(keyring)
        findings = [] if chain_finding is None else [chain_finding]
        anchor_stats: dict[str, Any] = {}
        if anchors is not None:
            anchor_findings, anchor_stats = self._check_anchors(keyring, anchors)
            findings.extend(anchor_findings)
        if not findings:
            return ChainVerification(True, count, key_ids=key_ids, **anchor_stats)
        return ChainVerification(
            False,
            count,
            "; ".join(finding.message for finding in findings),
            findings[0].seq,
            tuple(findings),
            key_ids,
            **anchor_stats,
        )

    def _walk_chain(self, keyring: AuditKeyring) -> tuple[int, tuple[str, ...], Finding | None]:
        """Walk the chain in seq order: (records read, keys used, the first record that breaks it)."""
        count = 0
        key_ids: list[str] = []
        expected_seq, expected_prev, prev_key = 1, GENESIS_HASH, None
        with self._engine.connect() as conn:
            for row in conn.execute(sa.select(audit_table).order_by(audit_table.c.seq)):
                values = row._mapping
                seq = int(values["seq"])
                key_id = values["key_id"]
                count += 1
                if key_id not in key_ids:
                    key_ids.append(key_id)
                finding = self._record_problem(values, seq, expected_seq, expected_prev, prev_key, keyring)
                if finding is not None:
                    return count, tuple(key_ids), finding
                expected_seq, expected_prev, prev_key = seq + 1, values["record_hash"], key_id
        return count, tuple(key_ids), None

    def _record_problem(
        self,
        values: Mapping[str, Any],
        seq: int,
        expected_seq: int,
        expected_prev: str,
        prev_key: str | None,
        keyring: AuditKeyring,
    ) -> Finding | None:
        if seq != expected_seq:
            if expected_seq == 1:
                problem = f"record seq=1 is missing (deleted): the chain starts at seq={seq}"
            else:
                problem = f"record seq={expected_seq} is missing (deleted): seq={seq} follows seq={expected_seq - 1}"
            return Finding(Problem.RECORD_DELETED, problem, expected_seq)
        if values["prev_hash"] != expected_prev:
            after = "the start of the chain" if seq == 1 else f"seq={seq - 1}"
            problem = (
                f"record seq={seq} does not follow {after}: prev_hash mismatch (inserted or reordered)"
                f"; {self._where_prev_hash_points(values['prev_hash'])}"
            )
            return Finding(Problem.RECORD_INSERTED_OR_REORDERED, problem, seq)
        if self._stored_hash_mismatch(values):
            problem = f"record seq={seq} was altered: its stored hash does not match its content"
            return Finding(Problem.RECORD_ALTERED, problem, seq)
        key_id = values["key_id"]
        if not keyring.knows(key_id):
            problem = (
                f"record seq={seq} is signed with key {key_id!r}, which is not in the keyring "
                f"{keyring.key_ids}; add it as a retired key to verify the records it signed"
            )
            return Finding(Problem.UNKNOWN_KEY, problem, seq)
        if not keyring.check(values["record_hash"], values["hmac"], key_id=key_id):
            problem = (
                f"record seq={seq} fails its HMAC check: it was written or rewritten by someone "
                "without the audit key (forged, or the chain recomputed after an edit)"
            )
            return Finding(Problem.RECORD_FORGED, problem, seq)
        if values["action"] == AuditAction.KEY_ROTATED:
            problem = self._rotation_problem(values, seq, prev_key, keyring)
            return None if problem is None else Finding(Problem.BAD_ROTATION, problem, seq)
        if prev_key is not None and key_id != prev_key:
            problem = (
                f"record seq={seq} is signed with key {key_id!r} but seq={seq - 1} with {prev_key!r}, with "
                f"no {AuditAction.KEY_ROTATED.value} record between: it was written with a key that was not "
                "the current one (a retired or leaked key)"
            )
            return Finding(Problem.KEY_CHANGED_WITHOUT_ROTATION, problem, seq)
        return None

    @staticmethod
    def _rotation_problem(
        values: Mapping[str, Any], seq: int, prev_key: str | None, keyring: AuditKeyring
    ) -> str | None:
        details, unreadable = _stored_object(values["details"], "details")
        what = f"key rotation record seq={seq}"
        if unreadable is not None:  # hashes and HMAC hold, so a key holder wrote it outside append()
            return f"{what} cannot be read: {unreadable}"
        from_key, to_key = details.get("from_key_id"), details.get("to_key_id")
        if to_key != values["key_id"] or (prev_key is not None and from_key != prev_key):
            return (
                f"{what} names a rotation {from_key!r} -> {to_key!r}, but the records around it are signed "
                f"with {prev_key!r} -> {values['key_id']!r}"
            )
        if not isinstance(from_key, str) or not keyring.knows(from_key):
            return (
                f"{what} is endorsed by key {from_key!r}, which is not in the keyring {keyring.key_ids}; "
                "add it as a retired key to verify the rotation and the records it signed"
            )
        message = rotation_message(values["key_id"], values["prev_hash"])
        if not keyring.check(message, details.get("endorsement"), key_id=from_key):
            return f"{what} fails its endorsement: the holder of the old key {from_key!r} did not sign it"
        return None

    def _check_anchors(
        self, keyring: AuditKeyring, anchors: AnchorStore
    ) -> tuple[list[Finding], dict[str, Any]]:
        """Every anchor's own validity, then the log against the genuine ones."""
        listed = anchors.list()
        findings: list[Finding] = []
        anchor_findings: list[Finding] = []
        # Genuine = a valid HMAC under a key of the keyring. A replayed anchor is genuine content in the
        # wrong place: it is named, and its content still counts (it is a true statement of a past head).
        genuine: dict[tuple[int, str], ListedAnchor] = {}
        # Anchors stored under their own name first, so a copy elsewhere is the one named as the replay.
        for item in sorted(listed, key=lambda item: item.anchor is None or item.name != item.anchor.name):
            finding = self._anchor_problem(item, keyring, genuine)
            if finding is not None:
                anchor_findings.append(finding)
        with self._engine.connect() as conn:
            last_seq = int(
                conn.execute(sa.select(sa.func.coalesce(sa.func.max(audit_table.c.seq), 0))).scalar()
            )
            logged = self._hashes_at(conn, sorted({seq for seq, _ in genuine if seq <= last_seq}))
        matched = [seq for seq, record_hash in genuine if seq <= last_seq and logged.get(seq) == record_hash]
        mismatched = sorted(
            (seq, record_hash)
            for seq, record_hash in genuine
            if seq <= last_seq and logged.get(seq) != record_hash
        )
        beyond = [seq for seq, _ in genuine if seq > last_seq]
        where = anchors.uri

        if last_seq and not genuine:
            held = f"holds {len(listed)} objects but no genuine anchor" if listed else "holds no anchor"
            findings.append(
                Finding(
                    Problem.NOT_ANCHORED,
                    f"the log has records up to seq={last_seq} but {where} {held}: anchoring is off or the "
                    "anchors were removed",
                    1,
                )
            )
        if not last_seq and genuine:
            findings.append(
                Finding(
                    Problem.LOG_EMPTIED,
                    f"the log is empty but {where} holds {len(genuine)} genuine anchors, the newest naming "
                    f"seq={max(beyond)}: the log was emptied, or its database replaced by an empty one",
                    1,
                )
            )
        elif mismatched and not matched:
            seq, record_hash = mismatched[0]
            findings.append(
                Finding(
                    Problem.LOG_REPLACED,
                    f"no anchor matches the log: all {len(mismatched)} anchors within it name other records "
                    f"(the first, seq={seq}, names hash {record_hash[:16]}..., the log has "
                    f"{self._short(logged.get(seq))}): the whole log was rewritten, or the database replaced "
                    "by another log",
                    seq,
                )
            )
        elif mismatched:
            first_bad, record_hash = mismatched[0]
            below = [seq for seq in matched if seq < first_bad]
            last_good = max(below) if below else None
            since = f"after seq={last_good}" if last_good is not None else "from its start"
            findings.append(
                Finding(
                    Problem.LOG_REWRITTEN,
                    f"the log was rewritten {since}: "
                    + (f"the anchor of seq={last_good} matches, but " if last_good is not None else "")
                    + f"the anchor of seq={first_bad} names hash {record_hash[:16]}... and the log has "
                    f"{self._short(logged.get(first_bad))} (records rewritten, by someone holding the key "
                    "if their HMACs verify)",
                    (last_good or 0) + 1,
                )
            )
        if beyond and last_seq:
            newest = max(beyond)
            findings.append(
                Finding(
                    Problem.TAIL_TRUNCATED,
                    f"the log ends at seq={last_seq} but a genuine anchor names seq={newest}: records "
                    f"{last_seq + 1}..{newest} were deleted, or the log was restored from an older backup",
                    last_seq + 1,
                )
            )
        newest_anchored = max(matched) if matched else None
        stats = {
            "anchor_store": where,
            "anchors_checked": len(listed),
            "newest_anchored_seq": newest_anchored,
            "unanchored": last_seq - (newest_anchored or 0),
        }
        return findings + anchor_findings, stats

    @staticmethod
    def _anchor_problem(
        item: ListedAnchor, keyring: AuditKeyring, genuine: dict[tuple[int, str], ListedAnchor]
    ) -> Finding | None:
        anchor = item.anchor
        if anchor is None:
            return Finding(
                Problem.FORGED_ANCHOR,
                f"{item.location} is {item.error}: something other than the audit log wrote it",
            )
        if not keyring.knows(anchor.key_id):
            return Finding(
                Problem.UNKNOWN_KEY,
                f"anchor {item.location} is signed with key {anchor.key_id!r}, which is not in the keyring "
                f"{keyring.key_ids}; add it as a retired key to check the anchors it signed",
                anchor.seq,
            )
        if not anchor.authentic(keyring):
            return Finding(
                Problem.FORGED_ANCHOR,
                f"anchor {item.location} fails its HMAC check: forged by someone without the audit key "
                "(it is ignored)",
                anchor.seq,
            )
        identity = (anchor.seq, anchor.record_hash)
        earlier = genuine.get(identity)
        genuine.setdefault(identity, item)
        if item.name != anchor.name:
            return Finding(
                Problem.REPLAYED_ANCHOR,
                f"{item.location} holds the anchor of seq={anchor.seq} ({anchor.name}) under another name: "
                "an old anchor replayed or copied (the newest genuine anchor still decides)",
                anchor.seq,
            )
        if earlier is not None:
            return Finding(
                Problem.REPLAYED_ANCHOR,
                f"{item.location} repeats the anchor of seq={anchor.seq} already stored at {earlier.location}: "
                "an old anchor replayed",
                anchor.seq,
            )
        return None

    @staticmethod
    def _hashes_at(conn: Connection, seqs: list[int]) -> dict[int, str]:
        found: dict[int, str] = {}
        for start in range(0, len(seqs), _LOOKUP_BATCH):
            batch = seqs[start : start + _LOOKUP_BATCH]
            rows = conn.execute(
                sa.select(audit_table.c.seq, audit_table.c.record_hash).where(audit_table.c.seq.in_(batch))
            )
            found.update((int(row.seq), row.record_hash) for row in rows)
        return found

    @staticmethod
    def _short(record_hash: str | None) -> str:
        return "no record there" if record_hash is None else f"hash {record_hash[:16]}..."

    @staticmethod
    def _stored_hash_mismatch(values: Mapping[str, Any]) -> bool:
        fields = dict(values)
        try:
            fields["details"] = json.loads(values["details"])
            fields["evidence"] = json.loads(values["evidence"])
            fields["seq"] = int(fields["seq"])
            return compute_record_hash(fields) != values["record_hash"]
        except (TypeError, ValueError, RecursionError):
            return True  # edited into something that is not even JSON, or holds NaN (never hashed)

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
