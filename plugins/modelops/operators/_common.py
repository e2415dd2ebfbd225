"""Small helpers the operators share."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from airflow.sdk import Asset, Context


def sha256_json(data: Any) -> str:
    """Hash of a JSON-safe object in canonical form: the evidence hash of a report or a policy."""
    return hashlib.sha256(
        json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()


def emit(context: Context, outlets: list[Any], extra: dict[str, Any]) -> None:
    """Attach ``extra`` to the Asset events this task emits on success."""
    for outlet in outlets:
        if isinstance(outlet, Asset):
            context["outlet_events"][outlet].extra = extra


def triggering_extras(context: Context, asset: Asset) -> list[dict[str, Any]]:
    """The ``extra`` of each event of ``asset`` that triggered this run, oldest first (empty if none)."""
    events = context.get("triggering_asset_events") or {}
    found: list[dict[str, Any]] = []
    for triggered, asset_events in events.items():
        if getattr(triggered, "name", None) == asset.name:
            found.extend(dict(event.extra or {}) for event in asset_events)
    return found
