"""Stage 6: retirement.

Selects the versions of one model its retirement policy (chosen by its risk tier) retires: superseded as
champion for longer than ``superseded_for_days``, or named in a manual request with a reason. Archives
each one's model artifacts and metadata with a manifest of every file's sha256 through ``ObjectStoragePath``
(a local folder by default, ``s3://`` by configuration), verifies the archive by reading it back, and only
then removes its aliases and tags it ``retired``. The champion, the version that serves, is never retired.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelops.errors import RetirementError, RetirementRefused
from modelops.settings import Catalog, ModelSpec, RetirementPolicy
from modelops.stages.outcome import AuditEntry, StageOutcome, sha256_json
from modelops.storage import as_storage_path, copy_file, sha256_of
from modelops.vocabulary import RETIRED_TRUE, Alias, AuditAction, Decision, Tag, model_subject

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from modelops.registry import ModelRegistry, VersionInfo


@dataclass(frozen=True)
class RetirementDecision:
    version: str
    retire: bool
    reason: str


@dataclass
class ArchiveManifest:
    model_name: str
    version: str
    archive_uri: str
    created_at: str
    files: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def requested_versions(versions: list[int | str] | None) -> list[str]:
    """The version numbers a request names, as strings; anything but whole numbers is an error."""
    if versions is None:
        return []
    if not isinstance(versions, list | tuple):
        raise RetirementError(f"versions must be a list of version numbers like [3, 4], got {versions!r}")
    numbers, bad = [], []
    for item in versions:
        text = str(item).strip()
        if (
            isinstance(item, bool)
            or not isinstance(item, int | str)
            or not (text.isascii() and text.isdigit())
        ):
            bad.append(item)
        else:
            numbers.append(str(int(text)))
    if bad:
        raise RetirementError(f"versions must be whole numbers like 3, got {bad}")
    return list(dict.fromkeys(numbers))


def _require_flag(dry_run: object) -> None:
    if not isinstance(dry_run, bool):
        raise RetirementError(f"dry_run must be true or false, got {dry_run!r}")


def select_for_retirement(
    *,
    versions: list[VersionInfo],
    aliases: dict[str, str],
    policy: RetirementPolicy,
    now: datetime,
    requested: list[str],
    reason: str | None,
) -> list[RetirementDecision]:
    """Decide for every version that is not retired yet; a refusal carries its reason too."""
    reason = (reason or "").strip()
    if requested and not reason:
        raise RetirementRefused("a manual retirement request needs a reason; fill in the 'reason' field")
    known = {v.version for v in versions}
    unknown = sorted(set(requested) - known, key=int)
    if unknown:
        raise RetirementError(
            f"versions {unknown} do not exist; existing versions are {sorted(known, key=int)}"
        )
    serving = aliases.get(Alias.CHAMPION)
    cutoff = now - timedelta(days=policy.superseded_for_days)
    decisions = []
    for version in sorted(versions, key=lambda v: int(v.version)):
        if version.tags.get(Tag.RETIRED) == RETIRED_TRUE:
            continue
        number = version.version
        if number == serving:
            if number in requested:
                decisions.append(RetirementDecision(number, False, "refused: it is the serving champion"))
            continue
        if number in requested:
            decisions.append(RetirementDecision(number, True, f"manual request: {reason}"))
            continue
        superseded_at = version.tags.get(Tag.SUPERSEDED_AT)
        if superseded_at and datetime.fromisoformat(superseded_at) <= cutoff:
            decisions.append(
                RetirementDecision(
                    number,
                    True,
                    f"superseded since {superseded_at}, more than {policy.superseded_for_days} days",
                )
            )
    return decisions


def archive_version(
    registry: ModelRegistry, name: str, version: str, archive_root: ObjectStoragePath, created_at: str
) -> ArchiveManifest:
    """Copy a version's model files and metadata to ``<archive_root>/<name>/v<version>/`` with a manifest."""
    info = registry.version(name, version)
    run = registry.run(info.run_id) if info.run_id else None
    target = archive_root / name / f"v{version}"
    files: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="modelops-archive-") as tmp:
        local = registry.download_version(name, version, Path(tmp))
        metadata = {
            "model_name": name,
            "version": str(version),
            "source": info.source,
            "run_id": info.run_id,
            "created": info.created_ms,
            "tags": info.tags,
            "params": run.params if run else {},
            "metrics": run.metrics if run else {},
        }
        (local / "modelops_metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            relative = path.relative_to(local).as_posix()
            digest = copy_file(as_storage_path(path), target / relative)
            files.append({"path": relative, "sha256": digest, "bytes": path.stat().st_size})
    manifest = ArchiveManifest(name, str(version), str(target), created_at, files)
    (target / "manifest.json").write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
    return manifest


def verify_archive(archive_uri: str, conn_id: str | None = None) -> ArchiveManifest:
    """Read an archive back and check every file against its manifest; raise naming each mismatch."""
    root = as_storage_path(archive_uri, conn_id)
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        raise RetirementError(f"archive {archive_uri} has no manifest.json")
    manifest = ArchiveManifest(**json.loads(manifest_path.read_text()))
    problems = []
    for entry in manifest.files:
        path = root / entry["path"]
        if not path.exists():
            problems.append(f"{entry['path']}: missing")
            continue
        digest, size = sha256_of(path)
        if digest != entry["sha256"] or size != entry["bytes"]:
            problems.append(f"{entry['path']}: sha256 {digest[:12]}... differs from the manifest")
    if problems:
        raise RetirementError(f"archive {archive_uri} does not match its manifest: {'; '.join(problems)}")
    return manifest


def retire_version(
    registry: ModelRegistry, name: str, version: str, *, manifest: ArchiveManifest, reason: str, now: str
) -> list[str]:
    """Remove the version's aliases and tag it retired; returns the aliases removed."""
    removed = [alias for alias, v in registry.aliases(name).items() if v == str(version)]
    if Alias.CHAMPION in removed:
        raise RetirementError(
            f"{name} v{version} became champion meanwhile; not retiring the serving version"
        )
    for alias in removed:
        registry.delete_alias(name, alias)
    registry.set_version_tags(
        name,
        version,
        {
            Tag.RETIRED: RETIRED_TRUE,
            Tag.RETIRED_AT: now,
            Tag.RETIRED_REASON: reason,
            Tag.RETIRED_ARCHIVE_URI: manifest.archive_uri,
        },
    )
    return removed


# --- which models, and the stage ---------------------------------------------------------------------


def plan_retirement(
    *,
    catalog: Catalog,
    registry: ModelRegistry,
    models: list[str],
    versions: list[int],
    reason: str | None,
    dry_run: bool,
) -> list[dict[str, Any]]:
    """One entry ``{"model", "versions", "reason", "dry_run"}`` per model to run retirement for: the named
    ones (an unknown name fails), or every catalog model that is registered. Versions belong to one model,
    so naming versions needs exactly one model."""
    _require_flag(dry_run)
    numbers = [int(v) for v in requested_versions(versions)]
    names = [name for name in dict.fromkeys(models or []) if name]
    if numbers and len(names) != 1:
        raise RetirementError(
            f"versions {numbers} were named for {len(names)} models ({names or 'none'}); version numbers "
            "belong to one model, so name exactly one model with them"
        )
    if names:
        for name in names:
            catalog.model(name)
    else:
        names = [name for name in sorted(catalog.models) if registry.model(name) is not None]
    return [{"model": name, "versions": numbers, "reason": reason, "dry_run": dry_run} for name in names]


def retire(
    *,
    spec: ModelSpec,
    policy: RetirementPolicy,
    registry: ModelRegistry,
    storage: ObjectStoragePath,
    storage_conn_id: str | None,
    versions: list[int | str],
    reason: str | None,
    dry_run: bool,
    now: datetime,
) -> StageOutcome:
    """Archive, verify and retire the versions of ``spec`` its policy (or a request) selects; ``dry_run``
    only records what would be retired. Refuses when everything a request named was refused.

    One audit record per decision. Should archiving or retiring a version fail after others were retired
    in this run, the stage stops, and the outcome records those retirements and the failure (a retried
    task would skip the retired versions and lose their records) and fails the task; a rerun continues
    with the rest.
    """
    name = spec.name
    _require_flag(dry_run)
    requested = requested_versions(versions)
    decisions = select_for_retirement(
        versions=registry.versions(name),
        aliases=registry.aliases(name),
        policy=policy,
        now=now,
        requested=requested,
        reason=reason,
    )
    archive_root = storage / policy.archive_subdir
    policy_hash = sha256_json(policy.model_dump())
    records: list[AuditEntry] = []
    retired: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    planned: list[dict[str, Any]] = []
    failure: str | None = None
    for decision in decisions:
        subject = model_subject(name, decision.version)
        facts = {"reason": decision.reason, "policy": policy.name}
        if not decision.retire:
            refused.append({"version": decision.version, "reason": decision.reason})
            records.append(AuditEntry(AuditAction.MODEL_RETIRED, subject, Decision.REFUSED, details=facts))
            continue
        if dry_run:
            planned.append({"version": decision.version, "reason": decision.reason})
            records.append(
                AuditEntry(
                    AuditAction.MODEL_RETIRED,
                    subject,
                    Decision.WOULD_RETIRE,
                    details={**facts, "dry_run": True},
                )
            )
            continue
        try:
            manifest = archive_version(registry, name, decision.version, archive_root, now.isoformat())
            verify_archive(manifest.archive_uri, storage_conn_id)
            removed = retire_version(
                registry,
                name,
                decision.version,
                manifest=manifest,
                reason=decision.reason,
                now=now.isoformat(),
            )
        except Exception as exc:
            if not retired:
                raise  # nothing changed yet that needs a record: fail, and let Airflow retry
            failure = f"v{decision.version}: {type(exc).__name__}: {exc}"
            records.append(
                AuditEntry(
                    AuditAction.MODEL_RETIRED, subject, Decision.FAILED, details={**facts, "error": failure}
                )
            )
            break
        retired.append(
            {
                "version": decision.version,
                "reason": decision.reason,
                "archive_uri": manifest.archive_uri,
                "files": len(manifest.files),
            }
        )
        records.append(
            AuditEntry(
                AuditAction.MODEL_RETIRED,
                subject,
                Decision.RETIRED,
                details={
                    **facts,
                    "archive_uri": manifest.archive_uri,
                    "files": len(manifest.files),
                    "aliases_removed": removed,
                },
                evidence={"archive_manifest": sha256_json(manifest.to_dict()), "policy": policy_hash},
            )
        )

    if dry_run:
        summary = f"{name}: dry run: would retire {[p['version'] for p in planned] or 'nothing'}"
    else:
        summary = f"{name}: retired {[r['version'] for r in retired] or 'nothing'}"
    if refused:
        summary += f"; refused {[r['version'] for r in refused]}"
    summary += f" (policy {policy.name}: superseded > {policy.superseded_for_days} days)"
    refusal = None
    if failure is not None:
        summary += f"; stopped at {failure}"
        refusal = (
            f"retirement of {name} stopped at {failure}; retired before that: "
            f"{[r['version'] for r in retired]}. Fix the cause and run again to retire the rest"
        )
    elif refused and not retired and not planned and requested:
        # Everything that was asked for was refused: say so as a failure, with the reasons.
        refusal = "nothing retired: " + "; ".join(f"v{r['version']} {r['reason']}" for r in refused)
    if refusal is not None:
        decision_of_run = Decision.FAILED if failure is not None else Decision.REFUSED
    elif dry_run:
        decision_of_run = Decision.WOULD_RETIRE
    else:
        decision_of_run = Decision.RETIRED
    return StageOutcome(
        decision=decision_of_run,
        summary=summary,
        details={
            "model_name": name,
            "dry_run": dry_run,
            "policy": policy.name,
            "retired": retired,
            "planned": planned,
            "refused": refused,
        },
        records=tuple(records),
        refusal=refusal,
    )
