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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from modelops.errors import SettingsError, UnknownModel
from modelops.locations import is_within

PROJECT_ROOT = Path(__file__).resolve().parents[2]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
"""Model and dataset names: safe in a URL path, an MLflow name and a file name."""

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


def _without_blanks(roots: list[str]) -> list[str]:
    # An unset ${VAR:-} expands to "", which as a path would mean the working directory: drop it.
    return [root for root in roots if root.strip()]


Roots = Annotated[list[str], AfterValidator(_without_blanks)]
"""Folders (local paths, file:// or s3://) files may be read from."""


# --- platform -------------------------------------------------------------------------------------


class PlatformSettings(StrictModel):
    """``include/modelops.yaml``: where state lives and which model ``/invocations`` serves."""

    storage_root: str = Field(
        description="Root URI for snapshots and archives: a local path, file:// or s3://"
    )
    storage_conn_id: str | None = Field(
        default=None,
        description="Airflow connection for the storage root and every s3:// URI that names none (incoming folders, dataset and archive URIs)",
    )
    default_model: str = Field(
        description="The model the gateway answers at /invocations (MLflow's own scoring path)"
    )
    dataset_roots: Roots = Field(
        default_factory=list,
        description="Folders (local or s3://) any dataset file may be read from, besides the incoming folders",
    )
    prediction_log_retention_days: int = Field(
        default=365,
        ge=1,
        description="Days a sealed batch of the prediction log is kept after its newest call; then the batch "
        "is removed whole, on record (predictions.expired). One value for the whole log: a batch holds "
        "calls of every model. Audit records are never removed",
    )


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
    """``include/datasets/<file>.yaml``: one governed dataset."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    incoming_uri: str = Field(
        description="The folder new versions of the dataset are dropped in (a local path or s3://)"
    )
    file_pattern: str = Field(default="*.csv", description="Which files in incoming_uri are versions")
    expectation_suite: str = Field(description="GX suite file, relative to include/expectations/")
    pii_patterns: list[PiiPattern] = Field(default_factory=list)
    sensitive_columns: list[str] = Field(
        default_factory=list,
        description="Columns the data card marks sensitive: no model artifact may carry their values unless "
        "the model's compliance policy allows it",
    )
    allowed_roots: Roots = Field(
        default_factory=list,
        description="Folders besides incoming_uri this dataset's files may be read from (local or s3://)",
    )


# --- models --------------------------------------------------------------------------------------

TaskKind = Literal["binary_classification", "regression"]

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "binary_classification": (
        "holdout_roc_auc",
        "holdout_log_loss",
        "holdout_accuracy",
        "holdout_positive_rate",
        "holdout_rows",
    ),
    "regression": ("holdout_rmse", "holdout_mae", "holdout_r2", "holdout_target_mean", "holdout_rows"),
}
"""The holdout metrics training logs for each task kind; thresholds may name only these."""


class EstimatorSpec(StrictModel):
    class_path: str = Field(description="Import path of a scikit-learn estimator")
    params: dict[str, Any] = Field(default_factory=dict)


class MetricThreshold(StrictModel):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _has_bound(self) -> MetricThreshold:
        if self.min is None and self.max is None:
            raise ValueError("give at least one of min, max")
        return self


class PolicyChoice(StrictModel):
    """Per-model override of the policies its risk tier picks; blank fields follow the tier."""

    compliance: str | None = None
    monitoring: str | None = None
    retirement: str | None = None


class ScreeningSpec(StrictModel):
    """What the scoring gateway refuses before the model sees an input (``serving.screening``)."""

    max_body_bytes: int = Field(
        default=1_048_576, gt=0, le=256 * 1_048_576, description="Larger bodies get 413, unread"
    )
    max_rows: int = Field(default=10_000, gt=0, le=1_000_000, description="More rows per call get 413")
    max_json_depth: int = Field(
        default=16, ge=3, le=64, description="JSON nested deeper gets 400 (a table is 3 or 4 deep)"
    )
    out_of_range: Literal["refuse", "flag", "off"] = Field(
        default="flag",
        description="Numeric values outside the version's training range: 422, or scored with the columns "
        "named in X-Out-Of-Training-Range and the prediction log's flags",
    )
    extra_columns: Literal["refuse", "drop"] = Field(
        default="refuse", description="Columns the model's signature does not name: 400, or dropped"
    )
    non_finite: Literal["refuse", "allow"] = Field(
        default="refuse", description="NaN or Infinity in a numeric column: 422, or passed to the model"
    )
    pii: Literal["reject", "mask", "off"] = Field(
        default="reject",
        description="Text matching the dataset's PII patterns: 422; or scored with the logged copy "
        "masked; or not checked",
    )


class CanarySpec(StrictModel):
    """How a new version goes live next to a champion (``serving.canary``): a share of the callers first,
    then promoted or rolled back by comparing the two arms."""

    enabled: bool = Field(
        default=True, description="false: an approved version replaces the champion after its smoke test"
    )
    initial_share: float = Field(
        default=0.1, gt=0, lt=1, description="Share of callers (sticky per caller id) the challenger answers"
    )
    soak_minutes: float = Field(default=60, gt=0, description="How long both arms serve before comparing")
    max_soak_minutes: float = Field(
        default=240,
        gt=0,
        description="Arms with too few calls soak on until this; then the canary rolls back",
    )
    min_calls: int = Field(default=200, gt=0, description="Calls each arm needs before they are compared")
    max_error_rate_increase: float = Field(
        default=0.01, ge=0, le=1, description="Failed-call rate the challenger may have above the champion's"
    )
    max_latency_ratio: float = Field(
        default=1.5, ge=1, description="Challenger p95 latency over the champion's that still passes"
    )
    max_metric_drop: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Relative drop of a label metric (business metric, ROC AUC) against the champion's",
    )
    min_labelled_rows: int = Field(
        default=100, gt=0, description="Labelled rows each arm needs before its label metrics count"
    )
    min_z: float = Field(
        default=2.0,
        ge=0,
        description="A label metric counts as worse only this many standard errors below the champion's",
    )

    @model_validator(mode="after")
    def _soak_fits(self) -> CanarySpec:
        if self.max_soak_minutes < self.soak_minutes:
            raise ValueError(
                f"max_soak_minutes ({self.max_soak_minutes}) is shorter than soak_minutes ({self.soak_minutes})"
            )
        return self


# --- Kubernetes (serving target and training pods) ------------------------------------------------

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
"""A Kubernetes namespace or Secret name (RFC 1123 label)."""
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
_SECRET_LOOKING_ENV = re.compile(r"(PASSWORD|TOKEN|SECRET|_KEYS?$|^AIRFLOW_CONN_|_URL$)", re.IGNORECASE)
"""Environment variables that carry credentials by their name: only ever from a Kubernetes Secret."""

GATEWAY_SECRET_ENV = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MODELOPS_PREDICTIONS_URL",
    "MODELOPS_AUDIT_URL",
    "MODELOPS_AUDIT_KEYS",
    "MODELOPS_GATEWAY_ADMIN_TOKEN",
    "MODELOPS_GATEWAY_KEYS",
)
"""What the scoring gateway reads from the environment that is a credential (GatewayConfig.from_env)."""
TRAINING_SECRET_ENV = (
    "AIRFLOW_CONN_MLFLOW_DEFAULT",
    "AIRFLOW_CONN_MODELOPS_AUDIT",
    "AIRFLOW_CONN_MODELOPS_AUDIT_KEY",
    "AIRFLOW_CONN_MODELOPS_S3",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)
"""What the training entry point resolves that is a credential: the Airflow connections of the registry,
the audit log and its key, and storage, and the MLflow login (as docker-compose.yaml gives Airflow)."""
TRAINING_POD_ENV = {
    "MLFLOW_TRACKING_URI": "http://mlflow:5000",
    "MODELOPS_HOME": "/opt/airflow/modelops",
    "MODELOPS_STORAGE_ROOT": "s3://modelops/storage",
    "MODELOPS_STORAGE_CONN_ID": "modelops_s3",
    "MODELOPS_INCOMING_ROOT": "s3://modelops/incoming",
}
"""The plain settings docker-compose.yaml (and the Helm values) give Airflow's workers, for the pod."""


def _quantity(value: str) -> Any:
    # Kubernetes' own parser, so that what passes here is what the API server accepts ("500m", "1Gi").
    from kubernetes.utils.quantity import parse_quantity

    try:
        return parse_quantity(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 1Gi): {exc}") from exc


class ResourceAmounts(StrictModel):
    cpu: str = Field(description="CPU, a Kubernetes quantity: 500m, 2")
    memory: str = Field(description="Memory, a Kubernetes quantity: 512Mi, 2Gi")

    @field_validator("cpu", "memory")
    @classmethod
    def _is_quantity(cls, value: str) -> str:
        _quantity(value)
        return value


class KubernetesResources(StrictModel):
    """A container's requests (what the scheduler reserves, what CPU utilisation is measured against) and
    limits (where it is throttled or killed)."""

    requests: ResourceAmounts = Field(default_factory=lambda: ResourceAmounts(cpu="500m", memory="1Gi"))
    limits: ResourceAmounts = Field(default_factory=lambda: ResourceAmounts(cpu="2", memory="2Gi"))

    @model_validator(mode="after")
    def _limits_cover_requests(self) -> KubernetesResources:
        for kind in ("cpu", "memory"):
            request, limit = getattr(self.requests, kind), getattr(self.limits, kind)
            if _quantity(limit) < _quantity(request):
                raise ValueError(f"limits.{kind} ({limit}) is below requests.{kind} ({request})")
        return self


class KubernetesWorkload(StrictModel):
    """Where and as what a pod of ours runs: cluster connection, namespace, image, resources, secrets."""

    conn_id: str = Field(
        default="kubernetes_default",
        description="Airflow connection of the cluster (cncf-kubernetes: in_cluster, or kube_config)",
    )
    namespace: str = Field(default="modelops", pattern=DNS_LABEL_PATTERN)
    image: str = Field(min_length=1, description="The ModelOps image (Dockerfile), with a pinned tag")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    service_account: str | None = Field(default=None, pattern=DNS_LABEL_PATTERN)
    resources: KubernetesResources = Field(default_factory=KubernetesResources)
    secret_name: str = Field(
        pattern=DNS_LABEL_PATTERN, description="The Kubernetes Secret the credentials are read from"
    )
    secret_env: list[Annotated[str, Field(pattern=ENV_NAME_PATTERN)]] = Field(
        description="Environment variables set from the Secret's key of the same name (secretKeyRef)"
    )
    env: dict[Annotated[str, Field(pattern=ENV_NAME_PATTERN)], str] = Field(
        default_factory=dict, description="Plain environment variables: never a credential"
    )

    @model_validator(mode="after")
    def _no_literal_secrets(self) -> KubernetesWorkload:
        literal = sorted(name for name in self.env if _SECRET_LOOKING_ENV.search(name))
        if literal:
            raise ValueError(
                f"env sets {literal}, which carry credentials: put them in the Kubernetes Secret "
                f"{self.secret_name!r} and list them in secret_env instead of writing them here"
            )
        both = sorted(set(self.env) & set(self.secret_env))
        if both:
            raise ValueError(f"{both} are in both env and secret_env; keep each in one of them")
        return self


class KubernetesServingSpec(KubernetesWorkload):
    """``serving.kubernetes``: the model's own Deployment of the scoring gateway image, its Service and
    HorizontalPodAutoscaler (:mod:`modelops.serving.kubernetes`)."""

    secret_name: str = Field(default="modelops-gateway", pattern=DNS_LABEL_PATTERN)
    secret_env: list[Annotated[str, Field(pattern=ENV_NAME_PATTERN)]] = Field(
        default_factory=lambda: list(GATEWAY_SECRET_ENV)
    )
    env: dict[Annotated[str, Field(pattern=ENV_NAME_PATTERN)], str] = Field(
        default_factory=lambda: {"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
        description="Plain environment variables (MLFLOW_TRACKING_URI at least): never a credential",
    )
    min_replicas: int = Field(default=2, ge=1, le=100)
    max_replicas: int = Field(default=6, ge=1, le=100)
    target_cpu_utilization: int = Field(
        default=70, ge=1, le=100, description="Average CPU (% of requests) the autoscaler keeps pods at"
    )
    service_port: int = Field(default=80, ge=1, le=65535, description="The Service's port")
    gateway_url: str = Field(
        default="http://{service}.{namespace}.svc.cluster.local:{port}",
        description="How Airflow's workers reach a Service ({service}, {namespace}, {port}); the default is "
        "the cluster DNS name, for workers in the same cluster",
    )
    admin_token_conn_id: str = Field(
        default="modelops_gateway",
        description="Airflow connection whose password is the gateway admin token (the same value as the "
        "Secret's MODELOPS_GATEWAY_ADMIN_TOKEN)",
    )
    rollout_timeout_seconds: float = Field(
        default=600, gt=0, description="How long a rollout may take before the deployment fails"
    )

    @model_validator(mode="after")
    def _serving_consistent(self) -> KubernetesServingSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        if "MLFLOW_TRACKING_URI" not in {*self.env, *self.secret_env}:
            raise ValueError("the gateway needs MLFLOW_TRACKING_URI: set it in env or list it in secret_env")
        for name in ("{service}", "{namespace}", "{port}"):
            if name not in self.gateway_url:
                raise ValueError(f"gateway_url {self.gateway_url!r} lacks {name}")
        return self


class TrainingPodSpec(KubernetesWorkload):
    """``training.kubernetes``: the pod the training entry point runs in (KubernetesPodOperator)."""

    secret_name: str = Field(default="modelops-connections", pattern=DNS_LABEL_PATTERN)
    secret_env: list[Annotated[str, Field(pattern=ENV_NAME_PATTERN)]] = Field(
        default_factory=lambda: list(TRAINING_SECRET_ENV)
    )
    env: dict[Annotated[str, Field(pattern=ENV_NAME_PATTERN)], str] = Field(
        default_factory=lambda: dict(TRAINING_POD_ENV),
        description="Plain environment variables (the storage root and MLflow's address): never a credential",
    )
    startup_timeout_seconds: int = Field(default=600, gt=0, description="Pending longer than this fails")


class TrainingSpec(StrictModel):
    """``training``: where the training entry point runs."""

    runner: Literal["worker", "kubernetes"] = Field(
        default="worker",
        description="worker: in the Airflow worker (task train_and_register); kubernetes: in a pod of its "
        "own (task train_in_pod, KubernetesPodOperator), configured by training.kubernetes",
    )
    kubernetes: TrainingPodSpec | None = None

    @model_validator(mode="after")
    def _pod_configured(self) -> TrainingSpec:
        if self.runner == "kubernetes" and self.kubernetes is None:
            raise ValueError("runner is kubernetes: add training.kubernetes with at least image")
        return self


class ServingSpec(StrictModel):
    enabled: bool = Field(default=True, description="Deploy approved versions to the scoring gateway")
    target: Literal["local", "batch", "kubernetes"] = Field(
        default="local",
        description="local: the scoring gateway, online, with canaries; batch: scored by the "
        "modelops_batch_scoring DAG on Spark with the recorded champion; kubernetes: the gateway image as "
        "the model's own Deployment, Service and autoscaler (serving.kubernetes)",
    )
    smoke_rows: int = Field(
        default=20, gt=0, le=1000, description="Rows of training data scored before go-live"
    )
    allowed_teams: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None,
        description="Teams whose API keys may score this model and label its predictions; "
        "default: the spec's own team",
    )
    screening: ScreeningSpec = Field(default_factory=ScreeningSpec)
    canary: CanarySpec = Field(default_factory=CanarySpec)
    kubernetes: KubernetesServingSpec | None = Field(
        default=None, description="Where and how the kubernetes target runs the model (target: kubernetes)"
    )

    @model_validator(mode="after")
    def _target_configured(self) -> ServingSpec:
        if self.target == "kubernetes" and self.kubernetes is None:
            raise ValueError("target is kubernetes: add serving.kubernetes with at least image")
        return self


class ModelSpec(StrictModel):
    """``include/models/<file>.yaml``: one model, what it is for, who answers for it, how it is trained."""

    name: str = Field(pattern=NAME_PATTERN, description="Registered model name in MLflow")
    description: str = ""
    owner: str = Field(min_length=1, description="Who answers for the model (person or mailbox)")
    team: str = Field(min_length=1, description="The business owner: the team the model serves")
    department: str = Field(min_length=1)
    risk_tier: str = Field(description="A tier of include/policies/risk_tiers.yaml")
    compliance_labels: list[str] = Field(default_factory=list, description="e.g. GDPR, EU-AI-Act-limited")
    task: TaskKind
    dataset: str = Field(description="A dataset spec's name (include/datasets/)")
    target: str
    numeric_features: list[str]
    categorical_features: list[str] = Field(default_factory=list)
    estimator: EstimatorSpec
    metric_thresholds: dict[str, MetricThreshold] = Field(
        default_factory=dict, description="This model's own bounds, on top of its compliance policy's"
    )
    policies: PolicyChoice = Field(default_factory=PolicyChoice)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    experiment: str | None = Field(default=None, description="MLflow experiment; default modelops/<name>")
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    random_seed: int = 42
    skops_trusted_types: list[str] = Field(
        default_factory=list,
        description="Types reviewed as safe to load from the skops file; anything else fails training",
    )

    @property
    def features(self) -> list[str]:
        return [*self.numeric_features, *self.categorical_features]

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"modelops/{self.name}"

    @property
    def metrics(self) -> tuple[str, ...]:
        return TASK_METRICS[self.task]

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.target in self.features:
            raise ValueError(f"target {self.target!r} is also listed as a feature")
        if not self.features:
            raise ValueError("list at least one feature in numeric_features or categorical_features")
        unknown = sorted(set(self.metric_thresholds) - set(TASK_METRICS[self.task]))
        if unknown:
            raise ValueError(
                f"metric_thresholds names {unknown}, which a {self.task} model does not log; "
                f"use {list(TASK_METRICS[self.task])}"
            )
        return self


# --- policies ------------------------------------------------------------------------------------


class ApprovalPolicy(StrictModel):
    """Who must approve a version after its checks pass, and for how long an approval holds."""

    required: bool = Field(description="A named person approves in the Airflow UI; false auto-approves")
    approvers: list[str] = Field(
        default_factory=list,
        description="Airflow user names (ids) who may approve; nobody else's answer counts",
    )
    respond_within_hours: float = Field(
        default=72, gt=0, description="No answer in this time counts as a rejection"
    )
    valid_for_hours: float = Field(
        default=168, gt=0, description="An approval older than this no longer deploys; gate the version again"
    )

    @model_validator(mode="after")
    def _someone_may_approve(self) -> ApprovalPolicy:
        if self.required and not self.approvers:
            raise ValueError("approval.required is true but approval.approvers names nobody")
        return self


class CompliancePolicy(StrictModel):
    """``include/policies/compliance/<file>.yaml``: which checks a version must pass, and who approves it.

    ``checks`` maps the name of a registered check (:mod:`modelops.checks`) to its settings; a name that
    is no registered check, or settings the check does not take, fail on load naming it. Provenance (the
    version is the training stage's own, its files unchanged) is checked always, whatever the policy lists.
    """

    name: str = Field(pattern=NAME_PATTERN)
    version: str
    description: str = ""
    checks: dict[str, Any] = Field(description="Registered check name -> its settings (see modelops.checks)")
    approval: ApprovalPolicy

    @field_validator("checks", mode="before")
    @classmethod
    def _registered_checks(cls, value: Any) -> dict[str, Any]:
        # Imported here: the checks import these settings models, and loading a policy is what needs them.
        from modelops.checks import parse_check_settings

        if not isinstance(value, dict) or not value:
            raise ValueError("list at least one check, e.g. {tags: {...}, model_files: {}}")
        return parse_check_settings(value)

    def settings_of(self, check: str) -> Any:
        """The typed settings of one check, or None when the policy does not run it."""
        return self.checks.get(check)

    def describe(self) -> dict[str, Any]:
        """JSON-safe: what the policy says, for the evidence hash and the model card."""
        return {
            "name": self.name,
            "version": self.version,
            "checks": {name: settings.model_dump(mode="json") for name, settings in self.checks.items()},
            "approval": self.approval.model_dump(mode="json"),
        }


BusinessMetric = Literal["click_through_rate", "accuracy", "roc_auc", "rmse", "mae"]
BUSINESS_METRIC_TASKS: dict[str, str] = {
    "click_through_rate": "binary_classification",
    "accuracy": "binary_classification",
    "roc_auc": "binary_classification",
    "rmse": "regression",
    "mae": "regression",
}
"""Which task kind each business metric applies to."""


class BusinessMetricPolicy(StrictModel):
    """The business metric per window, from the labels delivered for its predictions (``POST /labels``)."""

    metric: dict[TaskKind, BusinessMetric] = Field(
        default_factory=lambda: {"binary_classification": "click_through_rate", "regression": "rmse"}
    )
    min_labelled_rows: int = Field(
        default=100, gt=0, description="Fewer labelled rows: the metric is pending, never a drop"
    )
    min_label_coverage: float = Field(
        default=0.5, gt=0, le=1, description="Share of the window's rows that must have labels"
    )
    drop_warning: float = Field(
        default=0.05, gt=0, description="Relative drop against the serving version's baseline that warns"
    )
    drop_critical: float = Field(
        default=0.05, gt=0, description="Relative drop that, together with critical drift, is critical"
    )
    min_z: float = Field(
        default=2.0,
        ge=0,
        description="For a rate (click-through, accuracy): a drop counts only this many standard errors "
        "below the baseline, so sampling noise in a small window is not a drop",
    )

    @model_validator(mode="after")
    def _metric_fits_task(self) -> BusinessMetricPolicy:
        for task, metric in self.metric.items():
            if BUSINESS_METRIC_TASKS[metric] != task:
                raise ValueError(f"metric.{task} is {metric!r}, a {BUSINESS_METRIC_TASKS[metric]} metric")
        return self


class ReferencePolicy(StrictModel):
    """What a version's windows are compared with once its cold start is over."""

    after_cold_start: Literal["training_data", "production_window"] = Field(
        default="training_data",
        description="training_data: always the version's training data; production_window: the version's "
        "own traffic of the last production_window_hours of its cold start (if usable; recorded either way)",
    )
    production_window_hours: float = Field(
        default=24,
        gt=0,
        description="Hours of traffic, ending when the cold start ends, that become the reference",
    )


class MonitoringPolicy(StrictModel):
    """``include/policies/monitoring/<file>.yaml``: when drift is a warning and when it is critical."""

    name: str = Field(pattern=NAME_PATTERN)
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
    prediction_threshold: float = Field(
        default=0.5,
        gt=0,
        description="Normed Wasserstein distance of the model's outputs from its outputs on the reference "
        "at which prediction drift warns",
    )
    request_retraining_on: list[Literal["warning", "critical"]] = Field(default_factory=lambda: ["critical"])
    html_report: bool = Field(
        default=True,
        description="Render Evidently's HTML report per window (1-2 s per model and hour for 7 features, "
        "~0.3 s per feature: plotly figures); the verdict never depends on it",
    )
    business: BusinessMetricPolicy = Field(
        default_factory=lambda: BusinessMetricPolicy(),
        description="The business metric computed from delayed labels, and the drop that counts",
    )
    critical_requires_business_drop: bool = Field(
        default=True,
        description="Critical needs drift together with a business-metric drop: drift alone never pages",
    )
    max_caller_share: float | None = Field(
        default=0.5,
        gt=0,
        le=1,
        description="No caller's rows carry more than this share of a window's weight; null: no cap",
    )
    min_callers_for_action: int = Field(
        default=2,
        ge=1,
        description="An automatic action (critical) needs the drop in this many callers' rows",
    )
    channels: list[Any] = Field(
        default_factory=lambda: [{"kind": "outbox"}],
        validate_default=True,
        description="Where alerts go (modelops.notifications.ChannelConfig): outbox, smtp, webhook",
    )
    alert_cooldown_hours: float = Field(
        default=6, ge=0, description="The same alert again within this time is not sent again (recorded)"
    )
    reassess_pending_hours: float = Field(
        default=24,
        ge=0,
        description="Each run re-assesses earlier windows of this many hours whose labels were pending and "
        "have arrived since",
    )
    cold_start_days: float = Field(
        default=7,
        ge=0,
        description="A version's first days in service: verdicts and alerts are recorded, not sent",
    )
    rollback_on_critical: bool = Field(
        default=True, description="A critical verdict puts the previous approved champion back"
    )
    reference: ReferencePolicy = Field(
        default_factory=lambda: ReferencePolicy(),
        description="What windows are compared with after the cold start (training data or production traffic)",
    )

    @field_validator("channels", mode="before")
    @classmethod
    def _channels(cls, value: Any) -> list[Any]:
        # Imported here: notifications builds on these settings models.
        from modelops.notifications import ChannelConfig

        if not isinstance(value, list):
            raise ValueError(
                "channels must be a list, e.g. [{kind: outbox}, {kind: smtp, conn_id: ..., to: [...]}]"
            )
        return [
            item if isinstance(item, ChannelConfig) else ChannelConfig.model_validate(item) for item in value
        ]

    @model_validator(mode="after")
    def _ordered(self) -> MonitoringPolicy:
        if self.drift_share_warning > self.drift_share_critical:
            raise ValueError("drift_share_warning must not exceed drift_share_critical")
        return self


class RetirementPolicy(StrictModel):
    """``include/policies/retirement/<file>.yaml``: which versions leave service."""

    name: str = Field(pattern=NAME_PATTERN)
    superseded_for_days: int = Field(ge=0)
    archive_subdir: str = "archive"


class TierPolicies(StrictModel):
    """The policies a risk tier governs its models by (names of files under include/policies/)."""

    compliance: str
    monitoring: str
    retirement: str


class RiskTiers(StrictModel):
    """``include/policies/risk_tiers.yaml``."""

    tiers: dict[str, TierPolicies]


@dataclass(frozen=True)
class ModelPolicies:
    """The three policies one model is governed by, after its risk tier and its own override."""

    compliance: CompliancePolicy
    monitoring: MonitoringPolicy
    retirement: RetirementPolicy


# --- loading -------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)
N = TypeVar("N", bound=BaseModel)


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


def _spec_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def _load_named(folder: Path, model: type[N], what: str) -> tuple[dict[str, N], dict[str, Path]]:
    """Every file in ``folder`` as ``model``, keyed by its ``name``; two files claiming one name fail."""
    found: dict[str, N] = {}
    sources: dict[str, Path] = {}
    for path in _spec_files(folder):
        item = load_model_file(path, model)
        if item.name in found:
            raise SettingsError(
                f"{path}: field 'name': {what} {item.name!r} is already declared in {sources[item.name]}; "
                "give one of them another name or remove it"
            )
        found[item.name] = item
        sources[item.name] = path
    return found, sources


def _declared_names(folder: Path) -> list[str]:
    """The ``name`` fields of the spec files in ``folder``, read cheaply (no validation) for DAG
    trigger-form drop-downs. A file that does not even parse is skipped here; the first task that loads
    the catalog reports it with its file and field."""
    names = []
    for path in _spec_files(folder):
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            names.append(data["name"])
    return sorted(set(names))


def model_names(root: Path | None = None) -> list[str]:
    """The names the model specs declare (see :func:`_declared_names`)."""
    return _declared_names((root or include_dir()) / "models")


def models_trained_in_pods(root: Path | None = None) -> list[str]:
    """The models whose spec says ``training.runner: kubernetes``, read cheaply (no validation), so the
    training DAG adds its pod task (and imports the Kubernetes provider, ~3 s) only where one is used."""
    names = []
    for path in _spec_files((root or include_dir()) / "models"):
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        training = data.get("training") if isinstance(data, dict) else None
        if isinstance(training, dict) and training.get("runner") == "kubernetes":
            names.append(str(data.get("name")))
    return sorted(names)


def dataset_names(root: Path | None = None) -> list[str]:
    """The names the dataset specs declare (see :func:`_declared_names`)."""
    return _declared_names((root or include_dir()) / "datasets")


@dataclass(frozen=True)
class Catalog:
    """Everything under ``include/``: the platform, every model, dataset and policy, cross-checked.

    Adding a model is adding files; :func:`load_catalog` refuses a catalog in which any reference
    (a model's dataset or risk tier, a tier's policy, a dataset's suite) points at nothing.
    """

    root: Path
    platform: PlatformSettings
    models: dict[str, ModelSpec]
    datasets: dict[str, DatasetSpec]
    compliance_policies: dict[str, CompliancePolicy]
    monitoring_policies: dict[str, MonitoringPolicy]
    retirement_policies: dict[str, RetirementPolicy]
    risk_tiers: dict[str, TierPolicies]
    sources: dict[str, Path] = field(default_factory=dict)
    """``"models/NAME"`` (or datasets/, compliance/...) -> the file that declared it."""

    def model(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(
                f"no model spec declares the model {name!r}; known models: {sorted(self.models)}. "
                f"Add include/models/{name}.yaml (see README, 'Add your own model') or pick a known one"
            ) from None

    def dataset(self, name: str) -> DatasetSpec:
        try:
            return self.datasets[name]
        except KeyError:
            raise SettingsError(
                f"no dataset spec declares the dataset {name!r}; known datasets: {sorted(self.datasets)}. "
                f"Add include/datasets/{name}.yaml or pick a known one"
            ) from None

    def models_for_dataset(self, dataset: str) -> list[ModelSpec]:
        """Every model whose spec trains on ``dataset``, by name."""
        return [spec for name, spec in sorted(self.models.items()) if spec.dataset == dataset]

    def policies_for(self, model: str | ModelSpec) -> ModelPolicies:
        spec = self.model(model) if isinstance(model, str) else model
        tier = self.risk_tiers[spec.risk_tier]
        return ModelPolicies(
            compliance=self.compliance_policies[spec.policies.compliance or tier.compliance],
            monitoring=self.monitoring_policies[spec.policies.monitoring or tier.monitoring],
            retirement=self.retirement_policies[spec.policies.retirement or tier.retirement],
        )

    def suite_path(self, dataset: str | DatasetSpec) -> Path:
        spec = self.dataset(dataset) if isinstance(dataset, str) else dataset
        return self.root / "expectations" / spec.expectation_suite

    def source_of(self, kind: str, name: str) -> Path:
        return self.sources[f"{kind}/{name}"]

    def dataset_for_location(self, uri: str) -> DatasetSpec:
        """The dataset whose incoming folder holds ``uri``; a file under no such folder is refused."""
        for spec in self.datasets.values():
            if is_within(uri, [spec.incoming_uri]):
                return spec
        folders = {name: spec.incoming_uri for name, spec in sorted(self.datasets.items())}
        raise SettingsError(
            f"{uri} is in no dataset's incoming folder {folders}; drop it into one of them or name the "
            "dataset in the trigger form's 'dataset' field"
        )


def load_catalog(root: Path | None = None) -> Catalog:
    """Load and cross-check every settings file under ``root`` (default :func:`include_dir`)."""
    root = root or include_dir()
    platform = load_model_file(root / "modelops.yaml", PlatformSettings)
    sources: dict[str, Path] = {}

    def named(kind: str, folder: Path, model: type[N], what: str) -> dict[str, N]:
        items, files = _load_named(folder, model, what)
        sources.update({f"{kind}/{name}": path for name, path in files.items()})
        return items

    models = named("models", root / "models", ModelSpec, "model")
    datasets = named("datasets", root / "datasets", DatasetSpec, "dataset")
    compliance = named("compliance", root / "policies" / "compliance", CompliancePolicy, "compliance policy")
    monitoring = named("monitoring", root / "policies" / "monitoring", MonitoringPolicy, "monitoring policy")
    retirement = named("retirement", root / "policies" / "retirement", RetirementPolicy, "retirement policy")
    tiers_file = root / "policies" / "risk_tiers.yaml"
    tiers = load_model_file(tiers_file, RiskTiers).tiers

    def require(found: Mapping[str, Any], name: str, where: str, what: str, folder: str) -> None:
        if name not in found:
            raise SettingsError(
                f"{where}: {what} {name!r} does not exist; known: {sorted(found)}. "
                f"Add it under {folder} or use a known one"
            )

    for tier_name, tier in tiers.items():
        where = f"{tiers_file}: field 'tiers.{tier_name}"
        require(
            compliance, tier.compliance, f"{where}.compliance'", "compliance policy", "policies/compliance/"
        )
        require(
            monitoring, tier.monitoring, f"{where}.monitoring'", "monitoring policy", "policies/monitoring/"
        )
        require(
            retirement, tier.retirement, f"{where}.retirement'", "retirement policy", "policies/retirement/"
        )
    for name, spec in datasets.items():
        suite = root / "expectations" / spec.expectation_suite
        if not suite.is_file():
            raise SettingsError(
                f"{sources['datasets/' + name]}: field 'expectation_suite': {suite} does not exist; "
                "write the Great Expectations suite there or fix the file name"
            )
    for name, spec in models.items():
        path = sources[f"models/{name}"]
        require(datasets, spec.dataset, f"{path}: field 'dataset'", "dataset", "include/datasets/")
        require(tiers, spec.risk_tier, f"{path}: field 'risk_tier'", "risk tier", "policies/risk_tiers.yaml")
        for kind, found in (
            ("compliance", compliance),
            ("monitoring", monitoring),
            ("retirement", retirement),
        ):
            chosen = getattr(spec.policies, kind)
            if chosen is not None:
                require(
                    found, chosen, f"{path}: field 'policies.{kind}'", f"{kind} policy", f"policies/{kind}/"
                )
        override = spec.policies.compliance
        tier_policy = compliance[tiers[spec.risk_tier].compliance]
        if override and tier_policy.approval.required and not compliance[override].approval.required:
            # Otherwise a spec could opt its model out of the human approval its risk tier demands.
            raise SettingsError(
                f"{path}: field 'policies.compliance': policy {override!r} approves without a person, but risk "
                f"tier {spec.risk_tier!r} requires approval (policy {tier_policy.name!r}); choose a policy that "
                "requires approval, or change the model's risk tier"
            )
    if platform.default_model not in models:
        raise SettingsError(
            f"{root / 'modelops.yaml'}: field 'default_model': model {platform.default_model!r} has no spec; "
            f"known models: {sorted(models)}"
        )
    return Catalog(
        root=root,
        platform=platform,
        models=models,
        datasets=datasets,
        compliance_policies=compliance,
        monitoring_policies=monitoring,
        retirement_policies=retirement,
        risk_tiers=tiers,
        sources=sources,
    )
