"""One model version's lineage from the audit log: ``modelops lineage MODEL@VERSION``.

The chain runs from the dataset (its hash, validation and data card) through training (run, environment),
the registry version, the compliance gate (report, approver), every deployment, traffic share and
rollback, monitoring verdicts and alerts, to retirement and the archive. Every link is an audit record and
carries its evidence reference (seq, record hash, evidence digests, URIs) and whether it verifies:

- the record is authentic (its content hashes to its ``record_hash``, whose HMAC is valid under the key);
- it sits where it claims in the chain (its ``prev_hash`` is the hash of the record before it, and the
  record after it points at it);
- where cheap, the evidence still matches: digests the record holds of its own details (files, tags,
  approval), the files the gate approved against those training registered, the dataset snapshot and data
  card against the dataset hash, the archive manifest against its digest, and, given a registry, the
  version's run and lineage tags against the registration record.

Evidence files are read where the records say they are: a local path or ``file://`` from the disk, any other
URI (``s3://``) through fsspec, the library Airflow's ``ObjectStoragePath`` is built on, with the
environment's credentials (``AWS_*`` variables or profile, ``AWS_ENDPOINT_URL``), as ``modelops gate check``
reads them (:mod:`modelops.evidence_files`): the Airflow connection is not looked up, so the lineage needs
no Airflow. A URI that names a connection (``s3://conn_id@bucket/key``, as ``ObjectStoragePath`` spells
one) is read from ``s3://bucket/key``. Storage that cannot be reached (no credentials, endpoint down,
access denied) leaves that evidence "not checked", naming why; a file that is gone or differs is a problem.

A record altered in the database shows up as a link that does not verify, named. Alias moves (who moved
which alias to or from this version, when, by which record) are read from the same records: the registry
keeps no history of them (MLflow issue 2169). What a lineage does not prove: that the whole log is intact
and anchored (``modelops audit verify``), nor anything about evidence it could not read.

Imports nothing of Airflow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from modelops.audit.chain import GENESIS_HASH, AuditRecord
from modelops.audit.query import read_records
from modelops.errors import ModelOpsError
from modelops.evidence import ARTIFACTS_FIELD, CHALLENGER_FIELD, CHAMPION_FIELD, SHARE_FIELD
from modelops.evidence_files import FsspecFiles, without_connection
from modelops.stages.outcome import sha256_json
from modelops.vocabulary import Alias, AuditAction, Decision, Tag, dataset_subject, model_subject

if TYPE_CHECKING:
    from modelops.audit.chain import AuditStore

# Evidence files larger than this are not re-hashed by a lineage query (named as not checked).
MAX_HASHED_BYTES = 256 * 1024 * 1024

_T = TypeVar("_T")


class LineageError(ModelOpsError):
    """A lineage cannot be drawn: an unknown version, or a MODEL@VERSION that is not one."""


class VersionLookup(Protocol):
    """What a lineage reads from a registry: :class:`modelops.registry.ModelRegistry` is one."""

    def version(self, name: str, version: str | int) -> Any: ...


class EvidenceReader(Protocol):
    """What a lineage reads remote evidence files (``s3://`` and the like) with: :class:`RemoteFiles`."""

    def exists(self, uri: str) -> bool: ...

    def size(self, uri: str) -> int: ...

    def read_text(self, uri: str) -> str: ...

    def sha256(self, uri: str) -> str: ...


class RemoteFiles(FsspecFiles):
    """Remote evidence through fsspec with the environment's credentials (see the module docstring), and
    each file's size, so a lineage re-hashes nothing larger than ``MAX_HASHED_BYTES``."""

    def size(self, uri: str) -> int:
        import fsspec.core

        fs, path = fsspec.core.url_to_fs(uri)
        return int(fs.size(path))


@dataclass(frozen=True)
class Link:
    """One link of a lineage: an audit record (or the registry's version), its evidence and its checks."""

    stage: str
    """dataset, training, registry, gate, deployment, traffic, rollback, monitoring, alert, retirement."""
    action: str
    decision: str
    summary: str
    seq: int | None = None
    recorded_at: str | None = None
    actor: str | None = None
    dag_run: str | None = None
    record_hash: str | None = None
    evidence: dict[str, str] = field(default_factory=dict)
    uris: dict[str, str] = field(default_factory=dict)
    checks: tuple[str, ...] = ()
    """What was checked and holds."""
    problems: tuple[str, ...] = ()
    """What was checked and does not hold; any makes the link not verify."""
    unchecked: tuple[str, ...] = ()
    """Evidence named but not checked (its storage could not be read, or it is too large), with why."""

    @property
    def verifies(self) -> bool:
        return not self.problems

    @property
    def name(self) -> str:
        where = f" seq={self.seq}" if self.seq is not None else ""
        return f"{self.stage} ({self.action} {self.decision}{where})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verifies": self.verifies}


@dataclass(frozen=True)
class AliasMove:
    alias: str
    change: str
    """``set`` (to this version) or ``removed`` (from it; ``to`` names where it went, if anywhere)."""
    to: str | None
    by: str
    at: str
    seq: int
    authentic: bool


@dataclass(frozen=True)
class Lineage:
    model: str
    version: str
    dataset_sha256: str | None
    links: tuple[Link, ...]
    alias_moves: tuple[AliasMove, ...]
    traffic: tuple[dict[str, Any], ...]
    """Which share of the model's callers this version answered from when to when (authentic records)."""

    @property
    def verifies(self) -> bool:
        return all(link.verifies for link in self.links)

    @property
    def broken(self) -> tuple[Link, ...]:
        return tuple(link for link in self.links if not link.verifies)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "dataset_sha256": self.dataset_sha256,
            "verifies": self.verifies,
            "broken_links": [link.name for link in self.broken],
            "links": [link.to_dict() for link in self.links],
            "alias_moves": [asdict(move) for move in self.alias_moves],
            "traffic": list(self.traffic),
        }


def parse_model_version(text: str) -> tuple[str, str]:
    """``MODEL@VERSION`` (also ``model:MODEL@VERSION``) as ``(model, version)``."""
    name, at, version = text.removeprefix("model:").rpartition("@")
    if not at or not name or not version.strip():
        raise LineageError(f"{text!r} names no version: write MODEL@VERSION, e.g. ctr_recommender@3")
    return name, version.strip()


# --- evidence checks -------------------------------------------------------------------------------------


def _local_path(uri: Any) -> Path | None:
    """A file on this machine a URI names (a plain path or file://), else None (remote)."""
    if not isinstance(uri, str) or not uri:
        return None
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if "://" in uri:
        return None
    return Path(uri)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _Checks:
    passed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    def expect(self, holds: bool, ok: str, problem: str) -> None:
        (self.passed if holds else self.problems).append(ok if holds else problem)


def _storage_errors() -> tuple[type[BaseException], ...]:
    """What reading remote evidence raises when its storage cannot be read: the file system's own errors
    (OSError: access denied, connection refused, timeouts), a scheme with no file system installed
    (ImportError) or none at all (ValueError), and botocore's when s3fs passes them on (no credentials,
    endpoint unreachable). Evaluated only when something was raised, so botocore is imported only then."""
    errors: tuple[type[BaseException], ...] = (OSError, ImportError, ValueError)
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return errors
    return (*errors, BotoCoreError, ClientError)


def _evidence(
    uri: Any, what: str, checks: _Checks, files: EvidenceReader, read: Callable[[Path | str], _T]
) -> _T | None:
    """``read`` of the evidence file at ``uri`` (given a local ``Path``, else the remote URI to read with
    ``files``), or None with why noted: gone is a problem; too large, or unreadable storage, not checked.
    A UnicodeDecodeError propagates: the content, not the storage, is wrong, which the caller names."""
    path = _local_path(uri)
    where: Path | str = path if path is not None else without_connection(str(uri))
    try:
        if not (path.is_file() if path is not None else files.exists(str(where))):
            checks.problems.append(f"{what} {uri} is gone")
            return None
        size = path.stat().st_size if path is not None else files.size(str(where))
        if size > MAX_HASHED_BYTES:
            checks.unchecked.append(f"{what} {uri} is larger than {MAX_HASHED_BYTES >> 20} MB: not re-hashed")
            return None
        return read(where)
    except FileNotFoundError:  # removed between the checks
        checks.problems.append(f"{what} {uri} is gone")
    except UnicodeDecodeError:
        raise
    except _storage_errors() as exc:
        reason = str(exc).strip() or "no detail given"
        hint = (
            ""
            if path is not None
            else "; check the credentials and endpoint in the environment (AWS_* variables, "
            "AWS_ENDPOINT_URL) and the URI"
        )
        checks.unchecked.append(f"{what} {uri} cannot be read ({type(exc).__name__}: {reason}){hint}")
    return None


def _read_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _own_digests(record: AuditRecord, checks: _Checks) -> None:
    """Digests a record holds of its own details: files, lineage tags, approval."""
    details, evidence = record.details, record.evidence
    pairs = (
        ("artifacts", details.get(ARTIFACTS_FIELD), "model file hashes"),
        ("lineage_tags", details.get("tags"), "lineage tags"),
        ("approval", details.get("approval"), "approval"),
    )
    for name, value, what in pairs:
        if name in evidence and value is not None:
            checks.expect(
                sha256_json(value) == evidence[name],
                f"{what}: as the evidence digest says",
                f"the details' {what} no longer hash to the evidence digest {name!r}",
            )


def _position(
    record: AuditRecord, links: Mapping[int, tuple[str, str]], head_seq: int, checks: _Checks
) -> None:
    here = links.get(record.seq)
    before = GENESIS_HASH if record.seq == 1 else links.get(record.seq - 1, (None, None))[1]
    after = links.get(record.seq + 1)
    if here is None or here[1] != record.record_hash:
        checks.problems.append(f"seq={record.seq} is no longer in the log as read")
    elif record.prev_hash != before:
        checks.problems.append(
            f"seq={record.seq} does not follow seq={record.seq - 1} (a record before it was deleted, "
            "inserted or rewritten)"
        )
    elif after is None and head_seq > record.seq:
        checks.problems.append(
            f"seq={record.seq + 1}, the record after seq={record.seq}, is missing (deleted) though the log "
            f"goes on to seq={head_seq}"
        )
    elif after is not None and after[0] != record.record_hash:
        checks.problems.append(
            f"seq={record.seq + 1} does not point at seq={record.seq} (the chain is cut there)"
        )
    else:
        checks.passed.append("in place in the chain (linked to the records before and after it)")


def _uris(details: Mapping[str, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in details.items():
        if isinstance(value, str) and (key == "uri" or key.endswith("_uri") or key == "serving_url"):
            found[key] = value
        elif isinstance(value, Mapping) and isinstance(value.get("uri"), str):
            found[f"{key}.uri"] = value["uri"]
    return found


def _validation_checks(record: AuditRecord, sha256: str, checks: _Checks, files: EvidenceReader) -> None:
    snapshot_uri = record.details.get("snapshot_uri")
    if snapshot_uri:
        digest = _evidence(
            snapshot_uri,
            "snapshot",
            checks,
            files,
            lambda where: _sha256_of(where) if isinstance(where, Path) else files.sha256(where),
        )
        if digest is not None:
            checks.expect(
                digest == sha256,
                "the dataset snapshot hashes to the dataset sha256",
                f"the dataset snapshot {snapshot_uri} no longer hashes to {sha256[:12]}... (changed since validation)",
            )
    card_uri = record.details.get("data_card_uri")
    if card_uri:
        card = _card_or_manifest(card_uri, "data card", checks, files)
        if card is not _UNREAD:
            checks.expect(
                isinstance(card, dict) and card.get("sha256") == sha256,
                "the data card names this dataset sha256",
                f"the data card {card_uri} is not the card of dataset {sha256[:12]}... (unreadable or another dataset's)",
            )
    elif record.decision == Decision.PASSED:
        checks.problems.append("a passed validation without a data card")


_UNREAD = object()
"""A data card or manifest that was not read (gone, too large, or its storage unreadable: noted already)."""


def _card_or_manifest(uri: str, what: str, checks: _Checks, files: EvidenceReader) -> Any:
    """The JSON content of a data card or archive manifest; None if it is not JSON text; ``_UNREAD``."""

    def read(where: Path | str) -> str:
        return where.read_text(encoding="utf-8") if isinstance(where, Path) else files.read_text(where)

    try:
        text = _evidence(uri, what, checks, files, read)
    except UnicodeDecodeError:
        return None
    return _UNREAD if text is None else _read_json(text)


def _archive_checks(record: AuditRecord, checks: _Checks, files: EvidenceReader) -> None:
    archive_uri, expected = record.details.get("archive_uri"), record.evidence.get("archive_manifest")
    if not archive_uri or not expected:
        return
    manifest_uri = f"{str(archive_uri).rstrip('/')}/manifest.json"
    content = _card_or_manifest(manifest_uri, "archive manifest", checks, files)
    if content is not _UNREAD:
        checks.expect(
            content is not None and sha256_json(content) == expected,
            "the archive manifest matches its evidence digest",
            f"the archive manifest at {archive_uri} differs from the one retirement recorded",
        )


# --- the links ------------------------------------------------------------------------------------------

_STAGES = {
    AuditAction.DATASET_VALIDATED: "dataset",
    AuditAction.DATASET_QUARANTINED: "dataset",
    AuditAction.MODEL_REGISTERED: "training",
    AuditAction.GATE_TAKEN_UP: "gate",
    AuditAction.GATE_DECIDED: "gate",
    AuditAction.MODEL_DEPLOYED: "deployment",
    AuditAction.TRAFFIC_SHARE_SET: "traffic",
    AuditAction.MODEL_ROLLED_BACK: "rollback",
    AuditAction.DRIFT_ASSESSED: "monitoring",
    AuditAction.MONITORING_REFERENCE_SET: "monitoring",
    AuditAction.RETRAINING_REQUESTED: "monitoring",
    AuditAction.ALERT_NOTIFIED: "alert",
    AuditAction.BATCH_SCORED: "deployment",
    AuditAction.MODEL_RETIRED: "retirement",
}


def _summary(record: AuditRecord, version: str) -> str:
    d = record.details
    action = record.action
    if action == AuditAction.DATASET_VALIDATED:
        return (
            f"dataset {d.get('dataset')} {record.decision}: {d.get('row_count')} rows, suite {d.get('suite')}"
        )
    if action == AuditAction.DATASET_QUARANTINED:
        return f"dataset quarantined: {d.get('reason')}"
    if action == AuditAction.MODEL_REGISTERED:
        tags = d.get("tags") or {}
        return (
            f"trained in run {d.get('run_id')} (experiment {d.get('experiment')}, trigger {d.get('trigger')}), "
            f"{tags.get(Tag.FRAMEWORK)} {tags.get(Tag.FRAMEWORK_VERSION)} on Python {tags.get(Tag.PYTHON_VERSION)}, "
            f"code {tags.get(Tag.CODE_COMMIT)}, {len(d.get(ARTIFACTS_FIELD) or {})} files"
        )
    if action == AuditAction.GATE_TAKEN_UP:
        after = f", after run {d['after_run']}" if d.get("after_run") else ""
        return f"taken up for evaluation by run {record.run_id}{after}"
    if action == AuditAction.GATE_DECIDED:
        approval = d.get("approval") or {}
        who = f" by {approval['by']}" if approval.get("by") else ""
        if not who and d.get("approvers"):
            who = f" (approvers: {', '.join(map(str, d['approvers']))})"
        failed = d.get("failed") or []
        return (
            f"{record.decision}{who} under policy {d.get('policy')}, report sha256 "
            f"{str(d.get('gate_report_sha256'))[:12]}..."
            + (f", failed: {', '.join(failed)}" if failed else "")
            + (f", comment: {approval.get('comment')}" if approval.get("comment") else "")
            + (f", valid until {approval.get('valid_until')}" if approval.get("valid_until") else "")
        )
    if action == AuditAction.MODEL_DEPLOYED:
        if record.decision == Decision.PROMOTED:
            return f"champion: v{d.get(CHAMPION_FIELD)} (previous v{d.get('previous_version')})"
        return f"{record.decision}" + (f": {d.get('reason')}" if d.get("reason") else "")
    if action == AuditAction.TRAFFIC_SHARE_SET:
        share = float(d.get(SHARE_FIELD) or 0)
        if d.get(CHALLENGER_FIELD):
            return (
                f"{record.decision}: v{d.get(CHALLENGER_FIELD)} answers {share:.0%} of callers beside "
                f"champion v{d.get(CHAMPION_FIELD)}"
            )
        if record.decision == Decision.CANARY_PENDING:
            return "canary soaks on: " + "; ".join(d.get("reasons") or [])
        return (
            f"{record.decision}: champion v{d.get(CHAMPION_FIELD)} answers every caller ({d.get('reason')})"
        )
    if action == AuditAction.MODEL_ROLLED_BACK:
        return f"{record.decision}: champion back to v{d.get(CHAMPION_FIELD)} ({d.get('reason')})"
    if action == AuditAction.DRIFT_ASSESSED:
        return f"verdict {record.decision} for window {d.get('window_start')} to {d.get('window_end')}"
    if action == AuditAction.ALERT_NOTIFIED:
        return f"alert {d.get('tier')} {record.decision}" + (f": {d.get('title')}" if d.get("title") else "")
    if action == AuditAction.BATCH_SCORED:
        return f"batch scored {d.get('rows')} rows by {d.get('caller_id')}"
    if action == AuditAction.MODEL_RETIRED:
        return f"{record.decision}: {d.get('reason')}" + (
            f", archived at {d.get('archive_uri')}" if d.get("archive_uri") else ""
        )
    return f"{record.decision}"


def _link(
    record: AuditRecord,
    *,
    store: AuditStore,
    positions: Mapping[int, tuple[str, str]],
    head_seq: int,
    version: str,
    dataset_sha256: str | None,
    registered_files: Mapping[str, str] | None,
    approved_files: Mapping[str, str] | None,
    evidence_files: EvidenceReader,
) -> Link:
    checks = _Checks()
    authentic = store.authentic(record)
    checks.expect(
        authentic,
        "authentic (hash and HMAC)",
        f"seq={record.seq} fails its hash or HMAC check: altered or forged since it was written",
    )
    _position(record, positions, head_seq, checks)
    _own_digests(record, checks)
    files = record.details.get(ARTIFACTS_FIELD)
    if record.action == AuditAction.DATASET_VALIDATED and dataset_sha256:
        checks.expect(
            record.evidence.get("dataset") == dataset_sha256,
            "the dataset evidence is the dataset training used",
            f"the dataset evidence {record.evidence.get('dataset')} is not the dataset training used",
        )
        _validation_checks(record, dataset_sha256, checks, evidence_files)
    elif record.action == AuditAction.MODEL_REGISTERED and dataset_sha256:
        tag = (record.details.get("tags") or {}).get(Tag.TRAIN_DATA_SHA256)
        checks.expect(
            tag == record.evidence.get("dataset") == dataset_sha256,
            "trained on the dataset its evidence names",
            f"the training data tag {tag} is not the dataset evidence {record.evidence.get('dataset')}",
        )
    elif record.action == AuditAction.GATE_DECIDED and isinstance(files, dict) and registered_files:
        checks.expect(
            files == registered_files,
            "the files the gate decided on are those training registered",
            "the gate decided on files other than those training registered",
        )
    elif (
        record.action in (AuditAction.MODEL_DEPLOYED, AuditAction.TRAFFIC_SHARE_SET)
        and record.decision in (Decision.PROMOTED, Decision.CANARY_STARTED)
        and isinstance(files, dict)
        and record.subject.endswith(f"@{version}")
        and approved_files
    ):
        checks.expect(
            files == approved_files,
            "the files served are those the gate approved",
            "the files served are not those the gate approved",
        )
    elif record.action == AuditAction.MODEL_RETIRED:
        _archive_checks(record, checks, evidence_files)
    return Link(
        stage=_STAGES.get(record.action, "other"),
        action=record.action,
        decision=record.decision,
        summary=_summary(record, version),
        seq=record.seq,
        recorded_at=record.recorded_at,
        actor=record.actor,
        dag_run=f"{record.dag_id}/{record.run_id}" if record.dag_id else None,
        record_hash=record.record_hash,
        evidence=dict(record.evidence),
        uris=_uris(record.details),
        checks=tuple(checks.passed),
        problems=tuple(checks.problems),
        unchecked=tuple(checks.unchecked),
    )


def _concerns(record: AuditRecord, version: str) -> bool:
    """Whether a record of another version of the model is about this one (a share, a rollback to it)."""
    d = record.details
    if record.action == AuditAction.TRAFFIC_SHARE_SET:
        return version in (
            str(d.get(CHAMPION_FIELD)),
            str(d.get(CHALLENGER_FIELD)),
            str(d.get("canary_version")),
        )
    if record.action in (AuditAction.MODEL_ROLLED_BACK, AuditAction.MODEL_DEPLOYED):
        return record.decision in (Decision.ROLLED_BACK, Decision.PROMOTED) and version in (
            str(d.get(CHAMPION_FIELD)),
            str(d.get("previous_version")),
        )
    return False


def alias_moves(records: Iterable[AuditRecord], version: str, store: AuditStore) -> list[AliasMove]:
    """Who moved which alias to or from ``version`` when, from the records that decided each move (the
    stages write the record first, then move the alias)."""
    moves: list[AliasMove] = []

    def move(record: AuditRecord, alias: Alias, change: str, to: str | None = None) -> None:
        by = record.actor
        approval = record.details.get("approval") or {}
        if record.action == AuditAction.GATE_DECIDED and approval.get("by"):
            by = f"{record.actor}, approved by {approval['by']}"
        moves.append(
            AliasMove(alias.value, change, to, by, record.recorded_at, record.seq, store.authentic(record))
        )

    for record in records:
        d, own = record.details, record.subject.endswith(f"@{version}")
        if own and record.action == AuditAction.MODEL_REGISTERED:
            move(record, Alias.CANDIDATE, "set")
        elif own and record.action == AuditAction.GATE_DECIDED and record.decision == Decision.APPROVED:
            move(record, Alias.CHALLENGER, "set")
        elif record.action == AuditAction.TRAFFIC_SHARE_SET:
            if record.decision == Decision.CANARY_STARTED and str(d.get(CHALLENGER_FIELD)) == version:
                move(record, Alias.CHALLENGER, "set")
            elif (
                record.decision in (Decision.PROMOTED, Decision.ROLLED_BACK)
                and str(d.get("canary_version")) == version
            ):
                move(record, Alias.CHALLENGER, "removed")
        elif record.action == AuditAction.MODEL_DEPLOYED and record.decision == Decision.PROMOTED:
            champion, previous = str(d.get(CHAMPION_FIELD)), str(d.get("previous_version"))
            if champion == version:
                move(record, Alias.CHAMPION, "set")
            elif previous == version:
                move(record, Alias.CHAMPION, "removed", to=champion)
                move(record, Alias.PREVIOUS_CHAMPION, "set")
        elif record.action == AuditAction.MODEL_ROLLED_BACK and record.decision == Decision.ROLLED_BACK:
            champion = str(d.get(CHAMPION_FIELD)) if d.get(CHAMPION_FIELD) else None
            if own:
                move(record, Alias.CHAMPION, "removed", to=champion)
            elif champion == version:
                move(record, Alias.CHAMPION, "set")
        elif own and record.action == AuditAction.MODEL_RETIRED and record.decision == Decision.RETIRED:
            for alias in d.get("aliases_removed") or []:
                if alias in Alias.__members__.values():
                    move(record, Alias(alias), "removed")
    return moves


def _registry_link(
    registry: VersionLookup, name: str, version: str, registration: AuditRecord | None
) -> Link:
    checks = _Checks()
    try:
        found = registry.version(name, version)
    except ModelOpsError as exc:
        return Link(
            "registry", "registry.version", "missing", f"not in the registry: {exc}", problems=(str(exc),)
        )
    recorded = registration.details if registration is not None else {}
    if registration is not None:
        checks.expect(
            str(found.run_id or "") == str(recorded.get("run_id") or ""),
            "the registry version comes from the training run on record",
            f"the registry version's run {found.run_id} is not the training run on record {recorded.get('run_id')}",
        )
        tags = recorded.get("tags") or {}
        changed = sorted(key for key, value in tags.items() if found.tags.get(key) != value)
        checks.expect(
            not changed,
            "its lineage tags are those training recorded",
            f"lineage tags changed in the registry since training recorded them: {', '.join(changed)}",
        )
    else:
        checks.problems.append("no registration record to compare the registry version with")
    return Link(
        stage="registry",
        action="registry.version",
        decision="found",
        summary=f"registered from {found.source}; aliases now: {', '.join(found.aliases) or 'none'}",
        uris={"source": str(found.source)},
        checks=tuple(checks.passed),
        problems=tuple(checks.problems),
    )


def lineage(
    store: AuditStore,
    registry: VersionLookup | None,
    model: str,
    version: str | int,
    *,
    files: EvidenceReader | None = None,
) -> Lineage:
    """The lineage of ``model`` v``version`` from the audit log (and the registry, if given); remote
    evidence files are read with ``files`` (default :class:`RemoteFiles`: fsspec, the environment's
    credentials)."""
    version = str(version)
    files = files if files is not None else RemoteFiles()
    model_records = read_records(store, subject_prefix=model_subject(model, ""))
    own = [record for record in model_records if record.subject == model_subject(model, version)]
    if not own:
        raise LineageError(
            f"the audit log has no record of {model} v{version}; check the name and version "
            f"(`modelops audit query --model {model}` lists what it holds)"
        )
    registration = next((r for r in reversed(own) if r.action == AuditAction.MODEL_REGISTERED), None)
    sha = None
    if registration is not None:
        sha = registration.evidence.get("dataset") or (registration.details.get("tags") or {}).get(
            Tag.TRAIN_DATA_SHA256
        )
    dataset_records = read_records(store, subject=dataset_subject(sha)) if sha else []
    subject = model_subject(model, version)
    related = sorted(
        dataset_records + [r for r in model_records if r.subject == subject or _concerns(r, version)],
        key=lambda record: record.seq,
    )
    positions = store.links_at(
        seq for record in related for seq in (record.seq - 1, record.seq, record.seq + 1)
    )
    registered_files = registration.details.get(ARTIFACTS_FIELD) if registration is not None else None
    approval = next(
        (
            r
            for r in reversed(own)
            if r.action == AuditAction.GATE_DECIDED and r.decision == Decision.APPROVED
        ),
        None,
    )
    approved_files = approval.details.get(ARTIFACTS_FIELD) if approval is not None else None
    head_seq = (store.head() or (0, ""))[0]
    links = [
        _link(
            record,
            store=store,
            positions=positions,
            head_seq=head_seq,
            version=version,
            dataset_sha256=sha,
            registered_files=registered_files,
            approved_files=approved_files,
            evidence_files=files,
        )
        for record in related
    ]
    if registry is not None:
        place = next(
            (i + 1 for i, link in enumerate(links) if link.action == AuditAction.MODEL_REGISTERED), len(links)
        )
        links.insert(place, _registry_link(registry, model, version, registration))
    from modelops.stages.canary import traffic_history

    traffic = tuple(period for period in traffic_history(store, model) if period["version"] == version)
    return Lineage(
        model=model,
        version=version,
        dataset_sha256=sha,
        links=tuple(links),
        alias_moves=tuple(alias_moves(model_records, version, store)),
        traffic=traffic,
    )


# --- output ---------------------------------------------------------------------------------------------


def render_text(result: Lineage) -> str:
    """The lineage for a person: a verdict line, one block per link, alias moves and traffic shares."""
    state = "VERIFIES" if result.verifies else "DOES NOT VERIFY"
    lines = [
        f"lineage of {result.model} v{result.version}: {state} ({len(result.links)} links"
        + (f"; broken: {', '.join(link.name for link in result.broken)})" if result.broken else ")"),
        f"dataset sha256 {result.dataset_sha256 or 'unknown (no registration record)'}",
    ]
    for link in result.links:
        mark = "ok" if link.verifies else "NOT VERIFIED"
        where = f"seq={link.seq} " if link.seq is not None else ""
        lines.append("")
        lines.append(f"[{mark}] {link.stage}: {where}{link.action} {link.decision}")
        if link.recorded_at:
            lines.append(
                f"    at {link.recorded_at} by {link.actor}"
                + (f" (run {link.dag_run})" if link.dag_run else "")
            )
        lines.append(f"    {link.summary}")
        for key, uri in sorted(link.uris.items()):
            lines.append(f"    {key}: {uri}")
        if link.record_hash:
            lines.append(f"    record_hash {link.record_hash}")
        if link.evidence:
            lines.append(
                "    evidence " + ", ".join(f"{k}={v[:12]}..." for k, v in sorted(link.evidence.items()))
            )
        for problem in link.problems:
            lines.append(f"    FAILS: {problem}")
        if link.checks:
            lines.append(f"    verified: {'; '.join(link.checks)}")
        for note in link.unchecked:
            lines.append(f"    not checked: {note}")
    if result.alias_moves:
        lines += ["", "alias moves (from the records that decided them):"]
        for move in result.alias_moves:
            target = f" (to v{move.to})" if move.to else ""
            flag = "" if move.authentic else "  [record NOT authentic]"
            lines.append(
                f"  {move.at}  {move.alias} {move.change}{target} by {move.by} (seq={move.seq}){flag}"
            )
    if result.traffic:
        lines += ["", "traffic served (authentic records):"]
        for period in result.traffic:
            lines.append(
                f"  {period['arm']} {float(period['share']):.0%} from {period['from']} to {period['to'] or 'now'} "
                f"(seq={period['record_seq']})"
            )
    return "\n".join(lines)
