"""Stage 6: retirement.

Selects the versions the retirement policy retires (superseded as champion for longer than
``superseded_for_days``, or named in a manual request with a reason), archives each one's model
artifacts and metadata with a manifest of every file's sha256 through ``ObjectStoragePath`` (a local
folder by default, ``s3://`` by configuration), verifies the archive by reading it back, and only then
removes its aliases and tags it ``retired``. The champion, the version that serves, is never retired.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelops.errors import RetirementError, RetirementRefused
from modelops.settings import RetirementPolicy
from modelops.stages.deployment import CHAMPION_ALIAS
from modelops.storage import as_storage_path, copy_file, sha256_of

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath
    from mlflow.entities.model_registry import ModelVersion

    from modelops.hooks.registry import MlflowRegistryHook


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


def select_for_retirement(
    *,
    versions: list[ModelVersion],
    aliases: dict[str, str],
    policy: RetirementPolicy,
    now: datetime,
    requested: list[str],
    reason: str,
) -> list[RetirementDecision]:
    """Decide for every version that is not retired yet; a refusal carries its reason too."""
    if requested and not reason.strip():
        raise RetirementRefused("a manual retirement request needs a reason; fill in the 'reason' field")
    known = {str(v.version) for v in versions}
    unknown = sorted(set(requested) - known, key=int)
    if unknown:
        raise RetirementError(
            f"versions {unknown} do not exist; existing versions are {sorted(known, key=int)}"
        )
    serving = aliases.get(CHAMPION_ALIAS)
    cutoff = now - timedelta(days=policy.superseded_for_days)
    decisions = []
    for version in sorted(versions, key=lambda v: int(v.version)):
        tags = dict(version.tags)
        if tags.get("retired") == "true":
            continue
        number = str(version.version)
        if number == serving:
            if number in requested:
                decisions.append(RetirementDecision(number, False, "refused: it is the serving champion"))
            continue
        if number in requested:
            decisions.append(RetirementDecision(number, True, f"manual request: {reason.strip()}"))
            continue
        superseded_at = tags.get("superseded_at")
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
    registry: MlflowRegistryHook, name: str, version: str, archive_root: ObjectStoragePath, created_at: str
) -> ArchiveManifest:
    """Copy a version's model files and metadata to the archive and write its manifest."""
    import mlflow

    model_version = registry.get_version(name, version)
    run = registry.client.get_run(model_version.run_id) if model_version.run_id else None
    target = archive_root / name / f"v{version}"
    files: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        # MLflow resolves models:/ URIs through the process-wide registry URI whatever is passed here,
        # so point it at the hook's server first (a task process would otherwise read the default).
        registry.activate()
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}", dst_path=tmp, tracking_uri=registry.tracking_uri
            )
        )
        metadata = {
            "model_name": name,
            "version": version,
            "source": model_version.source,
            "run_id": model_version.run_id,
            "created": model_version.creation_timestamp,
            "tags": dict(model_version.tags),
            "params": dict(run.data.params) if run else {},
            "metrics": dict(run.data.metrics) if run else {},
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
    registry: MlflowRegistryHook, name: str, version: str, *, manifest: ArchiveManifest, reason: str, now: str
) -> list[str]:
    """Remove the version's aliases and tag it retired; returns the aliases removed."""
    removed = [alias for alias, v in registry.aliases_of(name).items() if v == str(version)]
    if CHAMPION_ALIAS in removed:
        raise RetirementError(
            f"{name} v{version} became champion meanwhile; not retiring the serving version"
        )
    for alias in removed:
        registry.client.delete_registered_model_alias(name, alias)
    registry.set_tags(
        name,
        version,
        {
            "retired": "true",
            "retired_at": now,
            "retired_reason": reason,
            "retired_archive_uri": manifest.archive_uri,
        },
    )
    return removed
