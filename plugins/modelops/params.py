"""Typed trigger-form params the stage DAGs share: a model drop-down filled from the model specs.

Params reach tasks as their JSON types (the DAGs render templates as native objects): lists, integers,
booleans and ``None`` for "not given", never an empty-string sentinel.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param

from modelops.settings import dataset_names, model_names


def model_param(description: str) -> Param:
    """One model, picked from a drop-down of the known specs (the first is the default)."""
    names = model_names()
    schema: dict[str, Any] = {"type": "string", "title": "Model", "description": description}
    if names:
        schema["enum"] = names
    return Param(names[0] if names else None, **schema)


def _multi_select(names: list[str], title: str, description: str) -> Param:
    # An array param with ``examples`` is a multi-select in the trigger form; ``items.enum`` validates it.
    return Param(
        [],
        type="array",
        items={"type": "string", "enum": names} if names else {"type": "string"},
        examples=names,
        title=title,
        description=description,
    )


def models_param(description: str) -> Param:
    """Any number of models, picked from the known specs; an empty list means every model."""
    return _multi_select(model_names(), "Models", description)


def datasets_param(description: str) -> Param:
    """Any number of datasets, picked from the known specs; an empty list means every dataset."""
    return _multi_select(dataset_names(), "Datasets", description)


def version_param(description: str) -> Param:
    return Param(None, type=["null", "integer"], minimum=1, title="Model version", description=description)


def optional_text_param(title: str, description: str, **schema: Any) -> Param:
    return Param(None, type=["null", "string"], title=title, description=description, **schema)
