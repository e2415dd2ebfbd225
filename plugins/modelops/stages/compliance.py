"""Stage 3: the compliance gate, policy as code, with a human approval where the policy asks for one.

The model's compliance policy (chosen by its risk tier, or its spec's override) names the checks to run
(:mod:`modelops.checks`, registered by name) and whether a person must approve. :func:`gate` runs
provenance (the version is the training stage's own and its files are unchanged since) and every check the
policy lists, reporting every failure, then decides:

- a failed check rejects (no alias moves);
- all passed and the policy requires no approval: approved automatically, recorded as such;
- all passed and the policy requires approval: recorded as ``awaiting_approval``; the operator then waits
  in the Airflow UI (human-in-the-loop) and :func:`decide_approval` turns the answer, a timeout or an
  answer from someone outside the approver list into the final decision.

Only the final ``approved`` record lets the version deploy; it holds the report hash, every file's sha256,
and who approved when with which comment (``approval``), valid until the policy's ``valid_for_hours``.
Imports nothing of Airflow: the CLI (``modelops gate check``) runs :func:`evaluate` too.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelops.checks import CHECKS, CheckResult, EvidenceFiles, GateInputs, run_checks
from modelops.errors import GateFailed
from modelops.evidence import (
    EvidenceMismatch,
    check_files,
    download_version_files,
    evidence_summary,
    hash_tree,
    newest_authentic,
    recorded_files,
    registration_record,
)
from modelops.settings import Catalog, CompliancePolicy, ModelSpec
from modelops.stages.common import acted_on_subjects, newest_unacted_version, resolve_version, version_number
from modelops.stages.outcome import AuditEntry, StageOutcome, dataset_evidence, sha256_json
from modelops.vocabulary import (
    Alias,
    AuditAction,
    ComplianceStatus,
    Decision,
    EventField,
    Tag,
    model_subject,
)

if TYPE_CHECKING:
    from modelops.audit import AuditRecord, AuditStore
    from modelops.registry import ModelRegistry, VersionInfo

APPROVE = "Approve"
REJECT = "Reject"
APPROVAL_OPTIONS = (APPROVE, REJECT)
"""The answers the approval form offers, in the Airflow UI and its REST API."""
COMMENT_LIMIT = 2000


@dataclass
class GateReport:
    model_name: str
    version: str
    policy: str
    policy_version: str
    checks: list[CheckResult]
    evaluated_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[CheckResult]:
        return [check for check in self.checks if not check.passed]

    def check(self, name: str) -> CheckResult:
        return next(check for check in self.checks if check.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "version": self.version,
            "policy": self.policy,
            "policy_version": self.policy_version,
            "evaluated_at": self.evaluated_at,
            "passed": self.passed,
            "checks": [check.to_dict() for check in self.checks],
            "failed": [check.name for check in self.failures],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# --- evaluation: provenance and every check of the policy ----------------------------------------------


def _provenance_checks(
    audit: AuditStore, spec: ModelSpec, version: str, run_id: str | None, files: dict[str, str] | None
) -> tuple[list[CheckResult], AuditRecord | None]:
    """Whether the version is the training stage's own, with its files unchanged since registration."""
    try:
        registration = registration_record(audit, spec.name, version)
    except EvidenceMismatch as exc:
        registration, provenance = None, CheckResult("provenance:registered_by_training", False, str(exc))
    else:
        same_run = registration.details.get("run_id") == run_id
        provenance = CheckResult(
            "provenance:registered_by_training",
            same_run,
            f"registered by {registration.actor} (audit record seq={registration.seq})"
            if same_run
            else f"the registry says run {run_id!r} but training recorded run "
            f"{registration.details.get('run_id')!r} (audit seq={registration.seq}): the version was "
            "re-pointed outside the pipeline",
            evidence={"registration_record_seq": str(registration.seq)},
        )
    if files is None:
        unchanged = CheckResult(
            "files:unchanged_since_training",
            False,
            f"the model files of {spec.name} v{version} cannot be downloaded (the version points at no model)",
        )
    elif registration is None:
        unchanged = CheckResult(
            "files:unchanged_since_training", False, "no registration record to compare with"
        )
    else:
        try:
            check_files(recorded_files(registration), files, what="model files differ from those registered")
        except EvidenceMismatch as exc:
            unchanged = CheckResult("files:unchanged_since_training", False, str(exc))
        else:
            unchanged = CheckResult(
                "files:unchanged_since_training", True, f"{len(files)} files identical to those registered"
            )
    return [provenance, unchanged], registration


@dataclass
class Evaluation:
    """What :func:`evaluate` found about one version: the report, and the facts the record needs."""

    spec: ModelSpec
    policy: CompliancePolicy
    version: VersionInfo
    report: GateReport
    files: dict[str, str]
    train_data_sha256: str

    @property
    def policy_label(self) -> str:
        return f"{self.policy.name}@{self.policy.version}"

    @property
    def report_sha256(self) -> str:
        return sha256_json(self.report.to_dict())


@contextmanager
def _downloaded(registry: ModelRegistry, name: str, version: str) -> Iterator[Path | None]:
    """The version's files in a temporary folder, or None when it has none to download."""
    with tempfile.TemporaryDirectory(prefix="modelops-gate-") as folder:
        try:
            model_dir: Path | None = download_version_files(registry, name, version, Path(folder))
        except EvidenceMismatch:
            model_dir = None
        yield model_dir


def evaluate(
    *,
    spec: ModelSpec,
    catalog: Catalog,
    registry: ModelRegistry,
    audit: AuditStore,
    files: EvidenceFiles,
    version: str | None,
) -> Evaluation:
    """Run provenance and every check of the model's policy against one version (default: ``candidate``).

    Lineage and metrics are read from the training stage's authentic registration record, not from
    registry tags or run metrics anyone with an MLflow client could set. Nothing of the version is loaded.
    """
    policy = catalog.policies_for(spec).compliance
    version = resolve_version(registry, spec.name, version, Alias.CANDIDATE)
    model_version = registry.version(spec.name, version)
    with _downloaded(registry, spec.name, version) as model_dir:
        hashes = hash_tree(model_dir) if model_dir is not None else None
        provenance, registration = _provenance_checks(audit, spec, version, model_version.run_id, hashes)
        if registration is not None:
            tags = {str(k): str(v) for k, v in registration.details.get("tags", {}).items()}
            metrics = {str(k): float(v) for k, v in registration.details.get("metrics", {}).items()}
        else:
            # Read only to say what is wrong: without the record no check can pass on these.
            tags, metrics = model_version.tags, {}
        inputs = GateInputs(
            spec=spec,
            policy=policy,
            catalog=catalog,
            registry=registry,
            audit=audit,
            files=files,
            version=version,
            run_id=model_version.run_id,
            registration=registration,
            tags=tags,
            metrics=metrics,
            model_dir=model_dir,
        )
        checks = [*provenance, *run_checks(inputs)]
    report = GateReport(spec.name, version, policy.name, policy.version, checks)
    return Evaluation(spec, policy, model_version, report, hashes or {}, tags.get(Tag.TRAIN_DATA_SHA256, ""))


# --- the decision after evaluation ------------------------------------------------------------------------


def _record_details(evaluation: Evaluation) -> dict[str, Any]:
    sha = evaluation.train_data_sha256
    return {
        "policy": evaluation.policy_label,
        "risk_tier": evaluation.spec.risk_tier,
        "checks": [check.to_dict() for check in evaluation.report.checks],
        "failed": [check.name for check in evaluation.report.failures],
        "run_id": evaluation.version.run_id,
        "gate_report_sha256": evaluation.report_sha256,
        Tag.TRAIN_DATA_SHA256: sha if dataset_evidence(sha) else None,
        **evidence_summary(evaluation.files),
    }


def _record_evidence(evaluation: Evaluation) -> dict[str, str]:
    return {
        "policy": sha256_json(evaluation.policy.describe()),
        "gate_report": evaluation.report_sha256,
        "artifacts": sha256_json(evaluation.files),
        **dataset_evidence(evaluation.train_data_sha256),
    }


def approval_deadline(policy: CompliancePolicy, now: datetime) -> str:
    return (now + timedelta(hours=policy.approval.valid_for_hours)).isoformat()


def gate(
    *,
    spec: ModelSpec,
    catalog: Catalog,
    registry: ModelRegistry,
    audit: AuditStore,
    files: EvidenceFiles,
    version: str | None,
    now: datetime | None = None,
) -> StageOutcome:
    """Evaluate the policy and decide: rejected, approved automatically, or awaiting a person's approval.

    The JSON report and a readable model card are logged beside the version's run; the record holds every
    check, the report's hash and every file's sha256, which deployment and the gateway check before serving.
    """
    now = now or datetime.now(UTC)
    evaluation = evaluate(
        spec=spec, catalog=catalog, registry=registry, audit=audit, files=files, version=version
    )
    report, policy, version = evaluation.report, evaluation.policy, evaluation.report.version
    subject = model_subject(spec.name, version)
    details = {"model_name": spec.name, "version": version, "checks": len(report.checks)}
    run_id = evaluation.version.run_id
    if not report.passed:
        _log_report(registry, spec, policy, version, run_id, _record_details(evaluation), "REJECTED", report)
        failures = "\n".join(f"  - {check.name}: {check.detail}" for check in report.failures)
        return StageOutcome(
            decision=Decision.REJECTED,
            summary=f"{spec.name} v{version} rejected by {evaluation.policy_label}: "
            f"{len(report.failures)} of {len(report.checks)} checks failed",
            details={**details, "verdict": str(ComplianceStatus.REJECTED), "failed": details_failed(report)},
            records=(
                AuditEntry(
                    AuditAction.GATE_DECIDED,
                    subject,
                    Decision.REJECTED,
                    details=_record_details(evaluation),
                    evidence=_record_evidence(evaluation),
                ),
            ),
            effects=(_verdict_tags(registry, evaluation, ComplianceStatus.REJECTED),),
            refusal=f"{spec.name} v{version} rejected by policy {evaluation.policy_label}: "
            f"{len(report.failures)} of {len(report.checks)} checks failed:\n{failures}\n"
            "No alias moved; the version is tagged compliance_status=rejected.",
        )
    if policy.approval.required:
        _log_report(
            registry, spec, policy, version, run_id, _record_details(evaluation), "AWAITING APPROVAL", report
        )
        return StageOutcome(
            decision=Decision.AWAITING_APPROVAL,
            summary=f"{spec.name} v{version}: {len(report.checks)}/{len(report.checks)} checks passed "
            f"({evaluation.policy_label}); awaiting approval by one of {policy.approval.approvers}",
            details={
                **details,
                "verdict": str(ComplianceStatus.AWAITING_APPROVAL),
                "approvers": list(policy.approval.approvers),
                "respond_within_hours": policy.approval.respond_within_hours,
                "gate_report_sha256": evaluation.report_sha256,
            },
            records=(
                AuditEntry(
                    AuditAction.GATE_DECIDED,
                    subject,
                    Decision.AWAITING_APPROVAL,
                    details={
                        **_record_details(evaluation),
                        "approvers": list(policy.approval.approvers),
                        "respond_by": (
                            now + timedelta(hours=policy.approval.respond_within_hours)
                        ).isoformat(),
                    },
                    evidence=_record_evidence(evaluation),
                ),
            ),
            effects=(_verdict_tags(registry, evaluation, ComplianceStatus.AWAITING_APPROVAL),),
        )
    approval = {
        "mode": "automatic",
        "by": f"policy {evaluation.policy_label}",
        "reason": f"policy {policy.name} requires no human approval for risk tier {spec.risk_tier}",
        "approved_at": now.isoformat(),
        "valid_until": approval_deadline(policy, now),
    }
    _log_report(
        registry,
        spec,
        policy,
        version,
        run_id,
        {**_record_details(evaluation), "approval": approval},
        "APPROVED",
        report,
    )
    return _approved(
        registry,
        spec,
        version,
        details={**details, "verdict": str(ComplianceStatus.APPROVED), "approval": approval},
        record_details={**_record_details(evaluation), "approval": approval},
        evidence=_record_evidence(evaluation),
        summary=f"{spec.name} v{version} approved automatically: {len(report.checks)}/{len(report.checks)} "
        f"checks passed ({evaluation.policy_label})",
        policy_label=evaluation.policy_label,
        report_sha=evaluation.report_sha256,
    )


def details_failed(report: GateReport) -> list[str]:
    return [check.name for check in report.failures]


def _verdict_tags(registry: ModelRegistry, evaluation: Evaluation, status: ComplianceStatus) -> Any:
    tags = {
        Tag.COMPLIANCE_STATUS: status,
        Tag.COMPLIANCE_POLICY: evaluation.policy_label,
        Tag.COMPLIANCE_REPORT_SHA256: evaluation.report_sha256,
    }

    def apply() -> None:
        # For people browsing MLflow only: no stage decides from these tags.
        registry.set_version_tags(evaluation.spec.name, evaluation.report.version, tags)

    return apply


def _approved(
    registry: ModelRegistry,
    spec: ModelSpec,
    version: str,
    *,
    details: dict[str, Any],
    record_details: dict[str, Any],
    evidence: dict[str, str],
    summary: str,
    policy_label: str,
    report_sha: str,
) -> StageOutcome:
    def tag_and_alias() -> None:
        registry.set_version_tags(
            spec.name,
            version,
            {
                Tag.COMPLIANCE_STATUS: ComplianceStatus.APPROVED,
                Tag.COMPLIANCE_POLICY: policy_label,
                Tag.COMPLIANCE_REPORT_SHA256: report_sha,
            },
        )
        registry.set_alias(spec.name, Alias.CHALLENGER, version)

    return StageOutcome(
        decision=Decision.APPROVED,
        summary=summary,
        details=details,
        records=(
            AuditEntry(
                AuditAction.GATE_DECIDED,
                model_subject(spec.name, version),
                Decision.APPROVED,
                details=record_details,
                evidence={**evidence, "approval": sha256_json(record_details.get("approval"))},
            ),
        ),
        effects=(tag_and_alias,),
        asset_extra={EventField.MODEL_NAME: spec.name, EventField.VERSION: version, "policy": policy_label},
    )


# --- the human approval ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApprovalResponse:
    """What came back from the approval form (Airflow's human-in-the-loop), or that nothing did."""

    chosen: str | None
    responder_id: str | None
    responder_name: str | None = None
    comment: str = ""
    responded_at: str | None = None
    timed_out: bool = False


def awaiting_record(audit: AuditStore, name: str, version: str) -> AuditRecord:
    """The gate's authentic ``awaiting_approval`` record of the version, which an approval completes."""
    record, _forged = newest_authentic(
        audit,
        AuditAction.GATE_DECIDED,
        model_subject(name, version),
        {Decision.AWAITING_APPROVAL, Decision.APPROVED, Decision.REJECTED},
    )
    if record is None or record.decision != Decision.AWAITING_APPROVAL:
        # A refusal, not a fault: retrying would find the same log.
        raise GateFailed(
            f"{name} v{version} has no authentic gate record awaiting approval"
            + (f" (its newest gate decision is {record.decision}, seq={record.seq})" if record else "")
            + "; run modelops_compliance_gate on it again"
        )
    return record


def decide_approval(
    *,
    spec: ModelSpec,
    catalog: Catalog,
    registry: ModelRegistry,
    audit: AuditStore,
    version: str,
    response: ApprovalResponse,
    now: datetime | None = None,
) -> StageOutcome:
    """Turn an approval form's answer into the gate's final decision on ``version``.

    Approved only when the answer is ``Approve``, given in time, by one of the policy's approvers, about
    files unchanged since the checks ran. Anything else is a rejection naming why, on record.
    """
    now = now or datetime.now(UTC)
    policy = catalog.policies_for(spec).compliance
    pending = awaiting_record(audit, spec.name, version)
    subject = model_subject(spec.name, version)
    responder = response.responder_id or "nobody"
    answer = {
        "mode": "human",
        "answer": response.chosen,
        "by": response.responder_id,
        "by_name": response.responder_name,
        "comment": (response.comment or "")[:COMMENT_LIMIT],
        "responded_at": response.responded_at,
        "awaiting_record_seq": pending.seq,
        "approvers": list(policy.approval.approvers),
    }
    problem = None
    if response.timed_out:
        problem = (
            f"no approval within {policy.approval.respond_within_hours:g} hours (policy {policy.name}): "
            "no answer counts as a rejection"
        )
    elif response.responder_id not in policy.approval.approvers:
        problem = (
            f"the answer came from {responder!r}, who is not among the approvers "
            f"{list(policy.approval.approvers)} of policy {policy.name}; it does not count"
        )
    elif response.chosen != APPROVE:
        problem = f"{responder} rejected it" + (f": {answer['comment']}" if answer["comment"] else "")
    else:
        try:
            with _downloaded(registry, spec.name, version) as model_dir:
                if model_dir is None:
                    raise EvidenceMismatch(f"the model files of {spec.name} v{version} are gone")
                check_files(
                    recorded_files(pending),
                    hash_tree(model_dir),
                    what="the model files changed while the version awaited approval",
                )
        except EvidenceMismatch as exc:
            problem = str(exc)
    details = {k: v for k, v in pending.details.items() if k not in ("approvers", "respond_by")}
    evidence = {k: v for k, v in pending.evidence.items() if k != "approval"}
    run_id = str(details.get("run_id") or "") or None
    if problem is not None:
        record_details = {**details, "approval": {**answer, "refused": problem}}
        _log_report(registry, spec, policy, version, run_id, record_details, "REJECTED")
        return StageOutcome(
            decision=Decision.REJECTED,
            summary=f"{spec.name} v{version} rejected at approval: {problem}",
            details={"model_name": spec.name, "version": version, "verdict": "rejected", "reason": problem},
            records=(
                AuditEntry(
                    AuditAction.GATE_DECIDED,
                    subject,
                    Decision.REJECTED,
                    details=record_details,
                    evidence={**evidence, "approval": sha256_json(record_details["approval"])},
                ),
            ),
            effects=(
                lambda: registry.set_version_tags(spec.name, version, {Tag.COMPLIANCE_STATUS: "rejected"}),
            ),
            refusal=f"{spec.name} v{version} not approved: {problem}. No alias moved.",
        )
    approval = {**answer, "approved_at": now.isoformat(), "valid_until": approval_deadline(policy, now)}
    _log_report(registry, spec, policy, version, run_id, {**details, "approval": approval}, "APPROVED")
    return _approved(
        registry,
        spec,
        version,
        details={"model_name": spec.name, "version": version, "verdict": "approved", "approval": approval},
        record_details={**details, "approval": approval},
        evidence=evidence,
        summary=f"{spec.name} v{version} approved by {responder}"
        + (
            f" ({response.responder_name})"
            if response.responder_name and response.responder_name != response.responder_id
            else ""
        )
        + (f": {answer['comment']}" if answer["comment"] else ""),
        policy_label=str(details.get("policy")),
        report_sha=str(details.get("gate_report_sha256")),
    )


# --- the report a person reads ---------------------------------------------------------------------------


def model_card(
    spec: ModelSpec, policy: CompliancePolicy, version: str, details: dict[str, Any], status: str
) -> str:
    """A readable model card (Markdown) beside the JSON report, from the gate record's ``details``: what the
    model is, who answers for it, every check with what it proves, the approval and every file's hash."""
    approval = details.get("approval") if isinstance(details.get("approval"), dict) else None
    lines = [
        f"# Model card: {spec.name} v{version}",
        "",
        spec.description.strip() or "(no description)",
        "",
        "| | |",
        "|---|---|",
        f"| Owner | {spec.owner} |",
        f"| Team / department | {spec.team} / {spec.department} |",
        f"| Risk tier | {spec.risk_tier} |",
        f"| Compliance labels | {', '.join(spec.compliance_labels) or 'none'} |",
        f"| Task | {spec.task} |",
        f"| Training data | dataset `{spec.dataset}`, sha256 `{details.get(Tag.TRAIN_DATA_SHA256) or 'unknown'}` |",
        f"| Training run | `{details.get('run_id')}` |",
        f"| Policy | {details.get('policy')} |",
        f"| Verdict | **{status}** |",
        f"| Gate report sha256 | `{details.get('gate_report_sha256')}` |",
    ]
    if approval:
        lines.append(
            f"| Approval | {approval.get('mode')} by {approval.get('by') or '?'}"
            + (f" ({approval['by_name']})" if approval.get("by_name") else "")
            + (f", valid until {approval['valid_until']}" if approval.get("valid_until") else "")
            + (f"; refused: {approval['refused']}" if approval.get("refused") else "")
            + " |"
        )
        if approval.get("comment"):
            lines.append(f"| Approver's comment | {_cell(str(approval['comment']))} |")
    lines += ["", "## Checks", "", "| Check | Result | Detail |", "|---|---|---|"]
    for check in details.get("checks", []):
        result = "pass" if check.get("passed") else "**FAIL**"
        lines.append(f"| {check.get('name')} | {result} | {_cell(str(check.get('detail', '')))} |")
    lines += ["", "## What each check proves", ""]
    lines += [
        "- **provenance:registered_by_training**: an authentic training record registered this version from "
        "this run.",
        "- **files:unchanged_since_training**: every file hashes to what training recorded.",
    ]
    lines += [f"- **{name}**: {CHECKS[name].proves}." for name in policy.checks]
    lines += ["", "## Files", "", "| File | sha256 |", "|---|---|"]
    lines += [f"| {path} | `{digest}` |" for path, digest in sorted(details.get("artifacts", {}).items())]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _log_report(
    registry: ModelRegistry,
    spec: ModelSpec,
    policy: CompliancePolicy,
    version: str,
    run_id: str | None,
    details: dict[str, Any],
    status: str,
    report: GateReport | None = None,
) -> None:
    """The JSON report (at evaluation) and the model card (at every decision) beside the version's run."""
    if not run_id:
        return
    if report is not None:
        registry.log_text(run_id, report.to_json(), f"compliance/gate_report_v{version}.json")
    registry.log_text(
        run_id, model_card(spec, policy, version, details, status), f"compliance/model_card_v{version}.md"
    )


def ungated_candidates(
    catalog: Catalog, audit: AuditStore, acted_on: set[str] | None = None
) -> dict[str, str]:
    """Model -> its newest registered version (authentic registration record) the gate has not decided
    on, newer than any version it has: what a lost ``modelops_model_candidate`` event left behind.
    ``acted_on``: the subjects of the gate's authentic decisions, when the caller has read them."""
    if acted_on is None:
        acted_on = acted_on_subjects(audit, AuditAction.GATE_DECIDED)
    pending: dict[str, str] = {}
    for name in catalog.models:
        prefix = model_subject(name, "")
        decided = [version_number(subject) for subject in acted_on if subject.startswith(prefix)]
        version = newest_unacted_version(
            audit,
            name,
            wanted=(AuditAction.MODEL_REGISTERED, Decision.CANDIDATE),
            acted_on=acted_on,
            above=max(decided, default=0),
        )
        if version is not None:
            pending[name] = version
    return pending
