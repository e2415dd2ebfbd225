"""What each stage DAG's first task calls: which models (or files) this run concerns.

Each function reads the run's triggering Asset events and trigger-form params, calls the stage's plan
function and returns a JSON-safe list, one entry per mapped task instance (``expand_kwargs``). A plan
that cannot be made from the inputs (an unknown model, a settings error) fails the task without retry.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowFailException

from modelops.errors import ModelOpsError
from modelops.hooks.audit import AuditHook
from modelops.hooks.registry import MlflowRegistryHook

if TYPE_CHECKING:
    from airflow.sdk import Context

    from modelops.settings import Catalog


def triggering_extras(context: Context, asset: Asset) -> list[dict[str, Any]]:
    """The ``extra`` of each event of ``asset`` that triggered this run, oldest first (empty if none)."""
    events = context.get("triggering_asset_events") or {}
    found: list[dict[str, Any]] = []
    for triggered, asset_events in events.items():
        if getattr(triggered, "name", None) == asset.name:
            found.extend(dict(event.extra or {}) for event in asset_events)
    return found


def _planned(make: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    try:
        plan = make()
    except ModelOpsError as exc:
        # The same inputs would give the same error: fail without a retry, naming the problem.
        raise AirflowFailException(str(exc)) from exc
    return json.loads(json.dumps(plan, default=str))


def _catalog() -> Catalog:
    from modelops.settings import load_catalog

    return load_catalog()


def validation_plan(*, datasets: list[str] | None, dataset_uri: str | None) -> list[dict[str, Any]]:
    from modelops.stages.validation import plan_validation

    return _planned(
        lambda: plan_validation(
            catalog=_catalog(),
            audit=AuditHook().get_conn(),
            datasets=list(datasets or []),
            dataset_uri=dataset_uri or None,
        )
    )


def training_plan(context: Context, *, model: str | None, dataset_sha256: str | None) -> list[dict[str, Any]]:
    from modelops.assets import RETRAINING_REQUEST, VALIDATED_DATASET
    from modelops.stages.training import plan_training

    return _planned(
        lambda: plan_training(
            catalog=_catalog(),
            dataset_events=triggering_extras(context, VALIDATED_DATASET),
            retraining_events=triggering_extras(context, RETRAINING_REQUEST),
            model=model or None,
            dataset_sha256=dataset_sha256 or None,
        )
    )


def version_plan(
    context: Context, *, asset: Asset, model: str | None, model_version: int | str | None
) -> list[dict[str, Any]]:
    from modelops.stages.common import plan_versions

    return _planned(
        lambda: plan_versions(
            catalog=_catalog(),
            events=triggering_extras(context, asset),
            model=model or None,
            model_version=model_version,
        )
    )


def monitoring_plan(*, models: list[str] | None) -> list[dict[str, Any]]:
    from modelops.stages.monitoring import plan_monitoring

    return _planned(
        lambda: plan_monitoring(
            catalog=_catalog(), registry=MlflowRegistryHook().get_conn(), models=list(models or [])
        )
    )


def retirement_plan(
    *, models: list[str] | None, versions: list[int] | None, reason: str | None, dry_run: bool
) -> list[dict[str, Any]]:
    from modelops.stages.retirement import plan_retirement

    return _planned(
        lambda: plan_retirement(
            catalog=_catalog(),
            registry=MlflowRegistryHook().get_conn(),
            models=list(models or []),
            versions=list(versions or []),
            reason=reason or None,
            dry_run=bool(dry_run),
        )
    )
