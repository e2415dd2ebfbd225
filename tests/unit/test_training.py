"""Stage 2, training and registration, against a real SQLite MLflow registry under tmp_path."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from mlflow import MlflowClient

from modelops.assets import MODEL_CANDIDATE, VALIDATED_DATASET
from modelops.audit import AuditStore
from modelops.data.synthetic import generate_clicks, write_csv
from modelops.errors import TrainingError
from modelops.hooks.registry import MlflowRegistryHook
from modelops.operators.training import TrainModelOperator
from modelops.operators.validation import ValidateDatasetOperator
from modelops.settings import EstimatorSpec, ModelSpec, compliance_policy, model_spec, platform_settings
from modelops.stages.training import (
    CANDIDATE_ALIAS,
    build_pipeline,
    code_commit,
    split_frame,
    train_and_register,
    untrusted_types,
)
from tests.support import use_sqlite_registry

# skops resolves names through module attributes, which trips Airflow's deprecated-import shims.
pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore:Hint. Inferred schema contains integer column:UserWarning"
)

ROWS = 3000
DAG_ID = "modelops_training"
RUN_ID = "manual__train-1"
TREE_PREDICTOR = "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"


class OutletEvents(dict):
    """Stand-in for Airflow's outlet event accessors: an accessor (with ``extra``) per asset on demand."""

    def __missing__(self, key: Any) -> SimpleNamespace:
        self[key] = SimpleNamespace(extra={})
        return self[key]


def task_context(dag_id: str, run_id: str, task_id: str, **extra: Any) -> dict[str, Any]:
    dag_run = SimpleNamespace(dag_id=dag_id, run_id=run_id, triggering_user_name=None)
    return {
        "dag_run": dag_run,
        "ti": SimpleNamespace(task_id=task_id),
        "outlet_events": OutletEvents(),
        **extra,
    }


@dataclass(frozen=True)
class Trained:
    root: Path
    tracking_uri: str
    client: MlflowClient
    csv: Path
    sha256: str
    frame: pd.DataFrame
    result: Any


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """One registry for the module and one version trained by ``train_and_register`` (the expensive part)."""
    root = tmp_path_factory.mktemp("training")
    with pytest.MonkeyPatch.context() as patch:
        tracking_uri, client, _ = use_sqlite_registry(root, patch)
        patch.setenv("MODELOPS_CODE_COMMIT", "0123abc-test")
        csv = write_csv(generate_clicks(ROWS, seed=7), root / "clicks.csv")
        sha = hashlib.sha256(csv.read_bytes()).hexdigest()
        frame = pd.read_csv(csv)
        result = train_and_register(
            registry=MlflowRegistryHook(),
            spec=model_spec(),
            experiment_name=platform_settings().experiment_name,
            frame=frame,
            dataset_sha256=sha,
            dataset_uri=csv.as_uri(),
            trigger="new_data",
            dag_id=DAG_ID,
            run_id=RUN_ID,
        )
        yield Trained(root, tracking_uri, client, csv, sha, frame, result)


def versions_of(client: MlflowClient, name: str) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'"))


def with_estimator(spec: ModelSpec, class_path: str, **params: Any) -> ModelSpec:
    return spec.model_copy(update={"estimator": EstimatorSpec(class_path=class_path, params=params)})


# --- pure parts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "class_path", ["sklearn.ensemble.NoSuchClassifier", "no_such_package.models.Classifier"]
)
def test_build_pipeline_with_a_bad_class_path_names_it(class_path: str) -> None:
    with pytest.raises(TrainingError) as raised:
        build_pipeline(with_estimator(model_spec(), class_path))
    message = str(raised.value)
    assert class_path in message and "'ctr_recommender'" in message


def test_build_pipeline_with_bad_params_names_them() -> None:
    spec = with_estimator(model_spec(), "sklearn.linear_model.LogisticRegression", no_such_param=3)
    with pytest.raises(TrainingError, match=r"LogisticRegression with params \{'no_such_param': 3\}"):
        build_pipeline(spec)


def test_build_pipeline_builds_the_spec() -> None:
    spec = model_spec()
    pipeline = build_pipeline(spec)
    assert [name for name, _ in pipeline.steps] == ["features", "estimator"]
    estimator = pipeline.named_steps["estimator"]
    assert f"{type(estimator).__module__}.{type(estimator).__name__}".startswith("sklearn.ensemble.")
    assert type(estimator).__name__ == spec.estimator.class_path.rsplit(".", 1)[1]
    assert estimator.get_params()["max_iter"] == spec.estimator.params["max_iter"]


def test_split_frame_names_the_missing_columns() -> None:
    frame = generate_clicks(200, seed=1).drop(columns=["device", "clicked"])
    with pytest.raises(TrainingError) as raised:
        split_frame(frame, model_spec())
    assert "['device', 'clicked']" in str(raised.value) and "'ctr_recommender'" in str(raised.value)


def test_split_frame_is_a_seeded_stratified_holdout() -> None:
    spec = model_spec()
    frame = generate_clicks(1000, seed=1)
    x_train, x_holdout, y_train, y_holdout = split_frame(frame, spec)
    assert (len(x_train), len(x_holdout)) == (800, 200)
    assert list(x_train.columns) == spec.features
    assert abs(y_train.mean() - y_holdout.mean()) < 0.01
    again = split_frame(frame, spec)
    assert list(again[1].index) == list(x_holdout.index)


def test_untrusted_types_lists_what_the_spec_does_not_review() -> None:
    spec = model_spec()
    x_train, _, y_train, _ = split_frame(generate_clicks(600, seed=2), spec)
    pipeline = build_pipeline(with_estimator(spec, spec.estimator.class_path, max_iter=5))
    pipeline.fit(x_train, y_train)
    assert untrusted_types(pipeline, spec.skops_trusted_types) == []
    assert untrusted_types(pipeline, []) == [TREE_PREDICTOR]


def test_code_commit_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELOPS_CODE_COMMIT", "feedbeef")
    assert code_commit() == "feedbeef"
    monkeypatch.delenv("MODELOPS_CODE_COMMIT")
    commit = code_commit()
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit) or commit.startswith("unknown: "), commit


# --- training and registration -------------------------------------------------------------------


def test_train_and_register_tags_the_version_with_its_lineage(trained: Trained) -> None:
    result, client = trained.result, trained.client
    spec = model_spec()
    assert result.reused is False and result.version == "1" and result.model_name == spec.name

    version = client.get_model_version(spec.name, result.version)
    tags = dict(version.tags)
    assert tags == result.tags
    expected = {
        "train_data_sha256": trained.sha256,
        "train_data_uri": trained.csv.as_uri(),
        "framework": "scikit-learn",
        "code_commit": "0123abc-test",
        "airflow_dag_id": DAG_ID,
        "airflow_run_id": RUN_ID,
        "trigger": "new_data",
        "model_spec": spec.name,
        "estimator": spec.estimator.class_path,
        "skops_trusted_types": json.dumps([TREE_PREDICTOR]),
    }
    assert {key: tags[key] for key in expected} == expected
    import platform

    import sklearn

    assert tags["framework_version"] == sklearn.__version__
    assert tags["python_version"] == platform.python_version()
    # Everything the compliance policy demands is there.
    assert all(tags.get(tag) for tag in compliance_policy().required_tags)

    assert str(client.get_model_version_by_alias(spec.name, CANDIDATE_ALIAS).version) == result.version
    run = client.get_run(version.run_id)
    assert run.info.run_id == result.run_id
    assert run.data.metrics == result.metrics
    assert set(result.metrics) == {
        "holdout_roc_auc",
        "holdout_log_loss",
        "holdout_accuracy",
        "holdout_positive_rate",
        "holdout_rows",
    }
    assert result.metrics["holdout_rows"] == ROWS * spec.holdout_fraction
    assert result.metrics["holdout_roc_auc"] > 0.65
    assert run.data.params["train_rows"] == str(int(ROWS * (1 - spec.holdout_fraction)))
    assert run.data.params["estimator"] == spec.estimator.class_path
    assert run.data.tags["airflow_run_id"] == RUN_ID
    # Artifacts landed under tmp_path, not in ./mlruns.
    assert run.info.artifact_uri.startswith((trained.root / "artifacts").as_uri())


def test_the_registered_model_loads_with_its_reviewed_types_and_gives_probabilities(trained: Trained) -> None:
    import mlflow

    spec = model_spec()
    MlflowRegistryHook().activate()
    model = mlflow.pyfunc.load_model(f"models:/{spec.name}/{trained.result.version}")
    rows = trained.frame[spec.features].head(5)
    proba = model.predict(rows)
    assert proba.shape == (5, 2)
    assert ((proba >= 0) & (proba <= 1)).all() and abs(proba.sum(axis=1) - 1).max() < 1e-9


def test_a_retry_of_the_same_run_returns_the_same_version(trained: Trained) -> None:
    client, name = trained.client, model_spec().name
    # Someone moved the candidate alias away between the tries; the retry puts it back.
    client.delete_registered_model_alias(name, CANDIDATE_ALIAS)
    again = train_and_register(
        registry=MlflowRegistryHook(),
        spec=model_spec(),
        experiment_name=platform_settings().experiment_name,
        frame=trained.frame,
        dataset_sha256=trained.sha256,
        dataset_uri=trained.csv.as_uri(),
        trigger="new_data",
        dag_id=DAG_ID,
        run_id=RUN_ID,
    )
    assert again.reused is True
    assert (again.version, again.run_id, again.tags) == (
        trained.result.version,
        trained.result.run_id,
        trained.result.tags,
    )
    assert again.metrics == trained.result.metrics
    assert versions_of(client, name) == ["1"]
    assert str(client.get_model_version_by_alias(name, CANDIDATE_ALIAS).version) == "1"


def test_unreviewed_types_refuse_training_naming_the_type_and_the_spec_file(trained: Trained) -> None:
    client, name = trained.client, model_spec().name
    experiment = client.get_experiment_by_name(platform_settings().experiment_name)
    runs_before = len(client.search_runs([experiment.experiment_id]))
    spec = with_estimator(model_spec(), model_spec().estimator.class_path, max_iter=5)
    spec = spec.model_copy(update={"skops_trusted_types": []})
    with pytest.raises(TrainingError) as raised:
        train_and_register(
            registry=MlflowRegistryHook(),
            spec=spec,
            experiment_name=platform_settings().experiment_name,
            frame=trained.frame.head(600),
            dataset_sha256=trained.sha256,
            dataset_uri=trained.csv.as_uri(),
            trigger="manual",
            dag_id=DAG_ID,
            run_id="manual__untrusted",
        )
    message = str(raised.value)
    assert TREE_PREDICTOR in message
    assert "skops_trusted_types" in message and "include/models/ctr_recommender.yaml" in message
    # Refused before anything was logged or registered.
    assert versions_of(client, name) == ["1"]
    assert len(client.search_runs([experiment.experiment_id])) == runs_before


# --- operator ------------------------------------------------------------------------------------


def test_operator_without_a_validated_dataset_refuses(trained: Trained, modelops_home: Path) -> None:
    operator = TrainModelOperator(task_id="train")
    with pytest.raises(TrainingError, match="no dataset has passed validation yet"):
        operator.execute(task_context(DAG_ID, "manual__nodata", "train"))
    explicit = TrainModelOperator(task_id="train", dataset_sha256="f" * 64)
    with pytest.raises(TrainingError, match=f"dataset sha256 {'f' * 64} has no passing validation record"):
        explicit.execute(task_context(DAG_ID, "manual__nodata", "train"))
    assert versions_of(trained.client, model_spec().name) == ["1"]


def test_operator_retry_on_a_validated_dataset_reuses_the_version_and_records_it(
    trained: Trained, modelops_home: Path
) -> None:
    validation_context = task_context("modelops_data_validation", "manual__v", "validate")
    lineage = ValidateDatasetOperator(task_id="validate", dataset_uri=str(trained.csv)).execute(
        validation_context
    )
    assert lineage["sha256"] == trained.sha256

    context = task_context(
        DAG_ID,
        RUN_ID,
        "train",
        triggering_asset_events={VALIDATED_DATASET: [SimpleNamespace(extra=lineage)]},
    )
    result = TrainModelOperator(task_id="train", outlets=[MODEL_CANDIDATE]).execute(context)
    json.dumps(result)
    assert result["reused"] is True and result["version"] == trained.result.version
    assert "trigger new_data" in result["summary"]
    assert context["outlet_events"][MODEL_CANDIDATE].extra == {
        "model_name": "ctr_recommender",
        "version": trained.result.version,
        "train_data_sha256": trained.sha256,
    }
    store = AuditStore(f"sqlite:///{modelops_home}/audit.db")
    try:
        record = store.last(action="model.registered")
        assert record.decision == "candidate" and record.subject == "model:ctr_recommender@1"
        assert record.details["trigger"] == "new_data"
        assert record.evidence["dataset"] == trained.sha256
        assert store.verify().ok
    finally:
        store.dispose()
    assert versions_of(trained.client, model_spec().name) == ["1"]


def test_the_trigger_and_dataset_come_from_what_started_the_run(
    trained: Trained, modelops_home: Path
) -> None:
    """New data trains on the event's dataset; a retraining request on the latest validated dataset."""
    from modelops.assets import RETRAINING_REQUEST
    from modelops.hooks.audit import AuditHook
    from modelops.operators.training import resolve_training_data

    lineage = ValidateDatasetOperator(task_id="validate", dataset_uri=str(trained.csv)).execute(
        task_context("modelops_data_validation", "manual__v2", "validate")
    )
    audit = AuditHook()

    new_data = task_context(
        DAG_ID,
        "asset_triggered__1",
        "train",
        triggering_asset_events={VALIDATED_DATASET: [SimpleNamespace(extra=lineage)]},
    )
    sha, record, trigger = resolve_training_data(new_data, audit, "")
    assert (sha, trigger) == (trained.sha256, "new_data") and record["snapshot_uri"] == lineage[
        "snapshot_uri"
    ]

    request = {"model_name": "ctr_recommender", "version": "1", "verdict": "critical", "reason": "drift"}
    retrain = task_context(
        DAG_ID,
        "asset_triggered__2",
        "train",
        triggering_asset_events={RETRAINING_REQUEST: [SimpleNamespace(extra=request)]},
    )
    sha, record, trigger = resolve_training_data(retrain, audit, "")
    assert (sha, trigger) == (trained.sha256, "retraining_request")

    sha, _, trigger = resolve_training_data(task_context(DAG_ID, "manual__3", "train"), audit, "")
    assert (sha, trigger) == (trained.sha256, "manual")

    with pytest.raises(TrainingError, match="has no passing validation record"):
        resolve_training_data(task_context(DAG_ID, "manual__4", "train"), audit, "0" * 64)
