"""Stage 2, training and registration, against a real SQLite MLflow registry under tmp_path.

The classifier (ctr_recommender on synthetic clicks) and the regressor (diabetes_progression on the
diabetes data scikit-learn ships) are each trained once for the module; the tests read what that wrote.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import pandas as pd
import pytest
import sklearn
import yaml

from modelops.assets import MODEL_CANDIDATE
from modelops.audit import AuditStore
from modelops.data.sklearn_datasets import write_diabetes_csv
from modelops.data.synthetic import generate_clicks, write_csv
from modelops.errors import TrainingError, UnknownModel
from modelops.operators.training import TrainModelOperator
from modelops.operators.validation import ValidateDatasetOperator
from modelops.registry import ModelRegistry
from modelops.settings import PROJECT_ROOT, TASK_METRICS, Catalog, EstimatorSpec, ModelSpec, load_catalog
from modelops.stages.training import (
    TrainingResult,
    build_pipeline,
    code_commit,
    holdout_metrics,
    model_tags,
    plan_training,
    split_frame,
    train_and_register,
    training_data,
    untrained_datasets,
    untrusted_types,
)
from modelops.vocabulary import (
    Alias,
    AuditAction,
    Decision,
    EventField,
    ModelTag,
    Tag,
    Trigger,
    dataset_subject,
    model_subject,
)
from tests.support import keyring_for_tests, mlflow_client, use_sqlite_registry

# skops resolves names through module attributes, which trips Airflow's deprecated-import shims.
pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore:Hint. Inferred schema contains integer column:UserWarning"
)

ROWS = 3000
DIABETES_ROWS = 442
DAG_ID = "modelops_training"
RUN_ID = "manual__train-1"
CTR, DIABETES = "ctr_recommender", "diabetes_progression"
TREE_PREDICTOR = "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"
LINEAGE_TAGS = {
    Tag.TRAIN_DATA_SHA256,
    Tag.TRAIN_DATA_URI,
    Tag.DATASET,
    Tag.FRAMEWORK,
    Tag.FRAMEWORK_VERSION,
    Tag.PYTHON_VERSION,
    Tag.CODE_COMMIT,
    Tag.AIRFLOW_DAG_ID,
    Tag.AIRFLOW_RUN_ID,
    Tag.TRIGGER,
    Tag.MODEL_SPEC,
    Tag.TASK,
    Tag.ESTIMATOR,
    Tag.SKOPS_TRUSTED_TYPES,
}


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
class Data:
    csv: Path
    sha256: str
    frame: pd.DataFrame


@dataclass(frozen=True)
class Trained:
    root: Path
    tracking_uri: str
    registry: ModelRegistry
    experiment_ids: dict[str, str]
    catalog: Catalog
    data: dict[str, Data]
    """model name -> the data it was trained on"""
    results: dict[str, TrainingResult]
    """model name -> what train_and_register returned"""
    global_uri_before: str
    global_uri_after: str

    def spec(self, name: str) -> ModelSpec:
        return self.catalog.model(name)


def data_of(csv: Path) -> Data:
    return Data(csv, hashlib.sha256(csv.read_bytes()).hexdigest(), pd.read_csv(csv))


def register(
    registry: ModelRegistry, catalog: Catalog, spec: ModelSpec, data: Data, **overrides: Any
) -> TrainingResult:
    """``train_and_register`` as the fixture calls it, with ``overrides`` for what a test changes."""
    arguments: dict[str, Any] = {
        "registry": registry,
        "spec": spec,
        "catalog": catalog,
        "frame": data.frame,
        "dataset_sha256": data.sha256,
        "dataset_uri": data.csv.as_uri(),
        "trigger": Trigger.NEW_DATA,
        "dag_id": DAG_ID,
        "run_id": RUN_ID,
    }
    return train_and_register(**{**arguments, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """One registry for the module, and one version of each model trained by ``train_and_register`` (the
    expensive part)."""
    root = tmp_path_factory.mktemp("training")
    with pytest.MonkeyPatch.context() as patch:
        tracking_uri, registry, experiment_ids = use_sqlite_registry(root, patch)
        patch.setenv("MODELOPS_CODE_COMMIT", "0123abc-test")
        # MLflow infers a saved model's pip requirements by loading it in a subprocess: seconds per save
        # on a busy machine, for a result no test here reads. Cut short, it falls back to its defaults.
        patch.setenv("MLFLOW_REQUIREMENTS_INFERENCE_TIMEOUT", "1")
        catalog = load_catalog()
        write_diabetes_csv(root / "diabetes.csv")
        data = {
            CTR: data_of(write_csv(generate_clicks(ROWS, seed=7), root / "clicks.csv")),
            DIABETES: data_of(root / "diabetes.csv"),
        }
        before = mlflow.get_tracking_uri()
        results = {
            name: register(registry, catalog, catalog.model(name), data[name]) for name in (CTR, DIABETES)
        }
        after = mlflow.get_tracking_uri()
        yield Trained(root, tracking_uri, registry, experiment_ids, catalog, data, results, before, after)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def versions_of(trained: Trained, name: str) -> list[str]:
    return [version.version for version in trained.registry.versions(name)]


def with_estimator(spec: ModelSpec, class_path: str, **params: Any) -> ModelSpec:
    return spec.model_copy(update={"estimator": EstimatorSpec(class_path=class_path, params=params)})


# --- pure parts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "class_path", ["sklearn.ensemble.NoSuchClassifier", "no_such_package.models.Classifier"]
)
def test_build_pipeline_with_a_bad_class_path_names_it(catalog: Catalog, class_path: str) -> None:
    with pytest.raises(TrainingError) as raised:
        build_pipeline(with_estimator(catalog.model(CTR), class_path))
    message = str(raised.value)
    assert class_path in message and "'ctr_recommender'" in message


def test_build_pipeline_with_bad_params_names_them(catalog: Catalog) -> None:
    spec = with_estimator(catalog.model(CTR), "sklearn.linear_model.LogisticRegression", no_such_param=3)
    with pytest.raises(TrainingError, match=r"LogisticRegression with params \{'no_such_param': 3\}"):
        build_pipeline(spec)


@pytest.mark.parametrize("name", [CTR, DIABETES])
def test_build_pipeline_builds_the_spec(catalog: Catalog, name: str) -> None:
    spec = catalog.model(name)
    pipeline = build_pipeline(spec)
    assert [step for step, _ in pipeline.steps] == ["features", "estimator"]
    estimator = pipeline.named_steps["estimator"]
    assert f"{type(estimator).__module__}.{type(estimator).__name__}".startswith("sklearn.")
    assert type(estimator).__name__ == spec.estimator.class_path.rsplit(".", 1)[1]
    assert {key: estimator.get_params()[key] for key in spec.estimator.params} == spec.estimator.params


def test_split_frame_names_the_missing_columns(catalog: Catalog) -> None:
    frame = generate_clicks(200, seed=1).drop(columns=["device", "clicked"])
    with pytest.raises(TrainingError) as raised:
        split_frame(frame, catalog.model(CTR))
    assert "['device', 'clicked']" in str(raised.value) and "'ctr_recommender'" in str(raised.value)


def test_split_frame_is_a_seeded_stratified_holdout(catalog: Catalog) -> None:
    spec = catalog.model(CTR)
    frame = generate_clicks(1000, seed=1)
    x_train, x_holdout, y_train, y_holdout = split_frame(frame, spec)
    assert (len(x_train), len(x_holdout)) == (800, 200)
    assert list(x_train.columns) == spec.features
    assert abs(y_train.mean() - y_holdout.mean()) < 0.01
    again = split_frame(frame, spec)
    assert list(again[1].index) == list(x_holdout.index)


def test_split_frame_of_a_regression_is_seeded(catalog: Catalog, tmp_path: Path) -> None:
    spec = catalog.model(DIABETES)
    write_diabetes_csv(tmp_path / "diabetes.csv")
    frame = pd.read_csv(tmp_path / "diabetes.csv")
    x_train, x_holdout, y_train, y_holdout = split_frame(frame, spec)
    assert (
        len(x_holdout) == math.ceil(DIABETES_ROWS * spec.holdout_fraction)
        and len(x_train) + len(x_holdout) == DIABETES_ROWS
    )
    assert list(x_train.columns) == spec.features and y_train.name == "progression"
    assert list(split_frame(frame, spec)[1].index) == list(x_holdout.index)


def test_holdout_metrics_are_those_of_the_task_kind(catalog: Catalog, tmp_path: Path) -> None:
    regression = catalog.model(DIABETES)
    write_diabetes_csv(tmp_path / "diabetes.csv")
    x_train, x_holdout, y_train, y_holdout = split_frame(pd.read_csv(tmp_path / "diabetes.csv"), regression)
    model = build_pipeline(regression).fit(x_train, y_train)
    metrics = holdout_metrics(regression, model, x_holdout, y_holdout)
    assert tuple(metrics) == TASK_METRICS["regression"] == regression.metrics
    errors = model.predict(x_holdout) - y_holdout
    assert metrics["holdout_rmse"] == pytest.approx(float((errors**2).mean() ** 0.5), abs=1e-5)
    assert metrics["holdout_mae"] == pytest.approx(float(errors.abs().mean()), abs=1e-5)
    assert metrics["holdout_target_mean"] == pytest.approx(float(y_holdout.mean()), abs=1e-5)
    assert metrics["holdout_rows"] == len(y_holdout) and 0 < metrics["holdout_r2"] < 1

    classification = catalog.model(CTR)
    x_train, x_holdout, y_train, y_holdout = split_frame(generate_clicks(600, seed=2), classification)
    model = build_pipeline(with_estimator(classification, classification.estimator.class_path, max_iter=5))
    model.fit(x_train, y_train)
    metrics = holdout_metrics(classification, model, x_holdout, y_holdout)
    assert tuple(metrics) == TASK_METRICS["binary_classification"] == classification.metrics
    assert metrics["holdout_positive_rate"] == pytest.approx(float(y_holdout.mean()), abs=1e-5)
    assert 0 <= metrics["holdout_accuracy"] <= 1 and metrics["holdout_rows"] == len(y_holdout)


def test_untrusted_types_lists_what_the_spec_does_not_review(catalog: Catalog) -> None:
    spec = catalog.model(CTR)
    x_train, _, y_train, _ = split_frame(generate_clicks(600, seed=2), spec)
    pipeline = build_pipeline(with_estimator(spec, spec.estimator.class_path, max_iter=5))
    pipeline.fit(x_train, y_train)
    assert untrusted_types(pipeline, spec.skops_trusted_types) == []
    assert untrusted_types(pipeline, []) == [TREE_PREDICTOR]


def test_model_tags_carry_ownership_and_governance(catalog: Catalog) -> None:
    assert model_tags(catalog.model(CTR), catalog) == {
        ModelTag.OWNER: "ml-platform@example.com",
        ModelTag.TEAM: "growth-marketing",
        ModelTag.DEPARTMENT: "retail",
        ModelTag.RISK_TIER: "medium",
        ModelTag.COMPLIANCE_LABELS: '["GDPR"]',
        ModelTag.TASK: "binary_classification",
        ModelTag.DATASET: "ctr_clicks",
        ModelTag.COMPLIANCE_POLICY: "standard@3",
        ModelTag.MONITORING_POLICY: "standard",
        ModelTag.RETIREMENT_POLICY: "standard",
    }
    tags = model_tags(catalog.model(DIABETES), catalog)
    assert set(tags) == set(ModelTag)
    assert json.loads(tags[ModelTag.COMPLIANCE_LABELS]) == ["GDPR", "HIPAA"]
    assert (tags[ModelTag.RISK_TIER], tags[ModelTag.TASK], tags[ModelTag.DATASET]) == (
        "high",
        "regression",
        "diabetes",
    )
    assert (
        tags[ModelTag.COMPLIANCE_POLICY],
        tags[ModelTag.MONITORING_POLICY],
        tags[ModelTag.RETIREMENT_POLICY],
    ) == ("strict@2", "sensitive", "long-retention")


def test_code_commit_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELOPS_CODE_COMMIT", "feedbeef")
    assert code_commit() == "feedbeef"
    monkeypatch.delenv("MODELOPS_CODE_COMMIT")
    commit = code_commit()
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit) or commit.startswith("unknown: "), commit


# --- training and registration -------------------------------------------------------------------


@pytest.mark.parametrize("name", [CTR, DIABETES])
def test_train_and_register_tags_the_version_with_its_lineage(trained: Trained, name: str) -> None:
    spec, data, result = trained.spec(name), trained.data[name], trained.results[name]
    assert result.reused is False and result.version == "1" and result.model_name == name

    version = trained.registry.version(name, result.version)
    tags = version.tags
    assert tags == result.tags and set(tags) == LINEAGE_TAGS
    assert tags == {
        Tag.TRAIN_DATA_SHA256: data.sha256,
        Tag.TRAIN_DATA_URI: data.csv.as_uri(),
        Tag.DATASET: spec.dataset,
        Tag.FRAMEWORK: "scikit-learn",
        Tag.FRAMEWORK_VERSION: sklearn.__version__,
        Tag.PYTHON_VERSION: platform.python_version(),
        Tag.CODE_COMMIT: "0123abc-test",
        Tag.AIRFLOW_DAG_ID: DAG_ID,
        Tag.AIRFLOW_RUN_ID: RUN_ID,
        Tag.TRIGGER: Trigger.NEW_DATA,
        Tag.MODEL_SPEC: name,
        Tag.TASK: spec.task,
        Tag.ESTIMATOR: spec.estimator.class_path,
        Tag.SKOPS_TRUSTED_TYPES: json.dumps(spec.skops_trusted_types),
    }
    # Everything the model's compliance policy demands is there.
    required = trained.catalog.policies_for(spec).compliance.settings_of("tags").required
    assert all(tags.get(tag) for tag in required)

    assert trained.registry.version_by_alias(name, Alias.CANDIDATE).version == result.version
    assert version.aliases == (Alias.CANDIDATE,)


@pytest.mark.parametrize("name", [CTR, DIABETES])
def test_the_registered_model_carries_the_spec_tags(trained: Trained, name: str) -> None:
    spec = trained.spec(name)
    info = trained.registry.model(name)
    assert info is not None and info.tags == model_tags(spec, trained.catalog)
    assert set(info.tags) == set(ModelTag)
    assert info.tags[ModelTag.OWNER] == spec.owner and info.tags[ModelTag.TASK] == spec.task
    assert info.tags[ModelTag.DATASET] == spec.dataset
    assert (
        mlflow_client(trained.tracking_uri).get_registered_model(name).description == spec.description.strip()
    )


@pytest.mark.parametrize("name", [CTR, DIABETES])
def test_each_model_logs_to_its_own_experiment_with_the_metrics_of_its_task(
    trained: Trained, name: str
) -> None:
    spec, result = trained.spec(name), trained.results[name]
    client = mlflow_client(trained.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.experiment_id == trained.experiment_ids[name]
    assert client.get_experiment(run.info.experiment_id).name == spec.experiment_name == f"modelops/{name}"
    # Artifacts landed under the test's root, not in ./mlruns.
    assert run.info.artifact_uri.startswith((trained.root / "artifacts" / name).as_uri())
    assert trained.registry.version(name, result.version).run_id == result.run_id

    assert run.data.metrics == result.metrics
    assert tuple(result.metrics) == TASK_METRICS[spec.task]
    rows = len(trained.data[name].frame)
    holdout = result.metrics["holdout_rows"]
    assert holdout == pytest.approx(rows * spec.holdout_fraction, abs=1)
    assert run.data.params["train_rows"] == str(int(rows - holdout))
    assert run.data.params["estimator"] == spec.estimator.class_path
    assert run.data.tags[Tag.AIRFLOW_RUN_ID] == RUN_ID and run.data.tags[Tag.TASK] == spec.task
    # Good enough to pass the model's own bounds.
    for metric, bound in spec.metric_thresholds.items():
        assert bound.min is None or result.metrics[metric] >= bound.min, metric
        assert bound.max is None or result.metrics[metric] <= bound.max, metric


def test_the_regressor_logs_regression_metrics(trained: Trained) -> None:
    metrics = trained.results[DIABETES].metrics
    assert {"holdout_rmse", "holdout_mae", "holdout_r2", "holdout_target_mean"} <= set(metrics)
    assert not {"holdout_roc_auc", "holdout_log_loss"} & set(metrics)
    assert 30 < metrics["holdout_rmse"] < 70 and metrics["holdout_mae"] < metrics["holdout_rmse"]
    assert 100 < metrics["holdout_target_mean"] < 200


def test_training_leaves_the_process_wide_tracking_uri_alone(trained: Trained) -> None:
    assert trained.global_uri_after == trained.global_uri_before
    assert mlflow.get_tracking_uri() == trained.global_uri_before != trained.tracking_uri
    assert trained.registry.model_names() == [CTR, DIABETES]


def test_the_classifier_loads_with_its_reviewed_types_and_gives_probabilities(
    trained: Trained, tmp_path: Path
) -> None:
    spec = trained.spec(CTR)
    model = trained.registry.load_pyfunc(CTR, trained.results[CTR].version, tmp_path)
    proba = model.predict(trained.data[CTR].frame[spec.features].head(5))
    assert proba.shape == (5, 2)
    assert ((proba >= 0) & (proba <= 1)).all() and abs(proba.sum(axis=1) - 1).max() < 1e-9


def test_the_regressor_loads_and_predicts_progression(trained: Trained, tmp_path: Path) -> None:
    spec = trained.spec(DIABETES)
    model = trained.registry.load_pyfunc(DIABETES, trained.results[DIABETES].version, tmp_path)
    rows = trained.data[DIABETES].frame.head(20)
    predicted = pd.Series(model.predict(rows[spec.features])).to_numpy()
    assert predicted.shape == (20,)
    assert (predicted > 0).all() and (predicted < 400).all()
    # Closer to the truth than always predicting the mean.
    truth = rows[spec.target].to_numpy()
    assert abs(predicted - truth).mean() < abs(truth.mean() - truth).mean()


@pytest.mark.parametrize("name", [CTR, DIABETES])
def test_a_retry_of_the_same_run_returns_the_same_version(trained: Trained, name: str) -> None:
    client, first = mlflow_client(trained.tracking_uri), trained.results[name]
    runs_before = len(client.search_runs([trained.experiment_ids[name]]))
    versions_before = versions_of(trained, name)
    # Someone moved the candidate alias away between the tries; the retry puts it back.
    trained.registry.delete_alias(name, Alias.CANDIDATE)
    assert trained.registry.version_by_alias(name, Alias.CANDIDATE) is None
    again = register(trained.registry, trained.catalog, trained.spec(name), trained.data[name])
    assert again.reused is True
    assert (again.version, again.run_id, again.tags) == (first.version, first.run_id, first.tags)
    assert again.metrics == first.metrics
    assert again.version == "1" and versions_of(trained, name) == versions_before
    assert len(client.search_runs([trained.experiment_ids[name]])) == runs_before
    assert trained.registry.version_by_alias(name, Alias.CANDIDATE).version == "1"


def test_unreviewed_types_refuse_training_naming_the_type_and_the_spec_file(trained: Trained) -> None:
    client = mlflow_client(trained.tracking_uri)
    runs_before = len(client.search_runs([trained.experiment_ids[CTR]]))
    versions_before = versions_of(trained, CTR)
    spec = trained.spec(CTR)
    spec = with_estimator(spec, spec.estimator.class_path, max_iter=5)
    spec = spec.model_copy(update={"skops_trusted_types": []})
    with pytest.raises(TrainingError) as raised:
        register(
            trained.registry,
            trained.catalog,
            spec,
            trained.data[CTR],
            frame=trained.data[CTR].frame.head(600),
            trigger=Trigger.MANUAL,
            run_id="manual__untrusted",
        )
    message = str(raised.value)
    assert TREE_PREDICTOR in message
    assert "skops_trusted_types" in message and str(trained.catalog.source_of("models", CTR)) in message
    # Refused before anything was logged or registered.
    assert versions_of(trained, CTR) == versions_before
    assert len(client.search_runs([trained.experiment_ids[CTR]])) == runs_before


# --- what to train -------------------------------------------------------------------------------


def plan(catalog: Catalog, **kwargs: Any) -> list[dict[str, Any]]:
    arguments: dict[str, Any] = {
        "dataset_events": [],
        "retraining_events": [],
        "model": None,
        "dataset_sha256": None,
    }
    return plan_training(catalog=catalog, **{**arguments, **kwargs})


def dataset_event(dataset: str, sha: str) -> dict[str, Any]:
    return {EventField.DATASET: dataset, EventField.SHA256: sha, "snapshot_uri": f"/s/{sha}/data.csv"}


def retraining_event(model: str) -> dict[str, Any]:
    return {EventField.MODEL_NAME: model, EventField.VERSION: "3", "verdict": "critical", "reason": "drift"}


def test_a_dataset_event_trains_every_model_naming_that_dataset_and_none_other(tmp_path: Path) -> None:
    include = Path(shutil.copytree(PROJECT_ROOT / "include", tmp_path / "include"))
    second = yaml.safe_load((include / "models" / "ctr_recommender.yaml").read_text())
    second["name"] = "ctr_ranker"
    (include / "models" / "ctr_ranker.yaml").write_text(yaml.safe_dump(second))
    catalog = load_catalog(include)

    new_data = Trigger.NEW_DATA.value
    assert plan(catalog, dataset_events=[dataset_event("ctr_clicks", "c" * 64)]) == [
        {"model": "ctr_ranker", "dataset_sha256": "c" * 64, "trigger": new_data},
        {"model": CTR, "dataset_sha256": "c" * 64, "trigger": new_data},
    ]
    assert plan(catalog, dataset_events=[dataset_event("diabetes", "d" * 64)]) == [
        {"model": DIABETES, "dataset_sha256": "d" * 64, "trigger": new_data}
    ]
    # Two versions of one dataset in one run: the newer event wins.
    both = plan(
        catalog,
        dataset_events=[dataset_event("diabetes", "1" * 64), dataset_event("diabetes", "2" * 64)],
    )
    assert both == [{"model": DIABETES, "dataset_sha256": "2" * 64, "trigger": new_data}]
    # A dataset no model trains on, or an event without its fields, trains nothing.
    assert plan(catalog, dataset_events=[dataset_event("weather", "e" * 64), {"dataset": "diabetes"}]) == []


def test_a_retraining_event_trains_only_its_model(catalog: Catalog) -> None:
    assert plan(catalog, retraining_events=[retraining_event(DIABETES)]) == [
        {"model": DIABETES, "dataset_sha256": None, "trigger": Trigger.RETRAINING_REQUEST.value}
    ]
    # New data for the same model in the same run wins: it names the version to train on.
    mixed = plan(
        catalog,
        dataset_events=[dataset_event("ctr_clicks", "c" * 64)],
        retraining_events=[retraining_event(CTR), retraining_event(DIABETES)],
    )
    assert mixed == [
        {"model": CTR, "dataset_sha256": "c" * 64, "trigger": Trigger.NEW_DATA.value},
        {"model": DIABETES, "dataset_sha256": None, "trigger": Trigger.RETRAINING_REQUEST.value},
    ]


def test_events_about_unknown_models_are_ignored(catalog: Catalog) -> None:
    assert plan(catalog, retraining_events=[retraining_event("someone_elses_model"), {"verdict": "x"}]) == []
    # Even with a model in the form: an event-triggered run trains what the events name.
    assert plan(catalog, retraining_events=[retraining_event("ghost")], model=CTR) == []


def test_a_manual_run_needs_a_model(catalog: Catalog) -> None:
    with pytest.raises(TrainingError, match="a manual training run needs a model"):
        plan(catalog)
    assert plan(catalog, model=DIABETES) == [
        {"model": DIABETES, "dataset_sha256": None, "trigger": Trigger.MANUAL.value}
    ]
    assert plan(catalog, model=CTR, dataset_sha256="f" * 64) == [
        {"model": CTR, "dataset_sha256": "f" * 64, "trigger": Trigger.MANUAL.value}
    ]
    with pytest.raises(UnknownModel, match="'ghost'"):
        plan(catalog, model="ghost")


# --- which data to train on ----------------------------------------------------------------------


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditStore]:
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}", keyring=keyring_for_tests())
    yield store
    store.dispose()


def validated(
    store: AuditStore, sha: str, dataset: str, decision: Decision = Decision.PASSED, **details: Any
):
    return store.append(
        actor="test",
        action=AuditAction.DATASET_VALIDATED,
        subject=dataset_subject(sha),
        decision=decision,
        details={"dataset": dataset, "snapshot_uri": f"/snapshots/{dataset}/{sha}/data.csv", **details},
    )


def test_retraining_takes_the_newest_version_of_the_models_own_dataset(
    catalog: Catalog, audit: AuditStore
) -> None:
    """A regression test: retraining once took the newest validated dataset of any kind, so a diabetes
    file validated after the clicks would have been fed to the click model."""
    validated(audit, "a" * 64, "ctr_clicks")
    validated(audit, "b" * 64, "ctr_clicks")
    validated(audit, "c" * 64, "ctr_clicks", Decision.FAILED)
    validated(audit, "d" * 64, "diabetes")  # another dataset, validated last

    sha, details = training_data(audit, catalog.model(CTR), None)
    assert sha == "b" * 64 and details["dataset"] == "ctr_clicks"
    assert details["snapshot_uri"] == f"/snapshots/ctr_clicks/{'b' * 64}/data.csv"
    sha, details = training_data(audit, catalog.model(DIABETES), None)
    assert sha == "d" * 64 and details["dataset"] == "diabetes"
    # An explicit version of the model's own dataset, older than the newest, is taken as given.
    assert training_data(audit, catalog.model(CTR), "a" * 64)[0] == "a" * 64


def test_training_data_refuses_what_did_not_pass_as_the_models_dataset(
    catalog: Catalog, audit: AuditStore
) -> None:
    with pytest.raises(TrainingError, match=r"no version of dataset 'diabetes' \(the dataset model"):
        training_data(audit, catalog.model(DIABETES), None)
    validated(audit, "d" * 64, "diabetes")
    validated(audit, "c" * 64, "ctr_clicks", Decision.FAILED)
    with pytest.raises(TrainingError, match=r"no version of dataset 'ctr_clicks'"):
        training_data(audit, catalog.model(CTR), None)
    # Another dataset's version is not the click model's data, however valid.
    with pytest.raises(TrainingError) as raised:
        training_data(audit, catalog.model(CTR), "d" * 64)
    assert f"dataset sha256 {'d' * 64} has no passing validation record as dataset 'ctr_clicks'" in str(
        raised.value
    )
    with pytest.raises(TrainingError, match="has no passing validation record"):
        training_data(audit, catalog.model(CTR), "c" * 64)
    validated(audit, "e" * 64, "ctr_clicks", snapshot_uri=None)
    with pytest.raises(TrainingError, match="names no snapshot to train on"):
        training_data(audit, catalog.model(CTR), None)


# --- operator ------------------------------------------------------------------------------------


def validate_through_operator(data: Data, dataset: str, run_id: str) -> dict[str, Any]:
    # The test's files live in its own folder: allow it as a dataset root, as a platform team would.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODELOPS_DATASET_ROOT", str(data.csv.parent))
        operator = ValidateDatasetOperator(task_id="validate", dataset=dataset, dataset_uri=str(data.csv))
        return operator.execute(task_context("modelops_data_validation", run_id, "validate"))


def test_operator_without_a_validated_dataset_refuses(trained: Trained, modelops_home: Path) -> None:
    versions_before = versions_of(trained, CTR)
    operator = TrainModelOperator(task_id="train", model=CTR)
    with pytest.raises(TrainingError, match="no version of dataset 'ctr_clicks'"):
        operator.execute(task_context(DAG_ID, "manual__nodata", "train"))
    explicit = TrainModelOperator(task_id="train", model=CTR, dataset_sha256="f" * 64)
    with pytest.raises(TrainingError, match=f"dataset sha256 {'f' * 64} has no passing validation record"):
        explicit.execute(task_context(DAG_ID, "manual__nodata", "train"))
    assert versions_of(trained, CTR) == versions_before


def test_operator_retry_on_a_validated_dataset_reuses_the_version_and_records_it(
    trained: Trained, modelops_home: Path
) -> None:
    data = trained.data[CTR]
    lineage = validate_through_operator(data, "ctr_clicks", "manual__v")
    assert lineage["sha256"] == data.sha256

    context = task_context(DAG_ID, RUN_ID, "train")
    operator = TrainModelOperator(
        task_id="train",
        model=CTR,
        dataset_sha256=data.sha256,
        trigger=Trigger.NEW_DATA.value,
        outlets=[MODEL_CANDIDATE],
    )
    result = operator.execute(context)
    json.dumps(result)
    assert result["reused"] is True and result["version"] == trained.results[CTR].version
    assert result["decision"] == Decision.CANDIDATE and "trigger new_data" in result["summary"]
    extra = context["outlet_events"][MODEL_CANDIDATE].extra
    assert extra == {"model_name": CTR, "version": "1", "train_data_sha256": data.sha256}
    assert all(type(key) is str and type(value) is str for key, value in extra.items())
    store = AuditStore(f"sqlite:///{modelops_home}/audit.db", keyring=keyring_for_tests())
    try:
        record = store.last(action=AuditAction.MODEL_REGISTERED)
        assert record.decision == Decision.CANDIDATE and record.subject == model_subject(CTR, 1)
        assert (record.dag_id, record.run_id, record.task_id) == (DAG_ID, RUN_ID, "train")
        assert (
            record.details["trigger"] == "new_data"
            and record.details["experiment"] == "modelops/ctr_recommender"
        )
        assert record.details["run_id"] == trained.results[CTR].run_id
        assert record.evidence["dataset"] == data.sha256
        assert store.verify().ok
    finally:
        store.dispose()
    assert versions_of(trained, CTR) == ["1"]


def test_operator_retraining_trains_on_its_own_dataset_when_another_was_validated_later(
    trained: Trained, modelops_home: Path
) -> None:
    diabetes, clicks = trained.data[DIABETES], trained.data[CTR]
    diabetes_lineage = validate_through_operator(diabetes, "diabetes", "manual__v-diabetes")
    store = AuditStore(f"sqlite:///{modelops_home}/audit.db", keyring=keyring_for_tests())
    try:  # a version of another dataset passes validation later
        validated(store, clicks.sha256, "ctr_clicks")
    finally:
        store.dispose()

    context = task_context(DAG_ID, "asset_triggered__retrain", "train")
    operator = TrainModelOperator(
        task_id="train", model=DIABETES, trigger=Trigger.RETRAINING_REQUEST.value, outlets=[MODEL_CANDIDATE]
    )
    result = operator.execute(context)
    assert result["reused"] is False and result["dataset_sha256"] == diabetes.sha256
    version = trained.registry.version(DIABETES, result["version"])
    assert int(version.version) > 1
    assert version.tags[Tag.TRAIN_DATA_SHA256] == diabetes.sha256
    assert version.tags[Tag.TRAIN_DATA_URI] == diabetes_lineage["snapshot_uri"]
    assert version.tags[Tag.TRIGGER] == Trigger.RETRAINING_REQUEST
    assert version.tags[Tag.DATASET] == "diabetes" and version.tags[Tag.TASK] == "regression"
    assert trained.registry.version_by_alias(DIABETES, Alias.CANDIDATE).version == version.version
    assert context["outlet_events"][MODEL_CANDIDATE].extra == {
        "model_name": DIABETES,
        "version": version.version,
        "train_data_sha256": diabetes.sha256,
    }
    store = AuditStore(f"sqlite:///{modelops_home}/audit.db", keyring=keyring_for_tests())
    try:
        record = store.last(action=AuditAction.MODEL_REGISTERED)
        assert record.subject == model_subject(DIABETES, version.version)
        assert record.details["trigger"] == "retraining_request"
        assert set(record.details["metrics"]) == set(TASK_METRICS["regression"])
        assert record.evidence["dataset"] == diabetes.sha256
    finally:
        store.dispose()


def test_an_event_triggered_run_catches_up_on_validated_data_no_run_trained_on(
    trained: Trained, audit: AuditStore
) -> None:
    """A regression test: the demo's validation run emitted two events 0.14 s apart, Airflow 3.3 started
    the training run between them and queued no run for the second, so one model never trained."""
    clicks, diabetes = trained.data[CTR].sha256, "e" * 64
    validated(audit, clicks, "ctr_clicks")  # trained on, by the fixture
    validated(audit, diabetes, "diabetes")  # validated, its event never consumed
    untrained = untrained_datasets(trained.catalog, audit, trained.registry)
    assert untrained == {DIABETES: diabetes}

    new_data = Trigger.NEW_DATA.value
    assert plan(
        trained.catalog, dataset_events=[dataset_event("ctr_clicks", clicks)], untrained=untrained
    ) == [
        {"model": CTR, "dataset_sha256": clicks, "trigger": new_data},
        {"model": DIABETES, "dataset_sha256": diabetes, "trigger": new_data},
    ]
    # A retraining request wakes the catch-up too; a manual run trains only the form's model.
    assert plan(trained.catalog, retraining_events=[retraining_event(CTR)], untrained=untrained)[1] == {
        "model": DIABETES,
        "dataset_sha256": diabetes,
        "trigger": new_data,
    }
    assert plan(trained.catalog, model=CTR, untrained=untrained) == [
        {"model": CTR, "dataset_sha256": None, "trigger": Trigger.MANUAL.value}
    ]
    # Data someone withdrew is not caught up on.
    audit.append(
        actor="test",
        action=AuditAction.DATASET_QUARANTINED,
        subject=dataset_subject(diabetes),
        decision=Decision.QUARANTINED,
        details={"reason": "consent withdrawn"},
    )
    assert untrained_datasets(trained.catalog, audit, trained.registry) == {}


def test_an_event_for_data_a_version_was_already_trained_on_trains_nothing_more(catalog: Catalog) -> None:
    event = dataset_event("diabetes", "d" * 64)
    assert plan(catalog, dataset_events=[event], trained_on=lambda model, sha: True) == []
    assert plan(catalog, dataset_events=[event], trained_on=lambda model, sha: False) == [
        {"model": DIABETES, "dataset_sha256": "d" * 64, "trigger": Trigger.NEW_DATA.value}
    ]
