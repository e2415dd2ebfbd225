"""Stage 2: training and registration with lineage.

Trains the model spec's scikit-learn pipeline on a validated dataset snapshot, logs the run to the
model's own MLflow experiment (params, holdout metrics for its task kind, signature, input example) and
registers a version whose tags carry the lineage: data hash and uri, framework and version, Python
version, code commit, the Airflow run and what triggered it. The registered model carries the spec's
ownership and governance tags. The alias ``candidate`` moves to the new version. Registration is
idempotent per Airflow run: a retry finds the version its first try registered instead of registering
another.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelops.errors import TrainingError
from modelops.evidence import evidence_summary, version_file_hashes
from modelops.monitoring_reference import numeric_ranges
from modelops.registry import json_tag
from modelops.serving.ranges import write_ranges
from modelops.settings import PROJECT_ROOT, Catalog, ModelSpec
from modelops.stages.outcome import AuditEntry, StageOutcome, sha256_json
from modelops.storage import read_dataset
from modelops.vocabulary import (
    Alias,
    AuditAction,
    Decision,
    EventField,
    ModelTag,
    Tag,
    Trigger,
    latest_passed_validation,
    model_subject,
    sha256_from_subject,
)

if TYPE_CHECKING:
    import pandas as pd
    from sklearn.pipeline import Pipeline

    from modelops.audit import AuditStore
    from modelops.registry import ModelRegistry

MODEL_ARTIFACT_PATH = "model"


@dataclass(frozen=True)
class TrainingResult:
    model_name: str
    version: str
    run_id: str
    metrics: dict[str, float]
    tags: dict[str, str]
    reused: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def code_commit() -> str:
    """The git commit of the code that trains, with ``-dirty`` when the tree has uncommitted changes.

    ``MODELOPS_CODE_COMMIT`` wins (set it in images built without ``.git``).
    """
    if os.environ.get("MODELOPS_CODE_COMMIT"):
        return os.environ["MODELOPS_CODE_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown: not a git checkout and MODELOPS_CODE_COMMIT is unset"
    return f"{commit}-dirty" if dirty else commit


def build_pipeline(spec: ModelSpec) -> Pipeline:
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    module_name, _, class_name = spec.estimator.class_path.rpartition(".")
    try:
        estimator_class = getattr(importlib.import_module(module_name), class_name)
        estimator = estimator_class(**spec.estimator.params)
    except (ImportError, AttributeError, TypeError) as exc:
        raise TrainingError(
            f"model spec {spec.name!r}: cannot build estimator {spec.estimator.class_path} "
            f"with params {spec.estimator.params}: {exc}"
        ) from exc
    features = ColumnTransformer(
        [
            (
                "categorical",
                OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                spec.categorical_features,
            ),
            ("numeric", "passthrough", spec.numeric_features),
        ]
    )
    return Pipeline([("features", features), ("estimator", estimator)])


def split_frame(frame: pd.DataFrame, spec: ModelSpec) -> tuple[pd.DataFrame, pd.DataFrame, Any, Any]:
    from sklearn.model_selection import train_test_split

    missing = [c for c in [*spec.features, spec.target] if c not in frame.columns]
    if missing:
        raise TrainingError(f"training data lacks columns {missing} that model spec {spec.name!r} needs")
    features = frame[spec.features]
    target = frame[spec.target]
    # A classifier's holdout keeps the class balance; a regressor's target is continuous.
    stratify = target if spec.task == "binary_classification" else None
    return train_test_split(
        features, target, test_size=spec.holdout_fraction, random_state=spec.random_seed, stratify=stratify
    )


def holdout_metrics(
    spec: ModelSpec, model: Pipeline, x_holdout: pd.DataFrame, y_holdout: Any
) -> dict[str, float]:
    """The holdout metrics of the spec's task kind (``settings.TASK_METRICS`` names them)."""
    if spec.task == "regression":
        from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

        predicted = model.predict(x_holdout)
        metrics = {
            "holdout_rmse": float(mean_squared_error(y_holdout, predicted) ** 0.5),
            "holdout_mae": float(mean_absolute_error(y_holdout, predicted)),
            "holdout_r2": float(r2_score(y_holdout, predicted)),
            "holdout_target_mean": float(y_holdout.mean()),
        }
    else:
        from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

        proba = model.predict_proba(x_holdout)[:, 1]
        metrics = {
            "holdout_roc_auc": float(roc_auc_score(y_holdout, proba)),
            "holdout_log_loss": float(log_loss(y_holdout, proba)),
            "holdout_accuracy": float(accuracy_score(y_holdout, proba >= 0.5)),
            "holdout_positive_rate": float(y_holdout.mean()),
        }
    metrics = {name: round(value, 6) for name, value in metrics.items()}
    metrics["holdout_rows"] = float(len(y_holdout))
    return metrics


def untrusted_types(model: Pipeline, reviewed: list[str]) -> list[str]:
    """Types in the skops file that nobody reviewed; loading would refuse them."""
    import skops.io

    return sorted(set(skops.io.get_untrusted_types(data=skops.io.dumps(model))) - set(reviewed))


def model_tags(spec: ModelSpec, catalog: Catalog) -> dict[str, str]:
    """The registered model's tags: who answers for it and what governs it, from its spec."""
    policies = catalog.policies_for(spec)
    return {
        ModelTag.OWNER: spec.owner,
        ModelTag.TEAM: spec.team,
        ModelTag.DEPARTMENT: spec.department,
        ModelTag.RISK_TIER: spec.risk_tier,
        ModelTag.COMPLIANCE_LABELS: json_tag(spec.compliance_labels),
        ModelTag.TASK: spec.task,
        ModelTag.DATASET: spec.dataset,
        ModelTag.COMPLIANCE_POLICY: f"{policies.compliance.name}@{policies.compliance.version}",
        ModelTag.MONITORING_POLICY: policies.monitoring.name,
        ModelTag.RETIREMENT_POLICY: policies.retirement.name,
    }


def train_and_register(
    *,
    registry: ModelRegistry,
    spec: ModelSpec,
    catalog: Catalog,
    frame: pd.DataFrame,
    dataset_sha256: str,
    dataset_uri: str,
    trigger: Trigger,
    dag_id: str,
    run_id: str,
) -> TrainingResult:
    """Train, log and register one version; a retry of the same Airflow run returns the same version."""
    import mlflow.sklearn
    import sklearn
    from mlflow.models import infer_signature

    registry.ensure_model(spec.name, model_tags(spec, catalog), description=spec.description.strip())
    existing = registry.find_versions(
        spec.name,
        **{Tag.AIRFLOW_DAG_ID: dag_id, Tag.AIRFLOW_RUN_ID: run_id, Tag.TRAIN_DATA_SHA256: dataset_sha256},
    )
    if existing:
        version = existing[0]
        registry.set_alias(spec.name, Alias.CANDIDATE, version.version)
        metrics = registry.run_metrics(version.run_id) if version.run_id else {}
        return TrainingResult(
            spec.name, version.version, version.run_id or "", metrics, version.tags, reused=True
        )

    x_train, x_holdout, y_train, y_holdout = split_frame(frame, spec)
    model = build_pipeline(spec)
    model.fit(x_train, y_train)
    metrics = holdout_metrics(spec, model, x_holdout, y_holdout)

    unreviewed = untrusted_types(model, spec.skops_trusted_types)
    if unreviewed:
        raise TrainingError(
            f"the trained model contains types nobody reviewed as safe to load: {unreviewed}; review them and "
            f"add them to skops_trusted_types in {catalog.source_of('models', spec.name)}"
        )

    tags = {
        Tag.TRAIN_DATA_SHA256: dataset_sha256,
        Tag.TRAIN_DATA_URI: dataset_uri,
        Tag.DATASET: spec.dataset,
        Tag.FRAMEWORK: "scikit-learn",
        Tag.FRAMEWORK_VERSION: sklearn.__version__,
        Tag.PYTHON_VERSION: platform.python_version(),
        Tag.CODE_COMMIT: code_commit(),
        Tag.AIRFLOW_DAG_ID: dag_id,
        Tag.AIRFLOW_RUN_ID: run_id,
        Tag.TRIGGER: trigger,
        Tag.MODEL_SPEC: spec.name,
        Tag.TASK: spec.task,
        Tag.ESTIMATOR: spec.estimator.class_path,
        Tag.SKOPS_TRUSTED_TYPES: json_tag(spec.skops_trusted_types),
    }
    input_example = x_train.head(5)
    predict_fn = "predict_proba" if spec.task == "binary_classification" else "predict"
    signature = infer_signature(input_example, getattr(model, predict_fn)(input_example))
    with tempfile.TemporaryDirectory(prefix="modelops-train-") as tmp:
        # Saved locally and logged through the registry's own client: MLflow's fluent log_model would need
        # the process-wide tracking URI, which the platform never sets.
        model_dir = Path(tmp) / MODEL_ARTIFACT_PATH
        mlflow.sklearn.save_model(
            model,
            str(model_dir),
            # Named, not inferred: MLflow's inference loads the model in a subprocess (about 30 s here)
            # to find what the training process has imported anyway.
            pip_requirements=model_requirements(),
            signature=signature,
            input_example=input_example,
            pyfunc_predict_fn=predict_fn,
            serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
            skops_trusted_types=spec.skops_trusted_types,
        )
        # Beside the model, so the gate approves it with the model's files and the gateway screens by it.
        write_ranges(model_dir, numeric_ranges(x_train, spec.numeric_features))
        training_run = registry.log_run(
            experiment=spec.experiment_name,
            run_name=f"train-{spec.name}",
            tags=tags,
            params={
                "estimator": spec.estimator.class_path,
                **spec.estimator.params,
                "holdout_fraction": spec.holdout_fraction,
                "random_seed": spec.random_seed,
                "train_rows": len(x_train),
            },
            metrics=metrics,
            artifact_dirs={MODEL_ARTIFACT_PATH: model_dir},
        )
    version = registry.register_version(
        spec.name, run_id=training_run, artifact_path=MODEL_ARTIFACT_PATH, tags=tags
    )
    registry.set_alias(spec.name, Alias.CANDIDATE, version.version)
    return TrainingResult(spec.name, version.version, training_run, metrics, dict(tags), reused=False)


def model_requirements() -> list[str]:
    """What loading the logged model needs, pinned to the versions that trained it."""
    from importlib.metadata import version

    return [
        f"{package}=={version(package)}"
        for package in ("mlflow", "scikit-learn", "skops", "numpy", "scipy", "pandas")
    ]


# --- what to train, and the stage -------------------------------------------------------------------


def plan_training(
    *,
    catalog: Catalog,
    dataset_events: list[dict[str, Any]],
    retraining_events: list[dict[str, Any]],
    model: str | None,
    dataset_sha256: str | None,
    untrained: Mapping[str, str] | None = None,
    trained_on: Callable[[str, str], bool] | None = None,
) -> list[dict[str, Any]]:
    """One entry per model to train: ``{"model", "dataset_sha256", "trigger"}``.

    A validated-dataset event trains every model whose spec names that dataset, on that version; a
    retraining request trains the model it names, on the newest validated version of that model's own
    dataset (resolved when the task runs). Events for unknown models are ignored, so a stage acts only on
    its own models. With no event (a manual run), the form's model, on ``dataset_sha256`` or the newest
    validated version of its dataset.

    ``untrained`` (model -> dataset sha256, from :func:`untrained_datasets`) catches up, in an event-triggered
    run, on validated data that no run has trained on: Airflow 3.3 can start this run between two events of
    one validation run and then queue no run for the later one (apache/airflow#54659, #56050), so an event
    is a wake-up call, and the audit log and the registry say what is still to train. ``trained_on(model,
    sha256)`` says a version of the model was already trained on that data (by such a catch-up, or a run an
    event was delivered to twice): the event then trains nothing more.
    """
    plan: dict[str, dict[str, Any]] = {}
    for event in dataset_events:
        dataset, sha = event.get(EventField.DATASET), event.get(EventField.SHA256)
        if not dataset or not sha:
            continue
        for spec in catalog.models_for_dataset(dataset):
            if trained_on is not None and trained_on(spec.name, sha):
                plan.pop(spec.name, None)
                continue
            plan[spec.name] = {"model": spec.name, "dataset_sha256": sha, "trigger": Trigger.NEW_DATA.value}
    for event in retraining_events:
        name = event.get(EventField.MODEL_NAME)
        if name in catalog.models and name not in plan:
            plan[name] = {"model": name, "dataset_sha256": None, "trigger": Trigger.RETRAINING_REQUEST.value}
    if dataset_events or retraining_events:
        for name, sha in (untrained or {}).items():
            if name in catalog.models and name not in plan:
                plan[name] = {"model": name, "dataset_sha256": sha, "trigger": Trigger.NEW_DATA.value}
    else:
        if not model:
            raise TrainingError("a manual training run needs a model: pick one in the trigger form")
        catalog.model(model)
        plan[model] = {"model": model, "dataset_sha256": dataset_sha256, "trigger": Trigger.MANUAL.value}
    return [plan[name] for name in sorted(plan)]


def untrained_datasets(catalog: Catalog, audit: AuditStore, registry: ModelRegistry) -> dict[str, str]:
    """Model -> the newest validated version of its dataset, for each model with no version trained on it.

    A version someone quarantined is left alone: catching up must not train on withdrawn data.
    """
    from modelops.checks import quarantine_record

    untrained: dict[str, str] = {}
    for spec in catalog.models.values():
        record = latest_passed_validation(audit, dataset=spec.dataset)
        if record is None:
            continue
        sha = sha256_from_subject(record.subject)
        if quarantine_record(audit, sha) is not None:
            continue
        if not registry.find_versions(spec.name, **{Tag.TRAIN_DATA_SHA256: sha}):
            untrained[spec.name] = sha
    return untrained


def training_data(
    audit: AuditStore, spec: ModelSpec, dataset_sha256: str | None
) -> tuple[str, dict[str, Any]]:
    """The validated dataset version to train ``spec`` on: (sha256, its validation record's details).

    An explicit hash must have passed validation as the model's own dataset; without one, the newest
    validated version of the model's own dataset (never another model's).
    """
    record = latest_passed_validation(audit, dataset_sha256, dataset=spec.dataset)
    if record is None and dataset_sha256:
        raise TrainingError(
            f"dataset sha256 {dataset_sha256} has no passing validation record as dataset {spec.dataset!r} "
            f"(the dataset model {spec.name!r} trains on); validate it with the modelops_data_validation DAG "
            "before training on it"
        )
    if record is None:
        raise TrainingError(
            f"no version of dataset {spec.dataset!r} (the dataset model {spec.name!r} trains on) has passed "
            "validation yet; drop a file into its incoming folder or run modelops_data_validation"
        )
    if not record.details.get("snapshot_uri"):
        raise TrainingError(
            f"the validation record of dataset {record.subject} names no snapshot to train on; validate it again"
        )
    return sha256_from_subject(record.subject), record.details


def train(
    *,
    spec: ModelSpec,
    catalog: Catalog,
    registry: ModelRegistry,
    audit: AuditStore,
    dataset_sha256: str | None,
    trigger: Trigger,
    dag_id: str,
    run_id: str,
) -> StageOutcome:
    """Train ``spec`` on its validated data and register a candidate version."""
    sha, validation = training_data(audit, spec, dataset_sha256)
    snapshot = validation["snapshot_uri"]
    result = train_and_register(
        registry=registry,
        spec=spec,
        catalog=catalog,
        frame=read_dataset(snapshot),
        dataset_sha256=sha,
        dataset_uri=snapshot,
        trigger=trigger,
        dag_id=dag_id,
        run_id=run_id,
    )
    # The files as registered, read back from the registry: the gate approves only these exact files.
    files = version_file_hashes(registry, spec.name, result.version)
    headline = spec.metrics[0]
    return StageOutcome(
        decision=Decision.CANDIDATE,
        summary=f"{spec.name} v{result.version} (candidate), {headline} "
        f"{result.metrics.get(headline, float('nan')):.3f}, trigger {trigger}",
        details={**result.to_dict(), "trigger": str(trigger), "dataset_sha256": sha},
        records=(
            AuditEntry(
                AuditAction.MODEL_REGISTERED,
                model_subject(spec.name, result.version),
                Decision.CANDIDATE,
                details={
                    "run_id": result.run_id,
                    "metrics": result.metrics,
                    "tags": result.tags,
                    "trigger": str(trigger),
                    "experiment": spec.experiment_name,
                    **evidence_summary(files),
                },
                evidence={
                    "dataset": sha,
                    "lineage_tags": sha256_json(result.tags),
                    "artifacts": sha256_json(files),
                },
            ),
        ),
        asset_extra={
            EventField.MODEL_NAME: spec.name,
            EventField.VERSION: result.version,
            EventField.TRAIN_DATA_SHA256: sha,
        },
    )
