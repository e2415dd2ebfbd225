"""Stage 2: training and registration with lineage.

Trains the model spec's scikit-learn pipeline on a validated dataset snapshot, logs the run to MLflow
(params, holdout metrics, signature, input example) and registers a version whose tags carry the
lineage: data hash and uri, framework and version, Python version, code commit, the Airflow run and
what triggered it. The alias ``candidate`` moves to the new version. Registration is idempotent per
Airflow run: a retry finds the version its first try registered instead of registering another.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from modelops.errors import TrainingError
from modelops.settings import PROJECT_ROOT, ModelSpec

if TYPE_CHECKING:
    import pandas as pd
    from sklearn.pipeline import Pipeline

    from modelops.hooks.registry import MlflowRegistryHook

Trigger = Literal["new_data", "retraining_request", "manual"]
CANDIDATE_ALIAS = "candidate"


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
    return train_test_split(
        features, target, test_size=spec.holdout_fraction, random_state=spec.random_seed, stratify=target
    )


def holdout_metrics(model: Pipeline, x_holdout: pd.DataFrame, y_holdout: Any) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

    proba = model.predict_proba(x_holdout)[:, 1]
    return {
        "holdout_roc_auc": round(float(roc_auc_score(y_holdout, proba)), 6),
        "holdout_log_loss": round(float(log_loss(y_holdout, proba)), 6),
        "holdout_accuracy": round(float(accuracy_score(y_holdout, proba >= 0.5)), 6),
        "holdout_positive_rate": round(float(y_holdout.mean()), 6),
        "holdout_rows": float(len(y_holdout)),
    }


def untrusted_types(model: Pipeline, reviewed: list[str]) -> list[str]:
    """Types in the skops file that nobody reviewed; loading would refuse them."""
    import skops.io

    return sorted(set(skops.io.get_untrusted_types(data=skops.io.dumps(model))) - set(reviewed))


def train_and_register(
    *,
    registry: MlflowRegistryHook,
    spec: ModelSpec,
    experiment_name: str,
    frame: pd.DataFrame,
    dataset_sha256: str,
    dataset_uri: str,
    trigger: Trigger,
    dag_id: str,
    run_id: str,
) -> TrainingResult:
    """Train, log and register one version; a retry of the same Airflow run returns the same version."""
    import mlflow
    import sklearn
    from mlflow.models import infer_signature

    existing = registry.find_versions(spec.name, airflow_dag_id=dag_id, airflow_run_id=run_id)
    if existing:
        version = existing[0]
        registry.client.set_registered_model_alias(spec.name, CANDIDATE_ALIAS, str(version.version))
        run = registry.client.get_run(version.run_id)
        return TrainingResult(
            spec.name,
            str(version.version),
            version.run_id,
            dict(run.data.metrics),
            dict(version.tags),
            reused=True,
        )

    x_train, x_holdout, y_train, y_holdout = split_frame(frame, spec)
    model = build_pipeline(spec)
    model.fit(x_train, y_train)
    metrics = holdout_metrics(model, x_holdout, y_holdout)

    unreviewed = untrusted_types(model, spec.skops_trusted_types)
    if unreviewed:
        raise TrainingError(
            f"the trained model contains types nobody reviewed as safe to load: {unreviewed}; review them and "
            f"add them to skops_trusted_types in include/models/{spec.name}.yaml"
        )

    tags = {
        "train_data_sha256": dataset_sha256,
        "train_data_uri": dataset_uri,
        "framework": "scikit-learn",
        "framework_version": sklearn.__version__,
        "python_version": platform.python_version(),
        "code_commit": code_commit(),
        "airflow_dag_id": dag_id,
        "airflow_run_id": run_id,
        "trigger": trigger,
        "model_spec": spec.name,
        "estimator": spec.estimator.class_path,
        "skops_trusted_types": json.dumps(spec.skops_trusted_types),
    }
    registry.activate()
    mlflow.set_experiment(experiment_name)
    input_example = x_train.head(5)
    signature = infer_signature(input_example, model.predict_proba(input_example))
    with mlflow.start_run(run_name=f"train-{spec.name}", tags=tags) as run:
        mlflow.log_params({"estimator": spec.estimator.class_path, **spec.estimator.params})
        mlflow.log_params(
            {
                "holdout_fraction": spec.holdout_fraction,
                "random_seed": spec.random_seed,
                "train_rows": len(x_train),
            }
        )
        mlflow.log_metrics(metrics)
        logged = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=signature,
            input_example=input_example,
            pyfunc_predict_fn="predict_proba",
            skops_trusted_types=spec.skops_trusted_types,
        )
        # Registering with the tags in one call: a version never exists without its lineage.
        version = mlflow.register_model(logged.model_uri, spec.name, tags=tags)
    registry.client.set_registered_model_alias(spec.name, CANDIDATE_ALIAS, str(version.version))
    return TrainingResult(spec.name, str(version.version), run.info.run_id, metrics, tags, reused=False)
