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


def models_param(description: str) -> Param:
    """Any number of models, picked from the known specs; an empty list means every model."""
    names = model_names()
    return Param(
        [],
        type="array",
        items={"type": "string", "enum": names} if names else {"type": "string"},
        examples=names,
        title="Models",
        description=description,
    )


def datasets_param(description: str) -> Param:
    """Any number of datasets, picked from the known specs; an empty list means every dataset."""
    names = dataset_names()
    return Param(
        [],
        type="array",
        items={"type": "string", "enum": names} if names else {"type": "string"},
        examples=names,
        title="Datasets",
        description=description,
    )


def version_param(description: str) -> Param:
    return Param(None, type=["null", "integer"], minimum=1, title="Model version", description=description)


def optional_text_param(title: str, description: str, **schema: Any) -> Param:
    return Param(None, type=["null", "string"], title=title, description=description, **schema)
