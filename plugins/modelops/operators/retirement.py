"""Operator for stage 6: retire versions the policy (or a person) selects."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from airflow.sdk import BaseOperator, Context

from modelops.errors import RetirementError, RetirementRefused
from modelops.hooks.audit import AuditHook
from modelops.hooks.registry import MlflowRegistryHook
from modelops.operators._common import sha256_json
from modelops.settings import model_spec, platform_settings, retirement_policy
from modelops.storage import storage_root


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise RetirementError(f"dry_run must be true or false, got {value!r}")


def _as_versions(value: Any) -> list[str]:
    items = value if isinstance(value, list) else str(value).replace(",", " ").split()
    versions = [str(item).strip().lstrip("v") for item in items if str(item).strip()]
    bad = [v for v in versions if not v.isdigit()]
    if bad:
        raise RetirementError(f"versions must be numbers like 3 or v3, got {bad}")
    return versions


class RetireModelsOperator(BaseOperator):
    """Archive, verify and retire the selected versions; ``dry_run`` only reports what would happen."""

    template_fields: Sequence[str] = ("versions", "reason", "dry_run", "model")
    ui_color = "#ececec"

    def __init__(
        self,
        *,
        versions: str | list[str] = "",
        reason: str = "",
        dry_run: bool | str = False,
        model: str = "",
        mlflow_conn_id: str = MlflowRegistryHook.default_conn_name,
        audit_conn_id: str = AuditHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.versions = versions
        self.reason = reason
        self.dry_run = dry_run
        self.model = model
        self.mlflow_conn_id = mlflow_conn_id
        self.audit_conn_id = audit_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from modelops.stages.retirement import (
            archive_version,
            retire_version,
            select_for_retirement,
            verify_archive,
        )

        name = model_spec(self.model or None).name
        policy = retirement_policy()
        dry_run = _as_bool(self.dry_run)
        registry = MlflowRegistryHook(mlflow_conn_id=self.mlflow_conn_id)
        audit = AuditHook(audit_conn_id=self.audit_conn_id)
        now = datetime.now(UTC)
        requested = _as_versions(self.versions)
        decisions = select_for_retirement(
            versions=registry.client.search_model_versions(f"name = '{name}'"),
            aliases=registry.aliases_of(name),
            policy=policy,
            now=now,
            requested=requested,
            reason=str(self.reason),
        )
        archive_root = storage_root() / policy.archive_subdir
        retired, refused, planned = [], [], []
        for decision in decisions:
            subject = f"model:{name}@{decision.version}"
            if not decision.retire:
                refused.append({"version": decision.version, "reason": decision.reason})
                audit.record(
                    action="model.retired",
                    subject=subject,
                    decision="refused",
                    details={"reason": decision.reason},
                    context=context,
                )
                continue
            if dry_run:
                planned.append({"version": decision.version, "reason": decision.reason})
                audit.record(
                    action="model.retired",
                    subject=subject,
                    decision="would_retire",
                    details={"reason": decision.reason, "dry_run": True},
                    context=context,
                )
                continue
            manifest = archive_version(registry, name, decision.version, archive_root, now.isoformat())
            verify_archive(manifest.archive_uri, platform_settings().storage_conn_id or None)
            removed = retire_version(
                registry,
                name,
                decision.version,
                manifest=manifest,
                reason=decision.reason,
                now=now.isoformat(),
            )
            audit.record(
                action="model.retired",
                subject=subject,
                decision="retired",
                details={
                    "reason": decision.reason,
                    "archive_uri": manifest.archive_uri,
                    "files": len(manifest.files),
                    "aliases_removed": removed,
                },
                evidence={"archive_manifest": sha256_json(manifest.to_dict())},
                context=context,
            )
            retired.append(
                {
                    "version": decision.version,
                    "reason": decision.reason,
                    "archive_uri": manifest.archive_uri,
                    "files": len(manifest.files),
                }
            )
        if dry_run:
            summary = f"dry run: would retire {[p['version'] for p in planned] or 'nothing'}"
        else:
            summary = f"retired {[r['version'] for r in retired] or 'nothing'}"
        if refused:
            summary += f"; refused {[r['version'] for r in refused]}"
        summary += f" (policy: superseded > {policy.superseded_for_days} days)"
        result = {
            "model_name": name,
            "dry_run": dry_run,
            "retired": retired,
            "planned": planned,
            "refused": refused,
            "summary": summary,
        }
        if refused and not retired and not planned and requested:
            # Everything that was asked for was refused: say so as a failure, with the reasons.
            raise RetirementRefused(
                "nothing retired: " + "; ".join(f"v{r['version']} {r['reason']}" for r in refused)
            )
        return result
