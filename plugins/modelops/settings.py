"""Settings as data: every threshold, policy, suite and model spec lives in a file under ``include/``.

Each file is loaded through a typed pydantic model with ``extra="forbid"``, so a misspelt or unknown
field is an error, and every error names the file, the field and what was expected. Values may refer to
environment variables as ``${VAR}`` or ``${VAR:-default}`` (defaults may nest), which is how one file
serves the embedded default (a local folder) and production (``s3://...``) alike.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelops.errors import SettingsError

PROJECT_ROOT = Path(__file__).resolve().parents[2]

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^${}]*))?\}")


def include_dir() -> Path:
    """Where settings files live: ``$MODELOPS_INCLUDE_DIR``, else the project's ``include/``."""
    return Path(os.environ.get("MODELOPS_INCLUDE_DIR", PROJECT_ROOT / "include"))


def modelops_home() -> Path:
    """Root of the runtime state (databases, storage): ``$MODELOPS_HOME``, else ``<project>/.modelops``."""
    return Path(os.environ.get("MODELOPS_HOME", PROJECT_ROOT / ".modelops"))


def expand_env(text: str, env: Mapping[str, str] | None = None) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``, innermost first, so defaults may hold references.

    ``MODELOPS_HOME`` always resolves (to :func:`modelops_home`) so files can build on it. An unset
    variable without a default is an error rather than an empty string: a silently empty path would
    write state somewhere nobody looks.
    """
    values = {"MODELOPS_HOME": str(modelops_home()), **(env if env is not None else os.environ)}

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in values and values[name] != "":
            return values[name]
        if default is not None:
            return default
        raise SettingsError(
            f"environment variable ${{{name}}} is not set and has no default; "
            f"set it or write ${{{name}:-default}}"
        )

    previous = None
    while previous != text:
        previous, text = text, _ENV_REF.sub(substitute, text)
    return text


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- platform -------------------------------------------------------------------------------------


class PlatformSettings(StrictModel):
    """``include/modelops.yaml``: where state lives and what the platform serves."""

    storage_root: str = Field(
        description="Root URI for snapshots and archives: a local path, file:// or s3://"
    )
    storage_conn_id: str | None = Field(
        default=None, description="Airflow connection for the storage root's filesystem (s3://)"
    )
    experiment_name: str = "modelops"
    served_model: str = Field(description="Registered model name the gateway answers at /invocations")
    dataset: str = Field(description="Name of the dataset spec the lifecycle trains on (include/datasets/)")
    model: str = Field(description="Name of the model spec (include/models/)")


# --- datasets ------------------------------------------------------------------------------------


class PiiPattern(StrictModel):
    name: str
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value


class DatasetSpec(StrictModel):
    """``include/datasets/<name>.yaml``: one governed dataset."""

    name: str
    description: str = ""
    incoming_uri: str = Field(description="Where new versions of the dataset are dropped")
    expectation_suite: str = Field(description="GX suite file, relative to include/expectations/")
    pii_patterns: list[PiiPattern] = Field(default_factory=list)
    pii_sample_rows: int = Field(default=10_000, gt=0)


# --- models --------------------------------------------------------------------------------------


class EstimatorSpec(StrictModel):
    class_path: str = Field(description="Import path of a scikit-learn classifier")
    params: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(StrictModel):
    """``include/models/<name>.yaml``: what to train and how."""

    name: str = Field(description="Registered model name in MLflow")
    description: str = ""
    dataset: str
    target: str
    numeric_features: list[str]
    categorical_features: list[str] = Field(default_factory=list)
    estimator: EstimatorSpec
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    random_seed: int = 42
    skops_trusted_types: list[str] = Field(
        default_factory=list,
        description="Types reviewed as safe to load from the skops file; anything else fails training",
    )

    @property
    def features(self) -> list[str]:
        return [*self.numeric_features, *self.categorical_features]

    @model_validator(mode="after")
    def _target_not_a_feature(self) -> ModelSpec:
        if self.target in self.features:
            raise ValueError(f"target {self.target!r} is also listed as a feature")
        return self


# --- policies ------------------------------------------------------------------------------------


class MetricThreshold(StrictModel):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _has_bound(self) -> MetricThreshold:
        if self.min is None and self.max is None:
            raise ValueError("give at least one of min, max")
        return self


class CompliancePolicy(StrictModel):
    """``include/policies/compliance.yaml``: what a version needs to be approved."""

    name: str
    version: str
    required_tags: list[str]
    metric_thresholds: dict[str, MetricThreshold]
    require_validated_dataset: bool = True


class MonitoringPolicy(StrictModel):
    """``include/policies/monitoring.yaml``: when drift is a warning and when it is critical."""

    min_rows: int = Field(gt=0, description="Fewer rows in the window gives insufficient_data")
    drift_share_warning: float = Field(gt=0, le=1)
    drift_share_critical: float = Field(gt=0, le=1)
    out_of_range_share_critical: float = Field(
        gt=0, le=1, description="Share of rows with a numeric value outside the training range"
    )
    reference_sample_rows: int = Field(default=5000, gt=0)
    numerical_method: str = Field(
        default="wasserstein", description="Evidently stat test for numeric features"
    )
    numerical_threshold: float = Field(default=0.25, gt=0)
    categorical_method: str = Field(default="jensenshannon", description="Evidently stat test for categories")
    categorical_threshold: float = Field(default=0.1, gt=0)
    request_retraining_on: list[Literal["warning", "critical"]] = Field(default_factory=lambda: ["critical"])

    @model_validator(mode="after")
    def _ordered(self) -> MonitoringPolicy:
        if self.drift_share_warning > self.drift_share_critical:
            raise ValueError("drift_share_warning must not exceed drift_share_critical")
        return self


class RetirementPolicy(StrictModel):
    """``include/policies/retirement.yaml``: which versions leave service."""

    superseded_for_days: int = Field(ge=0)
    archive_subdir: str = "archive"


# --- loading -------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def _describe(error: Mapping[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"field '{where}': unknown field (remove it or check its spelling)"
    if error["type"] == "missing":
        return f"field '{where}': required field is missing"
    return f"field '{where}': {error['msg']} (got {error.get('input')!r})"


def load_model_file(path: Path, model: type[M], *, expand: bool = True) -> M:
    """Read a YAML or JSON file into ``model``; every problem is reported with the file and field."""
    if not path.is_file():
        raise SettingsError(f"{path}: settings file not found")
    text = path.read_text()
    if expand:
        text = expand_env(text)
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SettingsError(f"{path}: not valid {path.suffix.lstrip('.').upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(
            f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise SettingsError(f"{path}: invalid {model.__name__}: {problems}") from exc


def _load(relative: str, model: type[M]) -> M:
    # Not cached: files are tiny, and a cache would go stale when the file or the environment changes.
    return load_model_file(include_dir() / relative, model)


def platform_settings() -> PlatformSettings:
    return _load("modelops.yaml", PlatformSettings)


def dataset_spec(name: str | None = None) -> DatasetSpec:
    return _load(f"datasets/{name or platform_settings().dataset}.yaml", DatasetSpec)


def model_spec(name: str | None = None) -> ModelSpec:
    return _load(f"models/{name or platform_settings().model}.yaml", ModelSpec)


def compliance_policy() -> CompliancePolicy:
    return _load("policies/compliance.yaml", CompliancePolicy)


def monitoring_policy() -> MonitoringPolicy:
    return _load("policies/monitoring.yaml", MonitoringPolicy)


def retirement_policy() -> RetirementPolicy:
    return _load("policies/retirement.yaml", RetirementPolicy)


def expectation_suite_path(spec: DatasetSpec) -> Path:
    return include_dir() / "expectations" / spec.expectation_suite
