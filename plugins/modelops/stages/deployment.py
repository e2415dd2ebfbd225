"""Stage 4: deployment to the scoring gateway with a smoke test and automatic rollback.

Only a version the compliance gate approved deploys, decided from the gate's authentic audit record (never
from registry tags), with the version's files re-hashed against that record. It is first *staged* in the
gateway next to the live champion, smoke-tested through HTTP with rows of its own validated training data
(only requests that name its version reach it); then the promotion is recorded, the registry's
``champion`` alias moves (``previous_champion`` keeps the old one) and the gateway reloads, serving it only
because the promotion record names its files. A failed smoke test or a refusal leaves the previous
champion serving; a failed reload records a rollback and moves the alias back.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from modelops.environment import compare_environments, recorded_environment
from modelops.errors import DeploymentFailed
from modelops.evidence import (
    CHAMPION_FIELD,
    EvidenceMismatch,
    approval_still_valid,
    champion_record,
    check_files,
    evidence_summary,
    gate_record,
    newest_authentic,
    recorded_files,
    version_file_hashes,
    version_files_and_mlmodel,
)
from modelops.settings import Catalog, ModelSpec
from modelops.stages.common import acted_on_subjects, newest_unacted_version, resolve_version, version_number
from modelops.stages.outcome import AuditEntry, Recorder, StageOutcome, dataset_evidence, sha256_json
from modelops.storage import read_dataset
from modelops.vocabulary import (
    SMOKE_TEST_CALLER,
    Alias,
    AuditAction,
    Decision,
    DeploymentStatus,
    EventField,
    Tag,
    latest_passed_validation,
    model_subject,
)

if TYPE_CHECKING:
    import pandas as pd

    from modelops.audit import AuditRecord, AuditStore
    from modelops.registry import ModelRegistry
    from modelops.serving.targets import ServingTarget


@dataclass
class SmokeTest:
    rows: int
    status_code: int | None = None
    latency_ms: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass
class DeploymentResult:
    model_name: str
    version: str
    previous_version: str | None
    smoke_test: SmokeTest
    deployed_at: str
    already_live: bool = False
    canary: dict[str, Any] | None = None
    """The traffic record's details when the version went live as a canary beside the champion."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "smoke_test": {**asdict(self.smoke_test), "passed": self.smoke_test.passed}}


def undeployed_approvals(
    catalog: Catalog, audit: AuditStore, acted_on: set[str] | None = None
) -> dict[str, str]:
    """Model -> its newest version the gate approved that no deployment has acted on, newer than the
    version the champion record names (serving models only). ``acted_on``: the subjects of the
    authentic deployment records, when the caller has read them."""
    if acted_on is None:
        acted_on = acted_on_subjects(audit, AuditAction.MODEL_DEPLOYED)
    pending: dict[str, str] = {}
    for spec in catalog.models.values():
        if not spec.serving.enabled:
            continue
        champion = champion_record(audit, spec.name)
        version = newest_unacted_version(
            audit,
            spec.name,
            wanted=(AuditAction.GATE_DECIDED, Decision.APPROVED),
            acted_on=acted_on,
            above=version_number(champion.subject) if champion is not None else 0,
        )
        if version is not None:
            pending[spec.name] = version
    return pending


def _prediction_problem(spec: ModelSpec, prediction: Any) -> str | None:
    if spec.task == "regression":
        value = prediction[0] if isinstance(prediction, list) and len(prediction) == 1 else prediction
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return f"{prediction!r} is not a finite number"
        return None
    probabilities = prediction if isinstance(prediction, list) else [prediction]
    if not all(isinstance(p, int | float) and 0.0 <= p <= 1.0 for p in probabilities):
        return f"{prediction!r} is not a probability"
    if len(probabilities) > 1 and not math.isclose(sum(probabilities), 1.0, abs_tol=1e-6):
        return f"class probabilities {prediction!r} do not sum to 1"
    return None


def smoke_test(gateway: ServingTarget, spec: ModelSpec, version: str, rows: pd.DataFrame) -> SmokeTest:
    """Score ``rows`` through HTTP on the staged version and check each answer fits the task kind."""
    result = SmokeTest(rows=len(rows))
    payload = {"dataframe_split": rows.to_dict(orient="split", index=False)}
    started = time.perf_counter()
    response = gateway.score(spec.name, payload, version=version, caller_id=SMOKE_TEST_CALLER)
    result.latency_ms = round((time.perf_counter() - started) * 1000, 1)
    result.status_code = response.status_code
    if response.status_code != 200:
        result.problems.append(f"HTTP {response.status_code}: {response.text[:300]}")
        return result
    served = response.headers.get("X-Model-Version")
    if served != str(version):
        result.problems.append(f"answered by version {served!r}, not the staged version {version!r}")
    predictions = response.json().get("predictions")
    if not isinstance(predictions, list) or len(predictions) != len(rows):
        count = len(predictions) if isinstance(predictions, list) else predictions
        result.problems.append(f"expected {len(rows)} predictions, got {count!r}")
        return result
    for index, prediction in enumerate(predictions):
        problem = _prediction_problem(spec, prediction)
        if problem:
            result.problems.append(f"row {index}: {problem}")
    return result


def deploy_version(
    *,
    registry: ModelRegistry,
    gateway: ServingTarget,
    audit: AuditStore,
    record: Recorder,
    spec: ModelSpec,
    version: str,
    files: dict[str, str],
    smoke_rows: pd.DataFrame,
) -> DeploymentResult:
    """Stage, smoke-test, record the promotion, promote. Safe to retry: a version that is already the
    recorded champion is only re-verified.

    The promotion record (the version and its files' hashes) is written before the ``champion`` alias
    moves: the gateway serves a version only when such a record authorises it.
    """
    model = spec.name
    now = datetime.now(UTC).isoformat()
    current = champion_record(audit, model)
    current_version = None if current is None else current.details.get(CHAMPION_FIELD)
    if current_version == str(version):
        # The alias may lag a crash between the record and the move: put it where the record says.
        registry.set_alias(model, Alias.CHAMPION, version)
        gateway.reload(model)
        verify_live(gateway, model, version)
        return DeploymentResult(
            model,
            str(version),
            current.details.get("previous_version") if current else None,
            SmokeTest(rows=0),
            now,
            already_live=True,
        )
    previous_version = current_version or None

    gateway.stage(model, version)
    check = smoke_test(gateway, spec, version, smoke_rows)
    if not check.passed:
        gateway.unstage(model)
        registry.set_version_tags(
            model,
            version,
            {Tag.DEPLOYMENT_STATUS: DeploymentStatus.SMOKE_TEST_FAILED, Tag.DEPLOYMENT_CHECKED_AT: now},
        )
        return DeploymentResult(model, str(version), previous_version, check, now)

    canary = spec.serving.canary.enabled and spec.serving.target == "local"  # a batch target splits nothing
    if current is not None and previous_version is not None and canary:
        # A champion serves: the new version earns its place on a share of the traffic first.
        from modelops.stages.canary import start_canary

        started = start_canary(
            registry=registry,
            gateway=gateway,
            audit=audit,
            record=record,
            spec=spec,
            version=str(version),
            files=files,
            champion=current,
            smoke_test={**asdict(check), "passed": True},
        )
        return DeploymentResult(model, str(version), previous_version, check, now, canary=started)

    record(
        AuditEntry(
            AuditAction.MODEL_DEPLOYED,
            model_subject(model, version),
            Decision.PROMOTED,
            details={
                CHAMPION_FIELD: str(version),
                "previous_version": previous_version,
                "smoke_test": {**asdict(check), "passed": True},
                **evidence_summary(files),
            },
            evidence={"artifacts": sha256_json(files), "smoke_test": sha256_json(asdict(check))},
        )
    )
    try:
        take_live(
            registry,
            gateway,
            audit,
            record,
            model,
            version,
            previous=current,
            now=now,
            why="passed the smoke test",
        )
    except DeploymentFailed:
        try:
            gateway.unstage(model)
        except DeploymentFailed:
            pass  # best effort: the recorded champion, not the staged slot, decides what serves
        raise
    gateway.unstage(model)
    return DeploymentResult(model, str(version), previous_version, check, now)


def take_live(
    registry: ModelRegistry,
    gateway: ServingTarget,
    audit: AuditStore,
    record: Recorder,
    model: str,
    version: str,
    *,
    previous: AuditRecord | None,
    now: str,
    why: str,
) -> None:
    """After the promotion record of ``version``: move ``champion``, have the target serve it and tag the
    versions. If the target does not take it, the previous recorded champion is put back (on record) and
    ``DeploymentFailed`` raised; ``why`` says what the version passed (for that message)."""
    previous_version = None if previous is None else previous.details.get(CHAMPION_FIELD) or None
    registry.set_alias(model, Alias.CHAMPION, version)
    try:
        gateway.reload(model)
        verify_live(gateway, model, version)
    except DeploymentFailed as exc:
        rollback(
            registry,
            gateway,
            audit,
            record,
            model,
            failed_version=version,
            previous=previous,
            reason=f"the gateway did not take v{version} live: {exc}",
        )
        after = (
            f"rolled back to v{previous_version}"
            if previous_version
            else "withdrew the champion alias; nothing serves"
        )
        raise DeploymentFailed(
            f"{model} v{version} {why} but the gateway did not take it live ({exc}); {after}"
        ) from exc
    if previous_version is not None:
        registry.set_alias(model, Alias.PREVIOUS_CHAMPION, previous_version)
        registry.set_version_tags(
            model, previous_version, {Tag.SUPERSEDED_AT: now, Tag.SUPERSEDED_BY: version}
        )
    registry.set_version_tags(
        model,
        version,
        {
            Tag.DEPLOYMENT_STATUS: DeploymentStatus.LIVE,
            Tag.DEPLOYED_AT: now,
            Tag.PREVIOUS_CHAMPION: previous_version or "none",
        },
    )


def verify_live(gateway: ServingTarget, model: str, version: str) -> None:
    live = gateway.live_version(model)
    if live != str(version):
        raise DeploymentFailed(f"gateway reports {model} live version {live!r}, expected {version!r}")


def rollback(
    registry: ModelRegistry,
    gateway: ServingTarget,
    audit: AuditStore,
    record: Recorder,
    model: str,
    *,
    failed_version: str,
    previous: AuditRecord | None,
    reason: str,
) -> None:
    """Put the previous recorded champion back (or, with none, withdraw the alias so nothing unverified
    serves), recording the rollback first so the gateway accepts it."""
    previous_version = None if previous is None else previous.details.get(CHAMPION_FIELD)
    files = recorded_files(previous) if previous is not None and previous_version else {}
    record(
        AuditEntry(
            AuditAction.MODEL_ROLLED_BACK,
            model_subject(model, failed_version),
            Decision.ROLLED_BACK,
            details={
                CHAMPION_FIELD: previous_version,
                "failed_version": str(failed_version),
                "reason": reason[:2000],
                **(evidence_summary(files) if files else {}),
            },
            evidence={"artifacts": sha256_json(files)} if files else {},
        )
    )
    if previous_version is None:
        registry.delete_alias(model, Alias.CHAMPION)
    else:
        registry.set_alias(model, Alias.CHAMPION, previous_version)
    registry.set_version_tags(model, failed_version, {Tag.DEPLOYMENT_STATUS: DeploymentStatus.ROLLED_BACK})
    try:
        gateway.reload(model)
    except DeploymentFailed:
        # With no previous champion the gateway refuses the reload (nothing to serve), which is the
        # state wanted; anything still live after that is a real failure.
        if previous_version is not None or gateway.live_version(model) is not None:
            raise


def _refused(spec: ModelSpec, version: str, refusal: str, **facts: Any) -> StageOutcome:
    return StageOutcome(
        decision=Decision.REFUSED,
        summary=f"{spec.name} v{version} refused",
        details={"model_name": spec.name, "version": version},
        records=(
            AuditEntry(
                AuditAction.MODEL_DEPLOYED,
                model_subject(spec.name, version),
                Decision.REFUSED,
                details={"reason": refusal, **facts},
            ),
        ),
        refusal=refusal,
    )


def deploy(
    *,
    spec: ModelSpec,
    registry: ModelRegistry,
    gateway: ServingTarget,
    audit: AuditStore,
    record: Recorder,
    version: str | None,
) -> StageOutcome:
    """Deploy one approved version of ``spec`` to the gateway; refuse anything the gate did not approve.

    The authority is the gate's authentic audit record, never registry tags: the version's files are
    downloaded and hashed, and must be exactly those the gate approved. The smoke-test rows come from the
    validated dataset the gate's record names.
    """
    version = resolve_version(registry, spec.name, version, Alias.CHALLENGER)
    if not spec.serving.enabled:
        return _refused(
            spec,
            version,
            f"{spec.name} has serving.enabled: false in its model spec; enable it there to deploy to the gateway",
        )
    try:
        approval = gate_record(audit, spec.name, version)
        expired = approval_still_valid(approval)
        if expired:
            raise EvidenceMismatch(f"{spec.name} v{version}: {expired}")
        files, mlmodel = version_files_and_mlmodel(registry, spec.name, version)
        check_files(
            recorded_files(approval),
            files,
            what=f"{spec.name} v{version}'s model files are not those the compliance gate approved "
            f"(audit record seq={approval.seq}); someone changed them in the artifact store after the gate",
        )
    except EvidenceMismatch as exc:
        return _refused(spec, version, str(exc))
    # The MLmodel file is one of the approved files just checked: what it says of the environment holds.
    recorded = recorded_environment(mlmodel)
    serving = gateway.environment()
    where = "the scoring gateway" if spec.serving.target == "local" else f"the {spec.serving.target} target"
    refusals, environment_notes = compare_environments(recorded, serving, where=where)
    if refusals:
        return _refused(
            spec,
            version,
            f"{spec.name} v{version} does not match the serving environment: "
            + "; ".join(refusals)
            + ". Retrain it in the serving environment, or deploy a gateway image with the version it needs",
            recorded_environment=recorded,
            serving_environment=serving,
        )
    sha = approval.details.get(Tag.TRAIN_DATA_SHA256)
    validation = latest_passed_validation(audit, sha, dataset=spec.dataset) if sha else None
    if validation is None or not validation.details.get("snapshot_uri"):
        return _refused(
            spec,
            version,
            f"{spec.name} v{version}: the gate's record names no validated dataset snapshot to smoke-test "
            "it with; train it from validated data through modelops_training",
            gate_record_seq=approval.seq,
        )
    smoke_rows = read_dataset(
        validation.details["snapshot_uri"], columns=spec.features, nrows=spec.serving.smoke_rows
    )
    result = deploy_version(
        registry=registry,
        gateway=gateway,
        audit=audit,
        record=record,
        spec=spec,
        version=version,
        files=files,
        smoke_rows=smoke_rows,
    )
    passed = result.smoke_test.passed
    decided = Decision.SMOKE_TEST_FAILED
    if passed:
        decided = Decision.CANARY_STARTED if result.canary else Decision.DEPLOYED
    outcome_record = AuditEntry(
        AuditAction.MODEL_DEPLOYED,
        model_subject(spec.name, version),
        decided,
        details={
            **result.to_dict(),
            "gate_record_seq": approval.seq,
            "environment": recorded,
            "environment_notes": environment_notes,
        },
        evidence={
            "smoke_test": sha256_json(asdict(result.smoke_test)),
            "artifacts": sha256_json(files),
            **dataset_evidence(sha),
        },
    )
    serving_url = gateway.invocations_url(spec.name)
    details = {**result.to_dict(), "serving_url": serving_url, "environment_notes": environment_notes}
    if not passed:
        problems = "\n".join(f"  - {p}" for p in result.smoke_test.problems)
        return StageOutcome(
            decision=Decision.SMOKE_TEST_FAILED,
            summary=f"{spec.name} v{version} failed its smoke test",
            details=details,
            records=(outcome_record,),
            # Deterministic for the same version and data: a retry would fail the same way.
            refusal=f"{spec.name} v{version} failed its smoke test; "
            f"v{result.previous_version} keeps serving:\n{problems}",
        )
    previous = f"v{result.previous_version}" if result.previous_version else "none"
    extra = {
        EventField.MODEL_NAME: spec.name,
        EventField.VERSION: version,
        "previous_version": result.previous_version,
    }
    if result.canary:
        share = float(result.canary["challenger_share"])
        return StageOutcome(
            decision=Decision.CANARY_STARTED,
            summary=f"{spec.name} v{version} is the canary: {share:.0%} of callers at {serving_url}, v"
            f"{result.previous_version} answers the rest; soak until {result.canary['soak_until']}",
            details=details,
            records=(outcome_record,),
            asset_extra={**extra, "challenger_share": share},
        )
    return StageOutcome(
        decision=Decision.DEPLOYED,
        summary=f"{spec.name} v{version} is champion at {serving_url} (previous: {previous}); "
        f"smoke test {result.smoke_test.rows} rows in {result.smoke_test.latency_ms} ms",
        details=details,
        records=(outcome_record,),
        asset_extra=extra,
    )


def roll_back_to_previous(
    *,
    model: str,
    registry: ModelRegistry,
    gateway: ServingTarget,
    audit: AuditStore,
    record: Recorder,
    reason: str,
) -> StageOutcome:
    """Put the champion before the recorded one back (monitoring's critical verdict, a manual rollback).

    Through the deployment path's checks: the version going back must have an authentic promotion record
    and files unchanged since; the rollback is recorded before the alias moves, so the gateway accepts it.
    Nothing to go back to (or files changed since) is a refusal, on record.
    """
    current = champion_record(audit, model)
    serving = None if current is None else str(current.details.get(CHAMPION_FIELD) or "") or None
    subject = model_subject(model, serving)
    previous_version = current.details.get("previous_version") if current is not None else None
    previous = None
    if previous_version:
        previous, _ = newest_authentic(
            audit, AuditAction.MODEL_DEPLOYED, model_subject(model, previous_version), {Decision.PROMOTED}
        )
    problem = None
    if serving is None:
        problem = f"{model} has no recorded champion: nothing serves, so there is nothing to roll back"
    elif previous is None:
        problem = f"{model} has no earlier approved champion to go back to; retraining is the way out"
    else:
        try:
            check_files(
                recorded_files(previous),
                version_file_hashes(registry, model, str(previous_version)),
                what=f"v{previous_version}'s files differ from those its promotion record names",
            )
        except EvidenceMismatch as exc:
            problem = str(exc)
    if problem is not None:
        return StageOutcome(
            decision=Decision.REFUSED,
            summary=f"{model}: no rollback: {problem}",
            details={"model_name": model, "version": serving, "reason": problem},
            records=(
                AuditEntry(
                    AuditAction.MODEL_ROLLED_BACK, subject, Decision.REFUSED, details={"reason": problem}
                ),
            ),
        )
    rollback(
        registry, gateway, audit, record, model, failed_version=serving, previous=previous, reason=reason
    )
    verify_live(gateway, model, str(previous_version))
    return StageOutcome(
        decision=Decision.ROLLED_BACK,
        summary=f"{model}: rolled back from v{serving} to v{previous_version} ({reason})",
        details={
            "model_name": model,
            "version": serving,
            CHAMPION_FIELD: str(previous_version),
            "reason": reason,
        },
    )
