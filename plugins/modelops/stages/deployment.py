"""Stage 4: deployment to the scoring gateway with a smoke test and automatic rollback.

Only a version the compliance gate approved deploys. It is first *staged* in the gateway next to the
live champion, smoke-tested through HTTP with rows of its own training data (only requests that name its
version reach it), and only then does the registry's ``champion`` alias move (``previous_champion``
keeps the old one for rollback) and the gateway reload. A failed smoke test leaves the previous champion
serving; a failed reload moves the alias back.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from modelops.errors import DeploymentFailed
from modelops.settings import ModelSpec
from modelops.stages.common import resolve_version
from modelops.stages.outcome import AuditEntry, StageOutcome, dataset_evidence, sha256_json
from modelops.storage import read_dataset
from modelops.vocabulary import (
    SMOKE_TEST_CALLER,
    Alias,
    AuditAction,
    ComplianceStatus,
    Decision,
    DeploymentStatus,
    EventField,
    Tag,
    model_subject,
)

if TYPE_CHECKING:
    import pandas as pd

    from modelops.registry import ModelRegistry
    from modelops.serving.client import GatewayClient


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

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "smoke_test": {**asdict(self.smoke_test), "passed": self.smoke_test.passed}}


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


def smoke_test(gateway: GatewayClient, spec: ModelSpec, version: str, rows: pd.DataFrame) -> SmokeTest:
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
    gateway: GatewayClient,
    spec: ModelSpec,
    version: str,
    smoke_rows: pd.DataFrame,
) -> DeploymentResult:
    """Stage, smoke-test, promote. Safe to retry: a version that is already champion is only re-verified."""
    model = spec.name
    now = datetime.now(UTC).isoformat()
    current = registry.version_by_alias(model, Alias.CHAMPION)
    if current is not None and current.version == str(version):
        gateway.reload(model)
        _verify_live(gateway, model, version)
        previous = registry.version_by_alias(model, Alias.PREVIOUS_CHAMPION)
        return DeploymentResult(
            model,
            str(version),
            previous.version if previous else None,
            SmokeTest(rows=0),
            now,
            already_live=True,
        )
    previous_version = current.version if current is not None else None

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

    registry.set_alias(model, Alias.CHAMPION, version)
    try:
        gateway.reload(model)
        _verify_live(gateway, model, version)
    except DeploymentFailed as exc:
        rollback(registry, gateway, model, failed_version=version, previous_version=previous_version)
        try:
            gateway.unstage(model)
        except DeploymentFailed:
            pass  # best effort: the alias, not the staged slot, decides what serves
        after = (
            f"rolled back to v{previous_version}"
            if previous_version
            else "withdrew the champion alias; nothing serves"
        )
        raise DeploymentFailed(
            f"{model} v{version} passed the smoke test but the gateway did not take it live ({exc}); {after}"
        ) from exc
    gateway.unstage(model)
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
    return DeploymentResult(model, str(version), previous_version, check, now)


def _verify_live(gateway: GatewayClient, model: str, version: str) -> None:
    live = gateway.live_version(model)
    if live != str(version):
        raise DeploymentFailed(f"gateway reports {model} live version {live!r}, expected {version!r}")


def rollback(
    registry: ModelRegistry,
    gateway: GatewayClient,
    model: str,
    *,
    failed_version: str,
    previous_version: str | None,
) -> None:
    """Put the previous champion back (or, with none, withdraw the alias so nothing unverified serves)."""
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


def deploy(
    *, spec: ModelSpec, registry: ModelRegistry, gateway: GatewayClient, version: str | None
) -> StageOutcome:
    """Deploy one approved version of ``spec`` to the gateway; refuse anything the gate did not approve."""
    version = resolve_version(registry, spec.name, version, Alias.CHALLENGER)
    subject = model_subject(spec.name, version)
    tags = registry.version(spec.name, version).tags
    status = tags.get(Tag.COMPLIANCE_STATUS)
    refusal = None
    if not spec.serving.enabled:
        refusal = f"{spec.name} has serving.enabled: false in its model spec; enable it there to deploy to the gateway"
    elif status != ComplianceStatus.APPROVED:
        refusal = (
            f"{spec.name} v{version} has compliance_status={status!r}; only versions approved by the "
            "compliance gate deploy. Run modelops_compliance_gate on it first."
        )
    elif not tags.get(Tag.TRAIN_DATA_URI):
        refusal = (
            f"{spec.name} v{version} has no {Tag.TRAIN_DATA_URI} lineage tag, so there is no training data "
            "to smoke-test it with and nothing traces it to validated data; register it through training"
        )
    if refusal is not None:
        return StageOutcome(
            decision=Decision.REFUSED,
            summary=f"{spec.name} v{version} refused",
            details={"model_name": spec.name, "version": version},
            records=(
                AuditEntry(
                    AuditAction.MODEL_DEPLOYED,
                    subject,
                    Decision.REFUSED,
                    details={"reason": refusal, Tag.COMPLIANCE_STATUS: status},
                ),
            ),
            refusal=refusal,
        )
    smoke_rows = read_dataset(tags[Tag.TRAIN_DATA_URI], columns=spec.features, nrows=spec.serving.smoke_rows)
    result = deploy_version(
        registry=registry, gateway=gateway, spec=spec, version=version, smoke_rows=smoke_rows
    )
    passed = result.smoke_test.passed
    record = AuditEntry(
        AuditAction.MODEL_DEPLOYED,
        subject,
        Decision.DEPLOYED if passed else Decision.SMOKE_TEST_FAILED,
        details=result.to_dict(),
        evidence={
            "smoke_test": sha256_json(asdict(result.smoke_test)),
            **dataset_evidence(tags.get(Tag.TRAIN_DATA_SHA256)),
        },
    )
    serving_url = gateway.invocations_url(spec.name)
    details = {**result.to_dict(), "serving_url": serving_url}
    if not passed:
        problems = "\n".join(f"  - {p}" for p in result.smoke_test.problems)
        return StageOutcome(
            decision=Decision.SMOKE_TEST_FAILED,
            summary=f"{spec.name} v{version} failed its smoke test",
            details=details,
            records=(record,),
            # Deterministic for the same version and data: a retry would fail the same way.
            refusal=f"{spec.name} v{version} failed its smoke test; "
            f"v{result.previous_version} keeps serving:\n{problems}",
        )
    previous = f"v{result.previous_version}" if result.previous_version else "none"
    return StageOutcome(
        decision=Decision.DEPLOYED,
        summary=f"{spec.name} v{version} is champion at {serving_url} (previous: {previous}); "
        f"smoke test {result.smoke_test.rows} rows in {result.smoke_test.latency_ms} ms",
        details=details,
        records=(record,),
        asset_extra={
            EventField.MODEL_NAME: spec.name,
            EventField.VERSION: version,
            "previous_version": result.previous_version,
        },
    )
