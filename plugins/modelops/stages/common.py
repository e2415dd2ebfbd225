"""Helpers the version stages share: which model versions a run acts on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelops.errors import GateFailed
from modelops.settings import Catalog
from modelops.vocabulary import Alias, EventField

if TYPE_CHECKING:
    from modelops.registry import ModelRegistry


def resolve_version(registry: ModelRegistry, name: str, version: str | int | None, alias: Alias) -> str:
    """The version a stage acts on: the one given, else the one ``alias`` points at."""
    if version not in (None, ""):
        return str(version)
    found = registry.version_by_alias(name, alias)
    if found is None:
        raise GateFailed(
            f"model {name!r} has no version with alias {str(alias)!r}; give model_version explicitly"
        )
    return found.version


def plan_versions(
    *,
    catalog: Catalog,
    events: list[dict[str, Any]],
    model: str | None,
    model_version: int | str | None,
    serving_only: bool = False,
    pending: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One entry per model a version-stage (gate, deployment) acts on: ``{"model", "model_version"}``.

    ``pending`` (model -> version): versions the record says are still to act on, added to an
    event-triggered run whatever its events (see :func:`modelops.stages.deployment.undeployed_approvals`).

    From the triggering events, the newest version per model a spec declares (an event of an unknown
    model, or with a version that is not a number, is ignored; with ``serving_only``, so is a model whose
    spec disables serving); with no event (a manual run), the form's model and version (None: its alias),
    which the stage then accepts or refuses on the record.
    """
    newest: dict[str, str] = {}
    for event in events:
        name, version = event.get(EventField.MODEL_NAME), str(event.get(EventField.VERSION, ""))
        if name not in catalog.models or not version.isdigit():
            continue
        if serving_only and not catalog.models[name].serving.enabled:
            continue
        if name not in newest or int(version) > int(newest[name]):
            newest[name] = version
    if events:
        for name, version in (pending or {}).items():
            if name in catalog.models and (name not in newest or int(version) > int(newest[name])):
                newest[name] = version
        return [{"model": name, "model_version": newest[name]} for name in sorted(newest)]
    if not model:
        raise GateFailed("a manual run needs a model: pick one in the trigger form")
    catalog.model(model)
    return [{"model": model, "model_version": None if model_version in (None, "") else str(model_version)}]
