"""Stage 4: deployment to the scoring gateway with a smoke test and automatic rollback.

The approved version is first *staged* in the gateway next to the live champion, smoke-tested through
HTTP (only requests that name its version reach it), and only then does the registry's ``champion``
alias move (``previous_champion`` keeps the old one for rollback) and the gateway reload. A failed
smoke test leaves the previous champion serving; a failed reload moves the alias back.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from modelops.errors import DeploymentFailed

if TYPE_CHECKING:
    import pandas as pd

    from modelops.hooks.gateway import GatewayHook
    from modelops.hooks.registry import MlflowRegistryHook

CHAMPION_ALIAS = "champion"
PREVIOUS_CHAMPION_ALIAS = "previous_champion"


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


def smoke_test(gateway: GatewayHook, model: str, version: str, rows: pd.DataFrame) -> SmokeTest:
    """Score ``rows`` through HTTP on the staged version and check the answer is well formed."""
    result = SmokeTest(rows=len(rows))
    payload = {"dataframe_split": rows.to_dict(orient="split", index=False)}
    started = time.perf_counter()
    response = gateway.score(model, payload, version=version)
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
        probabilities = prediction if isinstance(prediction, list) else [prediction]
        if not all(isinstance(p, int | float) and 0.0 <= p <= 1.0 for p in probabilities):
            result.problems.append(f"row {index}: {prediction!r} is not a probability")
        elif len(probabilities) > 1 and not math.isclose(sum(probabilities), 1.0, abs_tol=1e-6):
            result.problems.append(f"row {index}: class probabilities {prediction!r} do not sum to 1")
    return result


def deploy_version(
    *,
    registry: MlflowRegistryHook,
    gateway: GatewayHook,
    model: str,
    version: str,
    smoke_rows: pd.DataFrame,
) -> DeploymentResult:
    """Stage, smoke-test, promote. Safe to retry: a version that is already champion is only re-verified."""
    now = datetime.now(UTC).isoformat()
    current = registry.version_by_alias(model, CHAMPION_ALIAS)
    if current is not None and str(current.version) == str(version):
        gateway.reload(model)
        _verify_live(gateway, model, version)
        previous = registry.version_by_alias(model, PREVIOUS_CHAMPION_ALIAS)
        return DeploymentResult(
            model,
            str(version),
            str(previous.version) if previous else None,
            SmokeTest(rows=0),
            now,
            already_live=True,
        )
    previous_version = str(current.version) if current is not None else None

    gateway.stage(model, version)
    check = smoke_test(gateway, model, version, smoke_rows)
    if not check.passed:
        gateway.unstage(model)
        registry.set_tags(
            model, version, {"deployment_status": "smoke_test_failed", "deployment_checked_at": now}
        )
        return DeploymentResult(model, str(version), previous_version, check, now)

    registry.client.set_registered_model_alias(model, CHAMPION_ALIAS, version)
    try:
        gateway.reload(model)
        _verify_live(gateway, model, version)
    except DeploymentFailed as exc:
        rollback(registry, gateway, model, failed_version=version, previous_version=previous_version)
        raise DeploymentFailed(
            f"{model} v{version} passed the smoke test but the gateway did not take it live ({exc}); "
            f"rolled back to v{previous_version}"
        ) from exc
    gateway.unstage(model)
    if previous_version is not None:
        registry.client.set_registered_model_alias(model, PREVIOUS_CHAMPION_ALIAS, previous_version)
        registry.set_tags(model, previous_version, {"superseded_at": now, "superseded_by": version})
    registry.set_tags(
        model,
        version,
        {"deployment_status": "live", "deployed_at": now, "previous_champion": previous_version or "none"},
    )
    return DeploymentResult(model, str(version), previous_version, check, now)


def _verify_live(gateway: GatewayHook, model: str, version: str) -> None:
    live = gateway.status().get("models", {}).get(model, {}).get("live_version")
    if str(live) != str(version):
        raise DeploymentFailed(f"gateway reports {model} live version {live!r}, expected {version!r}")


def rollback(
    registry: MlflowRegistryHook,
    gateway: GatewayHook,
    model: str,
    *,
    failed_version: str,
    previous_version: str | None,
) -> None:
    """Put the previous champion back (or, with none, withdraw the alias so nothing unverified serves)."""
    if previous_version is None:
        registry.client.delete_registered_model_alias(model, CHAMPION_ALIAS)
    else:
        registry.client.set_registered_model_alias(model, CHAMPION_ALIAS, previous_version)
    registry.set_tags(model, failed_version, {"deployment_status": "rolled_back"})
    gateway.reload(model)
