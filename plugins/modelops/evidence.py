"""Decisions bound to evidence: the model files a decision was about, and the signed records that decided.

The registry (tags, aliases, artifact store) can be written by anyone with an MLflow client; the audit
log cannot be forged without its key (:mod:`modelops.audit.keys`). So every decision that lets a model
version move on reads its authority from an authentic audit record, never from registry tags, and
binds it to the sha256 of every file of the version:

- training records the files it registered (``model.registered``);
- the gate approves only files unchanged since training, and records their hashes (``gate.decided``);
- deployment re-hashes the files it will serve against the gate's record, and records the promotion
  (``model.deployed``/``promoted``) *before* the ``champion`` alias moves;
- the gateway loads a version only after hashing its downloaded files against that record: the newest
  authentic promotion or rollback record of the model must name exactly that version and those hashes.

Imports nothing of Airflow: the gateway uses it too.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelops.errors import ModelOpsError
from modelops.vocabulary import AuditAction, Decision, model_subject

if TYPE_CHECKING:
    from modelops.audit import AuditRecord, AuditStore
    from modelops.registry import ModelRegistry

ARTIFACTS_FIELD = "artifacts"
"""Details key of a record: ``{relative path: sha256}`` of every file of the model version."""
CHAMPION_FIELD = "champion_version"
"""Details key of a promotion or rollback record: the version that serves after it."""

_CHUNK = 1 << 20


class EvidenceMismatch(ModelOpsError):
    """A model version's files, or the records about it, do not match what was decided."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(folder: Path) -> dict[str, str]:
    """``{posix relative path: sha256}`` of every regular file under ``folder``; a symlink is refused
    (it could point at a file the hash does not cover)."""
    hashes: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise EvidenceMismatch(
                f"model file {path.relative_to(folder).as_posix()} is a symbolic link; a model version must "
                "consist of regular files"
            )
        if path.is_file():
            hashes[path.relative_to(folder).as_posix()] = sha256_file(path)
    return hashes


def download_version_files(registry: ModelRegistry, name: str, version: str, folder: Path) -> Path:
    """Download a version's files into ``folder`` (nothing is loaded or run) and return the model folder.

    A version whose files do not exist is a fact to decide on (``EvidenceMismatch``: rejected, refused);
    anything else (the server down) propagates, so the task is retried instead of deciding wrongly.
    """
    from mlflow.exceptions import MlflowException

    try:
        return registry.download_version(name, version, folder)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST" and "No such artifact" not in exc.message:
            raise
        raise EvidenceMismatch(
            f"the model files of {name} v{version} cannot be downloaded (the version points at no "
            "model); register a version through modelops_training"
        ) from exc


def version_file_hashes(registry: ModelRegistry, name: str, version: str) -> dict[str, str]:
    """Download a version's files into a temporary folder and hash them (nothing is loaded or run)."""
    with tempfile.TemporaryDirectory(prefix="modelops-hash-") as folder:
        return hash_tree(download_version_files(registry, name, version, Path(folder)))


def version_files_and_mlmodel(
    registry: ModelRegistry, name: str, version: str
) -> tuple[dict[str, str], dict[str, Any]]:
    """A version's ``{path: sha256}`` and its ``MLmodel`` file read as YAML (empty if it has none), from one
    download; check the hashes against a record before trusting what the ``MLmodel`` says."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="modelops-hash-") as folder:
        root = download_version_files(registry, name, version, Path(folder))
        files = hash_tree(root)
        mlmodel = root / "MLmodel"
        content = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) if mlmodel.is_file() else None
    return files, content if isinstance(content, dict) else {}


def file_differences(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """What differs between two ``{path: sha256}`` maps, by path only (hashes of no interest to a reader)."""
    problems = [
        f"{path} changed" for path in sorted(expected) if path in actual and actual[path] != expected[path]
    ]
    problems += [f"{path} is missing" for path in sorted(set(expected) - set(actual))]
    problems += [f"{path} was added" for path in sorted(set(actual) - set(expected))]
    return problems


def recorded_files(record: AuditRecord) -> dict[str, str]:
    files = record.details.get(ARTIFACTS_FIELD)
    if not isinstance(files, dict) or not files:
        raise EvidenceMismatch(
            f"audit record seq={record.seq} ({record.action} {record.subject}) holds no model file hashes; "
            "it predates evidence binding: run the version through the stage again"
        )
    return {str(path): str(digest) for path, digest in files.items()}


def newest_authentic(
    store: AuditStore, action: str, subject: str, decisions: set[str]
) -> tuple[AuditRecord | None, list[int]]:
    """The newest authentic record with one of ``decisions``, and the seqs of inauthentic ones skipped
    (forged, altered, or unreadable: :meth:`~modelops.audit.chain.AuditStore.authentic` is False for each)."""
    forged: list[int] = []
    for record in reversed(store.records(action=action, subject=subject)):
        if record.decision not in decisions:
            continue
        if not store.authentic(record):
            forged.append(record.seq)
            continue
        return record, forged
    return None, forged


def _forged_note(forged: list[int]) -> str:
    if not forged:
        return ""
    return (
        f"; record(s) seq={', '.join(map(str, forged))} claiming it fail their HMAC check (forged, altered, "
        "or edited into details that cannot be read: run `modelops audit verify`)"
    )


def registration_record(store: AuditStore, name: str, version: str) -> AuditRecord:
    """The training stage's authentic registration record of ``name`` v``version``."""
    subject = model_subject(name, version)
    record, forged = newest_authentic(store, AuditAction.MODEL_REGISTERED, subject, {Decision.CANDIDATE})
    if record is None:
        raise EvidenceMismatch(
            f"{name} v{version} was not registered by the training stage: the audit log has no authentic "
            f"registration record for {subject}{_forged_note(forged)}. A version registered straight into "
            "MLflow is never approved; train it through modelops_training"
        )
    return record


def gate_record(store: AuditStore, name: str, version: str) -> AuditRecord:
    """The compliance gate's newest authentic decision on ``name`` v``version``; it must be an approval."""
    subject = model_subject(name, version)
    record, forged = newest_authentic(
        store, AuditAction.GATE_DECIDED, subject, {Decision.APPROVED, Decision.REJECTED}
    )
    if record is None:
        raise EvidenceMismatch(
            f"{name} v{version} has no authentic compliance gate decision in the audit log"
            f"{_forged_note(forged)}; registry tags such as compliance_status do not count. Run "
            "modelops_compliance_gate on it first"
        )
    if record.decision != Decision.APPROVED:
        raise EvidenceMismatch(
            f"{name} v{version} was {record.decision} by the compliance gate (audit record seq={record.seq}); "
            "only approved versions deploy"
        )
    return record


def approval_still_valid(record: AuditRecord, now: datetime | None = None) -> str | None:
    """Why the gate's approval ``record`` no longer deploys (expired, or no validity on record), or None."""
    now = now or datetime.now(UTC)
    approval = record.details.get("approval")
    if not isinstance(approval, dict) or not approval.get("valid_until"):
        return (
            f"the gate's approval (audit seq={record.seq}) states no validity; run modelops_compliance_gate "
            "on the version again"
        )
    until = datetime.fromisoformat(str(approval["valid_until"]))
    if now > until:
        return (
            f"the gate's approval (audit seq={record.seq}, by {approval.get('by')}) expired at {until.isoformat()}; "
            "run modelops_compliance_gate on the version again for a fresh approval"
        )
    return None


def champion_record(store: AuditStore, name: str) -> AuditRecord | None:
    """The newest authentic record that set ``name``'s champion (a promotion or a rollback), or None.

    Records of every version of the model are read (their subjects differ by version), newest first.
    """
    prefix = model_subject(name, "")
    newest: AuditRecord | None = None
    for action, decision in (
        (AuditAction.MODEL_DEPLOYED, Decision.PROMOTED),
        (AuditAction.MODEL_ROLLED_BACK, Decision.ROLLED_BACK),
    ):
        for record in reversed(store.records(action=action, subject_prefix=prefix)):
            if record.decision != decision:
                continue
            if not store.authentic(record):
                continue
            if newest is None or record.seq > newest.seq:
                newest = record
            break
    return newest


CHALLENGER_FIELD = "challenger_version"
"""Details key of a traffic record: the version on trial (None when no canary runs)."""
SHARE_FIELD = "challenger_share"
"""Details key of a traffic record: the share of callers the challenger answers (0 to 1)."""


def traffic_record(store: AuditStore, name: str) -> AuditRecord | None:
    """The newest authentic traffic record (``traffic.share_set``) of any version of ``name``, or None."""
    for record in reversed(
        store.records(action=AuditAction.TRAFFIC_SHARE_SET, subject_prefix=model_subject(name, ""))
    ):
        if store.authentic(record):
            return record
    return None


def active_canary(store: AuditStore, name: str) -> AuditRecord | None:
    """The traffic record of ``name``'s running canary, or None.

    A canary runs while its record is the newest traffic record, gives the challenger a share, and is newer
    than the champion record it names: a later promotion or rollback of the champion ends it.
    """
    record = traffic_record(store, name)
    if record is None or not record.details.get(CHALLENGER_FIELD):
        return None
    if float(record.details.get(SHARE_FIELD) or 0) <= 0:
        return None
    champion = champion_record(store, name)
    if champion is None or champion.seq > record.seq:
        return None
    if str(champion.details.get(CHAMPION_FIELD)) != str(record.details.get(CHAMPION_FIELD)):
        return None
    return record


def check_files(expected: Mapping[str, str], actual: Mapping[str, str], *, what: str) -> None:
    problems = file_differences(expected, actual)
    if problems:
        raise EvidenceMismatch(f"{what}: " + "; ".join(problems[:20]))


def evidence_summary(files: Mapping[str, str]) -> dict[str, Any]:
    """The ``artifacts`` details of a record: every file's sha256."""
    return {ARTIFACTS_FIELD: dict(sorted(files.items()))}
