"""Does a model version's recorded environment match the one that would serve it?

The version's environment is read from its own ``MLmodel`` file (MLflow writes the framework's version into
its flavor, the Python version into ``python_function`` and its own version at the top), a file whose hash
the compliance gate approved, so neither a registry tag nor a hand-edited file can claim another one. The
serving side reports what it has installed (the gateway's ``GET /admin/environment``). A different *major*
version of the framework or of MLflow refuses the deployment: the saved model may not load, or may load and
answer differently. Other differences (a minor version, the Python version) are reported, not refused.
Imports nothing of Airflow.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

PYTHON = "python"
MLFLOW = "mlflow"
FLAVOR_DISTRIBUTIONS: dict[str, tuple[str, str]] = {
    "sklearn": ("sklearn_version", "scikit-learn"),
    "xgboost": ("xgb_version", "xgboost"),
    "lightgbm": ("lgb_version", "lightgbm"),
    "catboost": ("catboost_version", "catboost"),
    "pytorch": ("pytorch_version", "torch"),
    "tensorflow": ("keras_version", "tensorflow"),
    "statsmodels": ("statsmodels_version", "statsmodels"),
}
"""MLflow flavor -> (the key of its ``MLmodel`` section naming the framework's version, its distribution)."""


def recorded_environment(mlmodel: Mapping[str, Any]) -> dict[str, str]:
    """``{distribution or "python": version}`` as a version's ``MLmodel`` records them."""
    from mlflow.pyfunc import FLAVOR_NAME, PY_VERSION  # MLflow's own names for the keys it writes

    found: dict[str, str] = {}
    flavors = mlmodel.get("flavors") or {}
    python = (flavors.get(FLAVOR_NAME) or {}).get(PY_VERSION)
    if python:
        found[PYTHON] = str(python)
    if mlmodel.get("mlflow_version"):
        found[MLFLOW] = str(mlmodel["mlflow_version"])
    for flavor, (key, distribution) in FLAVOR_DISTRIBUTIONS.items():
        section = flavors.get(flavor)
        if isinstance(section, Mapping) and section.get(key):
            found[distribution] = str(section[key])
    return found


def serving_environment() -> dict[str, str | None]:
    """This process's Python and the versions of MLflow and each framework (None: not installed)."""
    found: dict[str, str | None] = {PYTHON: platform.python_version()}
    for distribution in (MLFLOW, *(name for _key, name in FLAVOR_DISTRIBUTIONS.values())):
        try:
            found[distribution] = version(distribution)
        except PackageNotFoundError:
            found[distribution] = None
    return found


def _major(text: str) -> str:
    return text.split(".", 1)[0]


def compare_environments(
    recorded: Mapping[str, str], serving: Mapping[str, str | None], *, where: str
) -> tuple[list[str], list[str]]:
    """(refusals, notes): a framework or MLflow missing or of another major version refuses; a minor
    version or a Python difference is a note. ``where`` names the serving side in the messages."""
    refusals: list[str] = []
    notes: list[str] = []
    for name, trained in sorted(recorded.items()):
        served = serving.get(name)
        if name == PYTHON:
            if served and served.rsplit(".", 1)[0] != trained.rsplit(".", 1)[0]:
                notes.append(f"trained on Python {trained}, {where} runs Python {served}")
            continue
        if served is None:
            refusals.append(f"it was saved with {name} {trained}, which {where} does not have installed")
        elif _major(served) != _major(trained):
            refusals.append(
                f"it was saved with {name} {trained} and {where} runs {name} {served}: the major versions differ"
            )
        elif served != trained:
            notes.append(f"saved with {name} {trained}, {where} runs {name} {served}")
    return refusals, notes
