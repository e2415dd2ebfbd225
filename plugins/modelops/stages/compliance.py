"""Stage 3: the compliance gate, policy as code.

The model's compliance policy (chosen by its risk tier, or its spec's override) is evaluated in full
against a registered version: that the training stage registered it (an authentic audit record) and its
files are unchanged since, required lineage tags, holdout metric bounds for the model's task kind plus the
spec's own bounds, and that its training data hash is a version of the model's own dataset that passed
validation (looked up in the audit log, the system of record). Every check is reported, not only the
first failure. Registry tags are written after the record, and only for people browsing MLflow.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from modelops.evidence import (
    EvidenceMismatch,
    check_files,
    evidence_summary,
    recorded_files,
    registration_record,
    version_file_hashes,
)
from modelops.settings import Catalog, CompliancePolicy, MetricThreshold, ModelSpec
from modelops.stages.common import resolve_version
from modelops.stages.outcome import AuditEntry, StageOutcome, dataset_evidence, sha256_json
from modelops.vocabulary import (
    Alias,
    AuditAction,
    ComplianceStatus,
    Decision,
    EventField,
    Tag,
    latest_passed_validation,
    model_subject,
)

if TYPE_CHECKING:
    from modelops.audit import AuditRecord, AuditStore
    from modelops.registry import ModelRegistry


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class GateReport:
    model_name: str
    version: str
    policy: str
    policy_version: str
    checks: list[Check]
    evaluated_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def approved(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def verdict(self) -> ComplianceStatus:
        return ComplianceStatus.APPROVED if self.approved else ComplianceStatus.REJECTED

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": str(self.verdict)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _metric_check(name: str, source: str, threshold: MetricThreshold, metrics: dict[str, float]) -> Check:
    check_name = f"metric:{name}" + (f" ({source})" if source else "")
    if name not in metrics:
        return Check(check_name, False, f"metric {name!r} was not logged by the training run")
    value = metrics[name]
    problems = []
    if threshold.min is not None and value < threshold.min:
        problems.append(f"below the minimum {threshold.min}")
    if threshold.max is not None and value > threshold.max:
        problems.append(f"above the maximum {threshold.max}")
    detail = f"{name}={value:.4f} " + (" and ".join(problems) if problems else "within bounds")
    return Check(check_name, not problems, detail)


def evaluate_policy(
    *,
    policy: CompliancePolicy,
    spec: ModelSpec,
    version: str,
    tags: dict[str, str],
    metrics: dict[str, float],
    dataset_validated: bool | None,
) -> GateReport:
    """Evaluate every rule of ``policy`` and the spec's own bounds; ``dataset_validated`` is None when it
    could not be looked up."""
    checks: list[Check] = []
    for tag in policy.required_tags:
        value = tags.get(tag, "")
        checks.append(
            Check(
                f"tag:{tag}",
                bool(value),
                f"{tag}={value!r}" if value else f"required tag {str(tag)!r} is missing",
            )
        )
    trained_as = tags.get(Tag.MODEL_SPEC, "")
    checks.append(
        Check(
            "lineage:model_spec",
            trained_as == spec.name,
            f"trained from model spec {trained_as!r}"
            + (
                ""
                if trained_as == spec.name
                else f", not {spec.name!r}: the version was not trained for this model"
            ),
        )
    )
    for name, threshold in policy.metric_thresholds.get(spec.task, {}).items():
        checks.append(_metric_check(name, f"policy {policy.name}", threshold, metrics))
    for name, threshold in spec.metric_thresholds.items():
        checks.append(_metric_check(name, f"model spec {spec.name}", threshold, metrics))
    if policy.require_validated_dataset:
        sha = tags.get(Tag.TRAIN_DATA_SHA256, "")
        if not sha:
            checks.append(
                Check("data:validated", False, "no train_data_sha256 tag, so the data cannot be traced")
            )
        elif dataset_validated:
            checks.append(
                Check(
                    "data:validated", True, f"dataset {spec.dataset} sha256 {sha[:12]}... passed validation"
                )
            )
        else:
            checks.append(
                Check(
                    "data:validated",
                    False,
                    f"dataset sha256 {sha[:12]}... has no passing validation record as dataset "
                    f"{spec.dataset!r} in the audit log; run the data validation DAG on it first",
                )
            )
    return GateReport(spec.name, str(version), policy.name, policy.version, checks)


def _provenance_checks(
    registry: ModelRegistry, audit: AuditStore, spec: ModelSpec, version: str, run_id: str | None
) -> tuple[list[Check], AuditRecord | None, dict[str, str]]:
    """Whether the version is the training stage's own, with its files unchanged since registration.

    Returns the checks, the authentic registration record (or None) and the files' hashes now.
    """
    try:
        registration = registration_record(audit, spec.name, version)
    except EvidenceMismatch as exc:
        registration, provenance = None, Check("provenance:registered_by_training", False, str(exc))
    else:
        same_run = registration.details.get("run_id") == run_id
        provenance = Check(
            "provenance:registered_by_training",
            same_run,
            f"registered by {registration.actor} (audit record seq={registration.seq})"
            if same_run
            else f"the registry says run {run_id!r} but training recorded run "
            f"{registration.details.get('run_id')!r} (audit seq={registration.seq}): the version was "
            "re-pointed outside the pipeline",
        )
    try:
        files = version_file_hashes(registry, spec.name, version)
    except EvidenceMismatch as exc:
        return [provenance, Check("files:unchanged_since_training", False, str(exc))], registration, {}
    if registration is None:
        unchanged = Check("files:unchanged_since_training", False, "no registration record to compare with")
    else:
        try:
            check_files(recorded_files(registration), files, what="model files differ from those registered")
        except EvidenceMismatch as exc:
            unchanged = Check("files:unchanged_since_training", False, str(exc))
        else:
            unchanged = Check(
                "files:unchanged_since_training", True, f"{len(files)} files identical to those registered"
            )
    return [provenance, unchanged], registration, files


def gate(
    *, spec: ModelSpec, catalog: Catalog, registry: ModelRegistry, audit: AuditStore, version: str | None
) -> StageOutcome:
    """Evaluate the model's compliance policy against one version; approve (alias ``challenger``) or reject.

    Lineage and metrics are read from the training stage's authentic registration record, not from
    registry tags or run metrics anyone with an MLflow client could set; the version's files are hashed
    and must be those training registered. The record holds every file's sha256, which deployment and
    the gateway check before serving.
    """
    policy = catalog.policies_for(spec).compliance
    version = resolve_version(registry, spec.name, version, Alias.CANDIDATE)
    model_version = registry.version(spec.name, version)
    provenance, registration, files = _provenance_checks(registry, audit, spec, version, model_version.run_id)
    if registration is not None:
        tags = {str(k): str(v) for k, v in registration.details.get("tags", {}).items()}
        metrics = {str(k): float(v) for k, v in registration.details.get("metrics", {}).items()}
    else:
        tags = model_version.tags
        metrics = registry.run_metrics(model_version.run_id) if model_version.run_id else {}
    sha = tags.get(Tag.TRAIN_DATA_SHA256, "")
    validated = bool(sha) and latest_passed_validation(audit, sha, dataset=spec.dataset) is not None
    report = evaluate_policy(
        policy=policy, spec=spec, version=version, tags=tags, metrics=metrics, dataset_validated=validated
    )
    report.checks[:0] = provenance
    policy_label = f"{policy.name}@{policy.version}"
    report_sha = sha256_json(report.to_dict())
    if model_version.run_id:
        registry.log_text(model_version.run_id, report.to_json(), f"compliance/gate_report_v{version}.json")
    verdict_tags = {
        Tag.COMPLIANCE_STATUS: report.verdict,
        Tag.COMPLIANCE_POLICY: policy_label,
        Tag.COMPLIANCE_REPORT_SHA256: report_sha,
    }
    record = AuditEntry(
        AuditAction.GATE_DECIDED,
        model_subject(spec.name, version),
        Decision.APPROVED if report.approved else Decision.REJECTED,
        details={
            "policy": policy_label,
            "risk_tier": spec.risk_tier,
            "checks": [asdict(check) for check in report.checks],
            "failed": [check.name for check in report.failures],
            "run_id": model_version.run_id,
            Tag.TRAIN_DATA_SHA256: sha if dataset_evidence(sha) else None,
            **evidence_summary(files),
        },
        evidence={
            "policy": sha256_json(policy.model_dump()),
            "gate_report": report_sha,
            "artifacts": sha256_json(files),
            **dataset_evidence(sha),
        },
    )
    details = {
        "model_name": spec.name,
        "version": version,
        "verdict": str(report.verdict),
        "checks": len(report.checks),
    }

    def tag_verdict() -> None:
        # For people browsing MLflow only: no stage decides from these tags.
        registry.set_version_tags(spec.name, version, verdict_tags)

    if not report.approved:
        failures = "\n".join(f"  - {check.name}: {check.detail}" for check in report.failures)
        return StageOutcome(
            decision=Decision.REJECTED,
            summary=f"{spec.name} v{version} rejected by {policy_label}",
            details=details,
            records=(record,),
            effects=(tag_verdict,),
            refusal=f"{spec.name} v{version} rejected by policy {policy_label}: "
            f"{len(report.failures)} of {len(report.checks)} checks failed:\n{failures}\n"
            "No alias moved; the version is tagged compliance_status=rejected.",
        )
    return StageOutcome(
        decision=Decision.APPROVED,
        summary=f"{spec.name} v{version} approved: {len(report.checks)}/{len(report.checks)} checks passed "
        f"({policy_label})",
        details=details,
        records=(record,),
        effects=(tag_verdict, lambda: registry.set_alias(spec.name, Alias.CHALLENGER, version)),
        asset_extra={EventField.MODEL_NAME: spec.name, EventField.VERSION: version, "policy": policy_label},
    )
