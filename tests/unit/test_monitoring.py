"""Stage 5, drift monitoring: verdicts from real Evidently runs on synthetic windows (a classifier with
categorical features and a regression model with numeric features only), the out-of-range share,
determinism, the monitoring window, the whole stage against a real SQLite MLflow registry and a real
prediction log, which models a run assesses, retraining requests, and both operators."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pendulum
import pytest
import sqlalchemy as sa
from airflow.sdk.exceptions import AirflowSkipException
from mlflow import MlflowClient

from modelops.assets import RETRAINING_REQUEST
from modelops.audit import AuditStore
from modelops.data.sklearn_datasets import write_diabetes_csv
from modelops.data.synthetic import DriftShift, generate_clicks
from modelops.errors import MonitoringError, UnknownModel
from modelops.operators.monitoring import DriftMonitorOperator, RequestRetrainingOperator
from modelops.registry import ModelRegistry
from modelops.serving.prediction_log import PredictionLog, PredictionRecord
from modelops.settings import Catalog, ModelSpec, MonitoringPolicy, ServingSpec, load_catalog
from modelops.stages.monitoring import (
    assess,
    assess_drift,
    monitoring_window,
    out_of_range,
    plan_monitoring,
    retraining_request,
)
from modelops.storage import as_storage_path
from modelops.vocabulary import DRIFT_RUN_KIND, Alias, AuditAction, Decision, RunTag, Tag
from tests.support import keyring_for_tests

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

WINDOW_ROWS = 400
CTR = "ctr_recommender"
DIABETES = "diabetes_progression"
TEST_EXPERIMENT = "modelops-tests/monitoring"
START = datetime(2026, 3, 1, 10, tzinfo=UTC)
END = START + timedelta(hours=1)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="module")
def spec(catalog: Catalog) -> ModelSpec:
    return catalog.model(CTR)


@pytest.fixture(scope="module")
def policy(catalog: Catalog, spec: ModelSpec) -> MonitoringPolicy:
    return catalog.policies_for(spec).monitoring


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return generate_clicks(3000, seed=7)


@pytest.fixture(scope="module")
def stationary() -> pd.DataFrame:
    return generate_clicks(WINDOW_ROWS, seed=11)


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("diabetes") / "diabetes.csv"
    write_diabetes_csv(path)
    return path


def is_html(path: Path) -> bool:
    return path.read_text().lstrip().lower().startswith("<!doctype html>")


# --- verdicts ------------------------------------------------------------------------------------


def test_too_few_rows_is_insufficient_data_without_a_report(
    tmp_path: Path, spec, policy, reference, stationary
) -> None:
    html = tmp_path / "report.html"
    short = stationary.head(policy.min_rows - 1)
    assessment = assess_drift(
        current=short, reference=reference, spec=spec, policy=policy, html_path=str(html)
    )
    assert assessment.verdict == "insufficient_data"
    assert (assessment.rows, assessment.reference_rows) == (policy.min_rows - 1, len(reference))
    assert assessment.reasons == [
        f"{policy.min_rows - 1} rows in the window, fewer than min_rows={policy.min_rows}"
    ]
    # Evidently never ran: no scores, no shares, no HTML.
    assert assessment.drift_share is None and assessment.feature_scores == {}
    assert assessment.out_of_range_share is None
    assert not html.exists()


def test_stationary_traffic_is_ok_and_the_report_is_written(
    tmp_path: Path, spec, policy, reference, stationary
) -> None:
    html = tmp_path / "report.html"
    assessment = assess_drift(
        current=stationary, reference=reference, spec=spec, policy=policy, html_path=str(html)
    )
    assert assessment.verdict == "ok", assessment.to_dict()
    assert assessment.rows == WINDOW_ROWS and assessment.reference_rows == len(reference)
    assert assessment.drift_share is not None and assessment.drift_share < policy.drift_share_warning
    assert assessment.out_of_range_share < policy.out_of_range_share_critical
    assert assessment.reasons == ["no feature drifted beyond the thresholds"]
    assert set(assessment.feature_scores) == set(spec.features)
    for column in spec.numeric_features:
        assert assessment.feature_scores[column]["method"] == policy.numerical_method
        assert assessment.feature_scores[column]["threshold"] == policy.numerical_threshold
    for column in spec.categorical_features:
        assert assessment.feature_scores[column]["method"] == policy.categorical_method
    assert is_html(html)
    json.dumps(assessment.to_dict())


def test_older_users_out_of_the_training_range_are_critical(tmp_path: Path, spec, policy, reference) -> None:
    shifted = generate_clicks(WINDOW_ROWS, seed=11, shift=DriftShift(age_shift=15, out_of_range_share=0.2))
    html = tmp_path / "drift.html"
    assessment = assess_drift(
        current=shifted, reference=reference, spec=spec, policy=policy, html_path=str(html)
    )
    assert assessment.verdict == "critical", assessment.to_dict()
    assert "user_age" in assessment.drifted_features
    assert assessment.feature_scores["user_age"]["value"] > 1.0  # far beyond the 0.25 threshold
    assert assessment.out_of_range_share >= policy.out_of_range_share_critical
    assert assessment.out_of_range_features["user_age"] > 0
    assert any("outside the training range" in reason for reason in assessment.reasons)
    assert is_html(html)


def test_a_moderate_share_of_drifted_features_is_a_warning(spec, policy, reference, stationary) -> None:
    # Two of seven features move (2/7 = 0.29: at least the warning share 0.25, below critical 0.5);
    # the numeric columns stay as they were, so only the odd row lies outside the training range.
    current = stationary.assign(device="desktop", item_category="books")
    assessment = assess_drift(current=current, reference=reference, spec=spec, policy=policy)
    assert assessment.verdict == "warning", assessment.to_dict()
    assert assessment.drifted_features == ["device", "item_category"]
    assert assessment.drift_share == round(2 / len(spec.features), 6)
    assert policy.drift_share_warning <= assessment.drift_share < policy.drift_share_critical
    assert assessment.out_of_range_share < policy.out_of_range_share_critical
    assert assessment.reasons == ["2/7 features drifted (29%) >= warning share"]


def test_the_same_inputs_give_the_same_verdict(spec, policy, stationary) -> None:
    # A reference larger than reference_sample_rows is sampled; the sample is seeded.
    big_reference = generate_clicks(2500, seed=8)
    small_sample = policy.model_copy(update={"reference_sample_rows": 1000})
    shifted = generate_clicks(WINDOW_ROWS, seed=12, shift=DriftShift(price_factor=1.6))
    first = assess_drift(current=shifted, reference=big_reference, spec=spec, policy=small_sample)
    second = assess_drift(current=shifted, reference=big_reference, spec=spec, policy=small_sample)
    assert first.reference_rows == 1000
    assert first.to_dict() == second.to_dict()


def test_a_regression_model_with_numeric_features_only(tmp_path: Path, catalog: Catalog, diabetes) -> None:
    spec = catalog.model(DIABETES)
    policy = catalog.policies_for(spec).monitoring
    assert spec.task == "regression" and spec.categorical_features == []
    assert policy.name == "sensitive"  # the high risk tier's policy, not the standard one
    reference = pd.read_csv(diabetes)
    current = reference.sample(200, replace=True, random_state=3)
    html = tmp_path / "report.html"
    calm = assess_drift(current=current, reference=reference, spec=spec, policy=policy, html_path=str(html))
    assert calm.verdict == "ok", calm.to_dict()
    assert set(calm.feature_scores) == set(spec.numeric_features)
    assert {score["method"] for score in calm.feature_scores.values()} == {policy.numerical_method}
    assert is_html(html)

    heavier = assess_drift(
        current=current.assign(bmi=current["bmi"] * 1.3), reference=reference, spec=spec, policy=policy
    )
    assert heavier.verdict == "critical", heavier.to_dict()
    assert heavier.drifted_features == ["bmi"] and heavier.out_of_range_features["bmi"] > 0


# --- out_of_range --------------------------------------------------------------------------------


def test_out_of_range_counts_rows_and_features() -> None:
    reference = pd.DataFrame({"age": [18, 40, 75], "price": [1.0, 50.0, 100.0]})
    current = pd.DataFrame({"age": [17, 40, 80, 30, 18], "price": [50.0, 101.0, 0.5, 100.0, 1.0]})
    share, per_feature = out_of_range(current, reference, ["age", "price"])
    # Rows 0 (age), 1 (price) and 2 (both) are outside; the bounds themselves are inside.
    assert share == pytest.approx(3 / 5)
    assert per_feature == {"age": 2, "price": 2}


def test_out_of_range_with_everything_inside_or_no_rows() -> None:
    reference = pd.DataFrame({"age": [18, 75]})
    assert out_of_range(pd.DataFrame({"age": [18, 50, 75]}), reference, ["age"]) == (0.0, {})
    assert out_of_range(pd.DataFrame({"age": pd.Series([], dtype="int64")}), reference, ["age"]) == (
        0.0,
        {},
    )


# --- the window ----------------------------------------------------------------------------------


def test_window_from_the_data_interval() -> None:
    start = pendulum.datetime(2026, 1, 1, 10)
    assert monitoring_window(None, None, start, start.add(hours=1)) == (start, start.add(hours=1))
    assert monitoring_window("", "  ", start, start.add(hours=1)) == (start, start.add(hours=1))


def test_explicit_window_wins_over_the_data_interval() -> None:
    start, end = monitoring_window(
        "2026-03-01T10:00:00+00:00",
        "2026-03-01T11:30:00+00:00",
        pendulum.datetime(2020, 1, 1),
        pendulum.datetime(2020, 1, 2),
    )
    assert (start, end) == (pendulum.datetime(2026, 3, 1, 10), pendulum.datetime(2026, 3, 1, 11, 30))


def test_a_timestamp_without_a_zone_is_utc() -> None:
    start, _ = monitoring_window("2026-03-01T10:00:00", "2026-03-01T11:00:00", None, None)
    assert start == datetime(2026, 3, 1, 10, tzinfo=UTC) and start.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("start", "end"), [("2026-03-01T10:00:00Z", ""), ("", "2026-03-01T10:00:00Z"), (None, "2026-03-01")]
)
def test_window_with_only_one_end_is_refused(start: str | None, end: str) -> None:
    with pytest.raises(MonitoringError, match="give both window_start and window_end"):
        monitoring_window(start, end, None, None)


@pytest.mark.parametrize("start", ["yesterday at noon", "P1D"])
def test_window_with_an_unparseable_timestamp_is_refused(start: str) -> None:
    with pytest.raises(MonitoringError, match="ISO 8601 timestamp"):
        monitoring_window(start, "2026-03-01T10:00:00Z", None, None)


@pytest.mark.parametrize("end", ["2026-03-01T10:00:00Z", "2026-03-01T09:00:00Z"])
def test_window_must_start_before_it_ends(end: str) -> None:
    with pytest.raises(MonitoringError, match="is not before window_end"):
        monitoring_window("2026-03-01T10:00:00Z", end, None, None)


def test_window_without_a_data_interval_is_refused() -> None:
    with pytest.raises(MonitoringError, match="this run has no data interval"):
        monitoring_window(None, None, None, None)
    with pytest.raises(MonitoringError, match="this run has no data interval"):
        monitoring_window("", "", pendulum.datetime(2026, 1, 1), None)


# --- a real registry and prediction log ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Served:
    root: Path
    tracking_uri: str
    registry: ModelRegistry
    model_dir: Path
    train_sha: dict[str, str]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def register(served: Served, name: str, *, tags: dict[str, str], alias: str | None = None) -> str:
    """Register a version of ``name`` (the model files do not matter to monitoring)."""
    registry = served.registry
    run_id = registry.log_run(
        experiment=TEST_EXPERIMENT,
        run_name=f"fixture-{name}",
        tags={},
        artifact_dirs={"model": served.model_dir},
    )
    registry.ensure_model(name, {})
    version = registry.register_version(name, run_id=run_id, artifact_path="model", tags=tags).version
    if alias is not None:
        registry.set_alias(name, alias, version)
    return version


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, catalog: Catalog, reference, diabetes) -> Served:
    """A SQLite MLflow registry with every catalog model's experiment (artifacts under the test folder,
    never ./mlruns) and, for both catalog models, a champion whose lineage names its training data."""
    import mlflow.sklearn
    from mlflow import MlflowClient
    from sklearn.dummy import DummyRegressor

    root = tmp_path_factory.mktemp("monitoring")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    for experiment in [TEST_EXPERIMENT, *(spec.experiment_name for spec in catalog.models.values())]:
        client.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())
    model_dir = root / "model"
    mlflow.sklearn.save_model(
        DummyRegressor().fit([[0.0]], [0.0]), str(model_dir), pip_requirements=["scikit-learn"]
    )
    clicks = root / "clicks.csv"
    reference.to_csv(clicks, index=False)
    served = Served(
        root,
        tracking_uri,
        ModelRegistry(tracking_uri),
        model_dir,
        {CTR: sha256_file(clicks), DIABETES: sha256_file(diabetes)},
    )
    for name, uri in ((CTR, clicks), (DIABETES, diabetes)):
        lineage = {Tag.TRAIN_DATA_SHA256: served.train_sha[name], Tag.TRAIN_DATA_URI: str(uri)}
        assert register(served, name, tags=lineage, alias=Alias.CHAMPION) == "1"
    # v2 of the classifier served a few rows of each window below; its training data must not be used.
    register(
        served, CTR, tags={Tag.TRAIN_DATA_SHA256: "0" * 64, Tag.TRAIN_DATA_URI: str(root / "absent.csv")}
    )
    return served


@pytest.fixture
def prediction_log(tmp_path: Path) -> PredictionLog:
    log = PredictionLog(f"sqlite:///{tmp_path / 'predictions.db'}")
    yield log
    log.engine.dispose()


def log_predictions(
    log: PredictionLog,
    model: str,
    frame: pd.DataFrame,
    *,
    version: str,
    start: datetime = START,
    per_call: int = 25,
) -> None:
    """Log ``frame`` as calls of ``per_call`` rows each, spread over the first 50 minutes after ``start``."""
    calls = [frame.iloc[i : i + per_call] for i in range(0, len(frame), per_call)]
    for index, rows in enumerate(calls):
        log.record(
            PredictionRecord(
                request_id=uuid.uuid4().hex,
                received_at=start + timedelta(minutes=50 * index / len(calls)),
                caller_id="test",
                model_name=model,
                model_version=version,
                status_code=200,
                latency_ms=3.0,
                n_rows=len(rows),
                inputs=rows.to_dict(orient="records"),
                outputs=[0.5] * len(rows),
            )
        )


def assess_window(
    served: Served, catalog: Catalog, name: str, log: PredictionLog, storage: Path, **window: Any
):
    spec = catalog.model(name)
    return assess(
        spec=spec,
        policy=catalog.policies_for(spec).monitoring,
        registry=served.registry,
        prediction_log=log,
        storage=as_storage_path(storage),
        start=window.get("start", START),
        end=window.get("end", END),
    )


def test_a_drifted_window_is_assessed_recorded_and_logged_once_per_window(
    tmp_path: Path, served: Served, catalog: Catalog, prediction_log: PredictionLog
) -> None:
    shifted = generate_clicks(WINDOW_ROWS, seed=11, shift=DriftShift(age_shift=15, out_of_range_share=0.2))
    log_predictions(prediction_log, CTR, shifted, version="1")
    log_predictions(prediction_log, CTR, generate_clicks(50, seed=3), version="2")  # the minority
    # Outside [START, END) or another model's: not part of the window.
    log_predictions(prediction_log, CTR, generate_clicks(50, seed=4), version="1", start=END)
    log_predictions(prediction_log, "other_model", shifted, version="9")
    storage = tmp_path / "storage"

    outcome = assess_window(served, catalog, CTR, prediction_log, storage)
    details = outcome.details
    json.dumps(outcome.xcom())
    # Drift alone (no labels yet, so no business metric) is a warning: it never pages or retrains.
    assert outcome.decision == details["verdict"] == "warning" and outcome.refusal is None
    assert details["drift_level"] == "critical" and details["business"]["status"] == "pending_labels"
    assert outcome.asset_extra is None
    assert details["model_name"] == CTR and details["version"] == "1"
    assert (details["window_start"], details["window_end"]) == (START.isoformat(), END.isoformat())
    assert details["rows"] == WINDOW_ROWS + 50 and details["request_retraining"] is False
    assert "user_age" in details["drifted_features"] and details["out_of_range_share"] > 0.05
    assert set(details) == {
        "model_name", "version", "window_start", "window_end", "verdict", "drift_level", "rows", "drift_share",
        "drifted_features", "out_of_range_share", "business", "report_uri", "report_sha256", "mlflow_run_id",
        "request_retraining",
    }  # fmt: skip
    assert outcome.summary.startswith(f"{CTR}: warning: {WINDOW_ROWS + 50} rows")

    window_folder = ("monitoring", CTR, "2026-03-01T100000+0000--2026-03-01T110000+0000")
    folder = storage.joinpath(*window_folder)
    html = folder / "drift_report.html"
    assert details["report_uri"] == str(as_storage_path(storage).joinpath(*window_folder, html.name))
    assert is_html(html)
    written = json.loads((folder / "assessment.json").read_text())
    assert written["verdict"] == "warning" and written["rows"] == WINDOW_ROWS + 50

    (record,) = outcome.records
    assert record.action == AuditAction.DRIFT_ASSESSED and record.subject == f"model:{CTR}@1"
    assert record.decision == "warning" and record.details["policy"] == "standard"
    assert record.details["mlflow_run_id"] == details["mlflow_run_id"]
    assert record.details["feature_scores"]["user_age"]["drifted"] is True
    assert record.evidence["reference_dataset"] == served.train_sha[CTR]
    assert record.evidence["drift_report_html"] == sha256_file(html)
    assert set(record.evidence) == {
        "assessment",
        "policy",
        "reference_dataset",
        "drift_report_html",
        "reference_profile",
    }

    run = served.registry.run(details["mlflow_run_id"])
    assert run.tags[RunTag.KIND] == DRIFT_RUN_KIND and run.tags[RunTag.MODEL] == CTR
    assert run.tags[RunTag.MODEL_VERSION] == "1" and run.tags[RunTag.VERDICT] == "warning"
    assert run.tags[RunTag.WINDOW] == f"{START.isoformat()}--{END.isoformat()}"
    assert run.metrics["rows"] == WINDOW_ROWS + 50 and run.metrics["drift_share"] == details["drift_share"]
    artifacts = Path(run.artifact_uri.removeprefix("file://")) / "drift"
    assert sorted(p.name for p in artifacts.iterdir()) == ["assessment.json", "drift_report.html"]
    client = MlflowClient(served.tracking_uri)
    experiment = client.get_experiment(client.get_run(run.run_id).info.experiment_id)
    assert experiment.name == catalog.model(CTR).experiment_name

    # A retry of the same window adds to its run instead of logging another one.
    again = assess_window(served, catalog, CTR, prediction_log, storage)
    assert again.details["mlflow_run_id"] == details["mlflow_run_id"]
    assert again.records[0].evidence["assessment"] == record.evidence["assessment"]

    # The next window is a run of its own.
    later = assess_window(
        served, catalog, CTR, prediction_log, storage, start=END, end=END + timedelta(hours=1)
    )
    assert later.decision == "insufficient_data" and later.details["rows"] == 50
    assert later.details["report_uri"] is None
    assert later.details["mlflow_run_id"] not in (None, details["mlflow_run_id"])

    # A warning does not call for a retrain under the standard policy.
    assert retraining_request(outcome.xcom(), catalog.policies_for(CTR).monitoring) is None


def test_a_regression_model_is_assessed_against_its_own_training_data(
    tmp_path: Path, served: Served, catalog: Catalog, prediction_log: PredictionLog, diabetes: Path
) -> None:
    current = pd.read_csv(diabetes).sample(120, replace=True, random_state=5).drop(columns=["progression"])
    log_predictions(prediction_log, DIABETES, current, version="1", per_call=10)
    outcome = assess_window(served, catalog, DIABETES, prediction_log, tmp_path / "storage")
    assert outcome.decision == "ok", outcome.details
    assert outcome.details["rows"] == 120 and outcome.details["request_retraining"] is False
    (record,) = outcome.records
    assert record.subject == f"model:{DIABETES}@1" and record.details["policy"] == "sensitive"
    assert record.evidence["reference_dataset"] == served.train_sha[DIABETES]
    assert set(record.details["feature_scores"]) == set(catalog.model(DIABETES).numeric_features)
    assert served.registry.run(outcome.details["mlflow_run_id"]).tags[RunTag.MODEL] == DIABETES

    assert retraining_request(outcome.xcom(), catalog.policies_for(DIABETES).monitoring) is None


def test_the_policy_decides_which_verdicts_request_a_retrain(catalog: Catalog) -> None:
    assessment = {
        "model_name": CTR,
        "version": "3",
        "verdict": "warning",
        "window_start": START.isoformat(),
        "window_end": END.isoformat(),
    }
    standard = catalog.policies_for(CTR).monitoring
    assert standard.request_retraining_on == ["critical"]
    assert retraining_request(assessment, standard) is None
    eager = standard.model_copy(update={"request_retraining_on": ["warning", "critical"]})
    request = retraining_request(assessment, eager)
    assert request is not None and request.asset_extra["verdict"] == "warning"
    assert request.records[0].subject == f"model:{CTR}@3"
    for verdict in ("ok", "insufficient_data"):
        assert retraining_request({**assessment, "verdict": verdict}, eager) is None


def test_a_version_without_lineage_cannot_be_assessed(
    tmp_path: Path, served: Served, catalog: Catalog, prediction_log: PredictionLog
) -> None:
    name = "no_lineage"
    register(served, name, tags={}, alias=Alias.CHAMPION)
    spec = catalog.model(CTR).model_copy(update={"name": name})
    log_predictions(prediction_log, name, generate_clicks(250, seed=2), version="1")
    with pytest.raises(MonitoringError, match=r"no_lineage v1 has no train_data_sha256/train_data_uri"):
        assess(
            spec=spec,
            policy=catalog.policies_for(CTR).monitoring,
            registry=served.registry,
            prediction_log=prediction_log,
            storage=as_storage_path(tmp_path / "storage"),
            start=START,
            end=END,
        )


def test_predictions_without_a_feature_cannot_be_assessed(
    tmp_path: Path, served: Served, catalog: Catalog, prediction_log: PredictionLog
) -> None:
    log_predictions(prediction_log, CTR, generate_clicks(250, seed=2).drop(columns=["device"]), version="1")
    with pytest.raises(MonitoringError, match=r"carry no value for the features \[.device.\]"):
        assess_window(served, catalog, CTR, prediction_log, tmp_path / "storage")


# --- which models a run assesses -----------------------------------------------------------------


def test_plan_monitoring_picks_the_serving_models(served: Served, catalog: Catalog) -> None:
    base = catalog.model(CTR)
    names = {
        "plan_champion": {"serving": base.serving},
        "plan_candidate_only": {"serving": base.serving},
        "plan_not_served": {"serving": ServingSpec(enabled=False)},
        "plan_unregistered": {"serving": base.serving},
    }
    models = {name: base.model_copy(update={"name": name, **update}) for name, update in names.items()}
    plans = dataclasses.replace(catalog, models=models)
    register(served, "plan_champion", tags={}, alias=Alias.CHAMPION)
    register(served, "plan_candidate_only", tags={}, alias=Alias.CANDIDATE)
    register(served, "plan_not_served", tags={}, alias=Alias.CHAMPION)

    assert plan_monitoring(catalog=plans, registry=served.registry, models=[]) == [{"model": "plan_champion"}]
    named = ["plan_candidate_only", "plan_champion", "plan_champion", ""]
    assert plan_monitoring(catalog=plans, registry=served.registry, models=named) == [
        {"model": "plan_champion"}
    ]
    assert plan_monitoring(catalog=plans, registry=served.registry, models=["plan_unregistered"]) == []
    with pytest.raises(UnknownModel, match="no model spec declares the model 'nope'"):
        plan_monitoring(catalog=plans, registry=served.registry, models=["nope"])

    # The real catalog: both models have a champion in this registry.
    assert plan_monitoring(catalog=catalog, registry=served.registry, models=[]) == [
        {"model": CTR},
        {"model": DIABETES},
    ]


# --- operators -----------------------------------------------------------------------------------


def task_context(task_id: str, **extra: Any) -> dict[str, Any]:
    dag_run = SimpleNamespace(
        dag_id="modelops_drift_monitoring", run_id="scheduled__1", triggering_user_name=None
    )
    return {"dag_run": dag_run, "ti": SimpleNamespace(task_id=task_id), **extra}


@pytest.fixture
def connections(modelops_home: Path, served: Served, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT",
        json.dumps({"conn_type": "http", "extra": {"tracking_uri": served.tracking_uri}}),
    )
    return modelops_home


def audit_records(home: Path, action: str) -> list[Any]:
    store = AuditStore(f"sqlite:///{home}/audit.db", keyring=keyring_for_tests())
    try:
        assert store.verify().ok
        return store.records(action=action)
    finally:
        store.dispose()


def test_operator_on_an_empty_window_records_insufficient_data(connections: Path) -> None:
    context = task_context(
        "assess_drift", data_interval_start=pendulum.instance(START), data_interval_end=pendulum.instance(END)
    )
    operator = DriftMonitorOperator(task_id="assess_drift", model=CTR, window_start="", window_end="")
    # Only the window comes from templates (the form's params); the model comes from the plan.
    assert set(operator.template_fields) == {"window_start", "window_end"}
    result = operator.execute(context)
    json.dumps(result)
    assert result["verdict"] == result["decision"] == "insufficient_data" and result["rows"] == 0
    assert result["report_uri"] is None and result["mlflow_run_id"] is None
    assert result["request_retraining"] is False and result["model_name"] == CTR

    # A quiet hour is a verdict about the version that was serving (the champion), named in the subject.
    (record,) = audit_records(connections, AuditAction.DRIFT_ASSESSED)
    assert record.decision == "insufficient_data" and record.subject == f"model:{CTR}@{result['version']}"
    assert record.details["window_start"] == START.isoformat()
    assert record.details["reasons"] == ["no predictions in the window"]
    written = list((connections / "storage" / "monitoring" / CTR).glob("*/assessment.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["verdict"] == "insufficient_data"


def test_operator_window_from_its_parameters(connections: Path) -> None:
    operator = DriftMonitorOperator(
        task_id="assess_drift",
        model=DIABETES,
        window_start="2026-02-01T00:00:00Z",
        window_end="2026-02-01T06:00:00Z",
    )
    outcome = operator.run_stage(
        task_context("assess_drift", data_interval_start=None, data_interval_end=None)
    )
    assert outcome.details["window_start"] == "2026-02-01T00:00:00+00:00"
    assert outcome.details["window_end"] == "2026-02-01T06:00:00+00:00"
    assert outcome.details["model_name"] == DIABETES


def test_request_retraining_operator_emits_or_skips(connections: Path) -> None:
    assessment = {
        "model_name": CTR,
        "version": "1",
        "verdict": "ok",
        "window_start": START.isoformat(),
        "window_end": END.isoformat(),
    }
    with pytest.raises(
        AirflowSkipException, match="verdict 'ok' of ctr_recommender does not call for retraining"
    ):
        RequestRetrainingOperator(task_id="request_retraining", assessment=assessment).execute(
            task_context("request_retraining")
        )
    assert audit_records(connections, AuditAction.RETRAINING_REQUESTED) == []

    events: defaultdict[Any, SimpleNamespace] = defaultdict(SimpleNamespace)
    operator = RequestRetrainingOperator(
        task_id="request_retraining",
        assessment={**assessment, "verdict": "critical"},
        outlets=[RETRAINING_REQUEST],
    )
    result = operator.execute(task_context("request_retraining", outlet_events=events))
    assert result["decision"] == "requested" and result["model_name"] == CTR
    assert events[RETRAINING_REQUEST].extra == {
        "model_name": CTR,
        "version": "1",
        "verdict": "critical",
        "reason": f"drift verdict critical for window {START.isoformat()}--{END.isoformat()}",
    }
    (record,) = audit_records(connections, AuditAction.RETRAINING_REQUESTED)
    assert record.decision == "requested" and record.subject == f"model:{CTR}@1"


# --- the business metric from delayed labels, correlated tiers, callers, history ----------------------------

BASELINE_CTR = 0.3


@pytest.fixture
def audit(tmp_path: Path) -> AuditStore:
    """An audit log holding the serving version's registration record: its holdout baseline."""
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}", keyring=keyring_for_tests())
    for name, metrics in (
        (CTR, {"holdout_positive_rate": BASELINE_CTR, "holdout_roc_auc": 0.8}),
        (DIABETES, {"holdout_rmse": 55.0}),
    ):
        store.append(
            actor="test",
            action=AuditAction.MODEL_REGISTERED,
            subject=f"model:{name}@1",
            decision=Decision.CANDIDATE,
            details={"metrics": metrics},
        )
    yield store
    store.dispose()


def log_labelled(
    log: PredictionLog,
    frame: pd.DataFrame,
    *,
    callers: dict[str, float | None],
    per_call: int = 20,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> None:
    """Log ``frame`` for the classifier as calls rotating over ``callers``; each caller's requests get
    labels drawn with that caller's click-through rate (None: no labels delivered)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    names = list(callers)
    calls = [frame.iloc[i : i + per_call] for i in range(0, len(frame), per_call)]
    for index, rows in enumerate(calls):
        caller = names[index % len(names)]
        request_id = uuid.uuid4().hex
        inputs = [{**row, **(extra or {})} for row in rows.to_dict(orient="records")]
        log.record(
            PredictionRecord(
                request_id=request_id,
                received_at=START + timedelta(minutes=50 * index / len(calls)),
                caller_id=caller,
                model_name=CTR,
                model_version="1",
                status_code=200,
                latency_ms=3.0 + index % 7,
                n_rows=len(rows),
                inputs=inputs,
                outputs=[[0.7, 0.3]] * len(rows),
            )
        )
        rate = callers[caller]
        if rate is not None:
            log.add_labels(request_id, [int(x) for x in rng.random(len(rows)) < rate])


def assess_ctr(
    served: Served, catalog: Catalog, log: PredictionLog, storage: Path, audit: AuditStore, **kw: Any
):
    spec = catalog.model(CTR)
    return assess(
        spec=spec,
        policy=kw.pop("policy", catalog.policies_for(spec).monitoring),
        registry=served.registry,
        prediction_log=log,
        storage=as_storage_path(storage),
        start=START,
        end=END,
        audit=audit,
        **kw,
    )


SHIFTED = dict(age_shift=15, out_of_range_share=0.2)


def test_drift_with_a_click_through_drop_seen_by_several_callers_is_critical(
    tmp_path: Path, served: Served, catalog: Catalog, prediction_log: PredictionLog, audit: AuditStore
) -> None:
    frame = generate_clicks(WINDOW_ROWS, seed=11, shift=DriftShift(**SHIFTED))
    log_labelled(prediction_log, frame, callers={"web": 0.1, "app": 0.1, "email": 0.1})
    outcome = assess_ctr(served, catalog, prediction_log, tmp_path, audit)
    business = outcome.details["business"]
    assert business["status"] == "measured" and business["metric"] == "click_through_rate"
    assert business["baseline"] == BASELINE_CTR and business["label_coverage"] == 1.0
    assert business["drop"] > 0.5 and set(business["by_caller"]) == {"web", "app", "email"}
    assert outcome.decision == "critical" and outcome.details["request_retraining"] is True
    assert "click_through_rate" in outcome.summary and "baseline 0.3" in outcome.summary
    record, reference = outcome.records
    assert record.details["business"]["drop"] == business["drop"]
    # The first window of the version sets its reference: its training data (no promotion record here, so
    # no cold start to end and no model outputs to compare predictions with).
    assert (reference.action, reference.decision) == (AuditAction.MONITORING_REFERENCE_SET, "training_data")
    assert reference.details["source_sha256"] == served.train_sha[CTR]
    assert record.details["reference"]["profile_sha256"] == reference.evidence["profile"]
    assert outcome.details["business"] and record.details["prediction_drift"] == {}


def test_drift_without_a_drop_stays_a_warning_and_a_drop_without_drift_warns(
    tmp_path: Path,
    served: Served,
    catalog: Catalog,
    prediction_log: PredictionLog,
    audit: AuditStore,
    stationary,
) -> None:
    frame = generate_clicks(WINDOW_ROWS, seed=11, shift=DriftShift(**SHIFTED))
    log_labelled(prediction_log, frame, callers={"web": BASELINE_CTR, "app": BASELINE_CTR}, seed=1)
    outcome = assess_ctr(served, catalog, prediction_log, tmp_path / "a", audit)
    assert outcome.details["drift_level"] == "critical" and outcome.decision == "warning"
    assert abs(outcome.details["business"]["drop"]) < 0.2

    quiet = PredictionLog(f"sqlite:///{tmp_path / 'quiet.db'}")
    log_labelled(quiet, stationary.head(WINDOW_ROWS), callers={"web": 0.1, "app": 0.1}, seed=2)
    outcome = assess_ctr(served, catalog, quiet, tmp_path / "b", audit)
    assert outcome.details["drift_level"] == "ok" and outcome.decision == "warning"
    assert outcome.details["business"]["drop"] > 0.5
    quiet.dispose()


def test_labels_not_in_yet_are_pending_never_a_drop(
    tmp_path: Path, served: Served, catalog: Catalog, prediction_log: PredictionLog, audit: AuditStore
) -> None:
    frame = generate_clicks(WINDOW_ROWS, seed=11, shift=DriftShift(**SHIFTED))
    # Only a fifth of the rows labelled: below min_label_coverage.
    log_labelled(prediction_log, frame, callers={"web": 0.0, "a": None, "b": None, "c": None, "d": None})
    outcome = assess_ctr(served, catalog, prediction_log, tmp_path, audit)
    business = outcome.details["business"]
    assert business["status"] == "pending_labels" and business["drop"] is None
    assert business["label_coverage"] == pytest.approx(0.2)
    assert outcome.decision == "warning"  # never critical on drift alone
    assert any("re-assessed when labels arrive" in reason for reason in outcome.records[0].details["reasons"])


def test_one_caller_cannot_fake_a_drop_into_an_automatic_action(
    tmp_path: Path, served: Served, catalog: Catalog, prediction_log: PredictionLog, audit: AuditStore
) -> None:
    """Attack: a caller sends drifted rows and posts 'no click' labels for its own requests. The window's
    click-through rate drops, but the drop shows in one caller's rows only: a warning, not an action."""
    frame = generate_clicks(WINDOW_ROWS, seed=11, shift=DriftShift(**SHIFTED))
    log_labelled(prediction_log, frame, callers={"mallory": 0.0, "web": BASELINE_CTR}, seed=3)
    outcome = assess_ctr(served, catalog, prediction_log, tmp_path, audit)
    assert outcome.details["business"]["drop"] >= 0.05
    assert outcome.decision == "warning" and outcome.details["request_retraining"] is False
    assert any("1 caller(s) only" in reason for reason in outcome.records[0].details["reasons"])


def test_a_flood_from_one_caller_is_capped_to_its_share(
    tmp_path: Path,
    served: Served,
    catalog: Catalog,
    prediction_log: PredictionLog,
    audit: AuditStore,
    stationary,
) -> None:
    """Attack: one request of many identical drifted rows. Its caller's weight is capped, so the window is
    judged mostly on everyone else's traffic, and the capping is on record."""
    log_labelled(prediction_log, stationary.head(WINDOW_ROWS), callers={"web": None, "app": None})
    flood = generate_clicks(1, seed=5, shift=DriftShift(**SHIFTED))
    flood = pd.concat([flood] * 3000, ignore_index=True)
    log_labelled(prediction_log, flood, callers={"anonymous": None}, per_call=3000)
    outcome = assess_ctr(served, catalog, prediction_log, tmp_path, audit)
    callers = outcome.records[0].details["callers"]
    assert callers["callers"] == 3 and callers["capped"] == {"anonymous": 3000 - WINDOW_ROWS}
    assert outcome.details["rows"] == 2 * WINDOW_ROWS
    assert outcome.decision != "critical"


def test_unknown_and_colliding_columns_never_break_the_read(
    tmp_path: Path,
    served: Served,
    catalog: Catalog,
    prediction_log: PredictionLog,
    audit: AuditStore,
    stationary,
) -> None:
    """Bad input seen on the demo stack: a request with an extra column named received_at failed the hour."""
    log_labelled(
        prediction_log,
        stationary.head(WINDOW_ROWS),
        callers={"web": None, "app": None},
        extra={"received_at": "yesterday", "caller_id": "spoofed", "nested": {"a": [1, 2]}},
    )
    outcome = assess_ctr(served, catalog, prediction_log, tmp_path, audit)
    assert outcome.decision == "ok" and outcome.details["rows"] == WINDOW_ROWS
    assert outcome.records[0].details["callers"]["rows_by_caller"] == {"web": 200, "app": 200}


def test_quality_latency_and_errors_are_part_of_the_assessment(
    tmp_path: Path,
    served: Served,
    catalog: Catalog,
    prediction_log: PredictionLog,
    audit: AuditStore,
    stationary,
) -> None:
    import numpy as np

    frame = stationary.head(WINDOW_ROWS).copy()
    frame.loc[frame.index[:40], "user_balance"] = None
    frame.loc[frame.index[:10], "device"] = "smart-fridge"
    log_labelled(prediction_log, frame, callers={"web": None, "app": None})
    prediction_log.record(
        PredictionRecord(
            request_id=uuid.uuid4().hex, received_at=START + timedelta(minutes=5), caller_id="web",
            model_name=CTR, model_version="1", status_code=422, latency_ms=1.0, n_rows=0, inputs=[],
            error="bad input",
        )
    )  # fmt: skip
    outcome = assess_ctr(served, catalog, prediction_log, tmp_path, audit)
    quality = outcome.records[0].details["quality"]
    assert quality["null_rates"]["user_balance"] == pytest.approx(40 / WINDOW_ROWS)
    assert quality["unseen_category_rows"] == {"device": 10}
    assert quality["requests"] == WINDOW_ROWS // 20 + 1 and quality["failed_requests"] == 1
    latencies = [3.0 + i % 7 for i in range(WINDOW_ROWS // 20)] + [1.0]
    assert quality["latency_ms"]["p95"] == pytest.approx(float(np.percentile(latencies, 95)))
    assert "smart-fridge" not in json.dumps(outcome.records[0].details)  # values never quoted


def test_label_deliveries_for_unknown_requests_are_refused_and_counted_in_the_window(
    tmp_path: Path, served: Served, catalog: Catalog, prediction_log: PredictionLog, audit: AuditStore
) -> None:
    from modelops.serving.prediction_log import LabelCountMismatch, UnknownRequestError

    # Refusals are counted in the hour they happen: assess the current hour.
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    log_predictions(prediction_log, CTR, generate_clicks(WINDOW_ROWS, seed=11), version="1", start=hour)
    for made_up in ("f" * 32, "0" * 32):
        with pytest.raises(UnknownRequestError):
            prediction_log.add_labels(made_up, [1, 0])
    with prediction_log.engine.connect() as conn:
        known = conn.execute(sa.text("select request_id from modelops_predictions limit 1")).scalar_one()
    with pytest.raises(LabelCountMismatch):
        prediction_log.add_labels(known, [1])
    spec = catalog.model(CTR)
    outcome = assess(
        spec=spec,
        policy=catalog.policies_for(spec).monitoring,
        registry=served.registry,
        prediction_log=prediction_log,
        storage=as_storage_path(tmp_path),
        start=hour,
        end=hour + timedelta(hours=1),
        audit=audit,
    )
    counted = outcome.records[0].details["quality"]["label_deliveries_all_models"]
    assert counted == {"label_count_mismatch": 1, "unknown_request_id": 2}
    assert "f" * 32 not in json.dumps(outcome.records[0].details)  # the made-up ids are not kept


def test_every_window_is_a_history_row_and_a_backfill_reproduces_it(
    tmp_path: Path, served: Served, catalog: Catalog, prediction_log: PredictionLog, audit: AuditStore
) -> None:
    from modelops.monitoring_history import MonitoringHistory

    history = MonitoringHistory(f"sqlite:///{tmp_path / 'predictions.db'}")
    frame = generate_clicks(WINDOW_ROWS, seed=11, shift=DriftShift(**SHIFTED))
    log_labelled(prediction_log, frame, callers={"web": 0.1, "app": 0.1, "email": 0.1})
    first = assess_ctr(served, catalog, prediction_log, tmp_path / "a", audit, history=history)
    for effect in first.effects:
        effect()
    again = assess_ctr(served, catalog, prediction_log, tmp_path / "b", audit, history=history)
    for effect in again.effects:
        effect()
    assert first.decision == again.decision == "critical"
    assert first.details["report_sha256"] == again.details["report_sha256"]
    assert first.records[0].evidence["assessment"] == again.records[0].evidence["assessment"]
    (row,) = history.rows(CTR)
    assert (row.model_version, row.window_start, row.window_end, row.verdict) == ("1", START, END, "critical")
    assert row.metrics["business_drop"] == first.details["business"]["drop"]
    assert row.report_sha256 == first.details["report_sha256"]
    history.dispose()


def test_without_a_baseline_on_record_no_drop_is_claimed(
    tmp_path: Path, served: Served, catalog: Catalog, prediction_log: PredictionLog
) -> None:
    frame = generate_clicks(WINDOW_ROWS, seed=11, shift=DriftShift(**SHIFTED))
    log_labelled(prediction_log, frame, callers={"web": 0.0, "app": 0.0})
    empty = AuditStore(f"sqlite:///{tmp_path / 'empty.db'}", keyring=keyring_for_tests())
    outcome = assess_ctr(served, catalog, prediction_log, tmp_path, empty)
    assert outcome.details["business"]["status"] == "no_baseline" and outcome.decision == "warning"
    empty.dispose()


def test_a_regressors_business_metric_is_its_error_against_its_holdout(catalog: Catalog) -> None:
    from modelops.stages.monitoring import business_metric

    spec = catalog.model(DIABETES)
    policy = catalog.policies_for(spec).monitoring
    window = pd.DataFrame(
        {"prediction": [100.0] * 200, "label": [100.0 + (60 if i % 2 else -60) for i in range(200)],
         "caller_id": ["a", "b"] * 100}
    )  # fmt: skip
    result = business_metric(window, spec, policy, {"holdout_rmse": 50.0})
    assert result["metric"] == "rmse" and result["value"] == pytest.approx(60.0)
    assert result["drop"] == pytest.approx(0.2)  # 20 % worse than the holdout's RMSE
    assert set(result["by_caller"]) == {"a", "b"}


# --- alerts: tiers, cool-down, recovery, cold start -------------------------------------------------------


def assessment_of(
    verdict: str, *, version: str = "1", drift: str = "critical", status: str = "measured"
) -> dict:
    return {
        "model_name": CTR,
        "version": version,
        "verdict": verdict,
        "drift_level": drift,
        "rows": 400,
        "drifted_features": ["user_age"],
        "window_start": START.isoformat(),
        "window_end": END.isoformat(),
        "business": {
            "metric": "click_through_rate",
            "status": status,
            "value": 0.1,
            "baseline": 0.3,
            "drop": 0.66,
        },
        "report_uri": "file:///reports/x.html",
    }


def record_plan(audit: AuditStore, plan, delivered: bool = True) -> None:
    from modelops.stages.monitoring import alert_record

    entry = alert_record(
        catalog_spec(), "1", plan, [{"channel": "outbox", "delivered": delivered}] if plan.alert else None
    )
    audit.append(actor="test", action=entry.action, subject=entry.subject, decision=entry.decision,
                 details=entry.details)  # fmt: skip


def catalog_spec() -> ModelSpec:
    return load_catalog().model(CTR)


def test_alerts_are_sent_once_per_condition_within_the_cooldown_and_recovery_once(audit: AuditStore) -> None:
    from modelops.stages.monitoring import plan_alert

    spec = catalog_spec()
    policy = load_catalog().policies_for(spec).monitoring.model_copy(update={"cold_start_days": 0})
    now = datetime.now(UTC)
    first = plan_alert(assessment_of("critical"), spec, policy, audit, now)
    assert first is not None and first.alert is not None and first.alert.tier == "critical"
    assert first.alert.recipients == [spec.owner] and "click_through_rate down 66.0%" in first.alert.title
    record_plan(audit, first)
    again = plan_alert(assessment_of("critical"), spec, policy, audit, now + timedelta(hours=1))
    assert again is not None and again.alert is None and "cool-down 6 h" in again.suppressed_because
    # A failed delivery does not start a cool-down: the next hour tries again.
    failing = AuditStore(f"sqlite:///{audit.url.split('///')[1]}.failing", keyring=keyring_for_tests())
    record_plan(failing, first, delivered=False)
    assert plan_alert(assessment_of("critical"), spec, policy, failing, now).alert is not None
    failing.dispose()
    # Another condition is another alert; after the cool-down the same one is sent again.
    assert plan_alert(assessment_of("warning", drift="warning"), spec, policy, audit, now).alert is not None
    assert (
        plan_alert(assessment_of("critical"), spec, policy, audit, now + timedelta(hours=7)).alert is not None
    )
    # Back to ok: one recovery, then nothing.
    recovered = plan_alert(assessment_of("ok", drift="ok"), spec, policy, audit, now + timedelta(hours=2))
    assert recovered is not None and recovered.alert.tier == "recovered"
    record_plan(audit, recovered)
    assert plan_alert(assessment_of("ok", drift="ok"), spec, policy, audit, now + timedelta(hours=3)) is None
    assert plan_alert(assessment_of("insufficient_data"), spec, policy, audit, now) is None


def test_a_new_versions_alerts_are_recorded_not_sent_during_its_cold_start(audit: AuditStore) -> None:
    from modelops.stages.monitoring import plan_alert

    spec = catalog_spec()
    policy = load_catalog().policies_for(spec).monitoring
    assert policy.cold_start_days == 7
    audit.append(actor="test", action=AuditAction.MODEL_DEPLOYED, subject=f"model:{CTR}@1",
                 decision=Decision.PROMOTED, details={"champion_version": "1"})  # fmt: skip
    plan = plan_alert(assessment_of("critical"), spec, policy, audit, datetime.now(UTC))
    assert plan is not None and plan.alert is None and plan.suppressed_because.startswith("cold start: v1")
    later = plan_alert(assessment_of("critical"), spec, policy, audit, datetime.now(UTC) + timedelta(days=8))
    assert later is not None and later.alert is not None


def test_the_operator_records_the_verdict_and_the_alert_and_writes_the_outbox(
    connections: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hour is assessed, recorded, and its alert delivered through the outbox notifier; the audit log
    holds the alert with each channel's delivery."""
    monkeypatch.setenv("MODELOPS_COLD_START_DAYS", "0")
    log = PredictionLog(f"sqlite:///{connections / 'predictions.db'}")
    store = AuditStore(f"sqlite:///{connections / 'audit.db'}", keyring=keyring_for_tests())
    store.append(actor="test", action=AuditAction.MODEL_REGISTERED, subject=f"model:{CTR}@1",
                 decision=Decision.CANDIDATE, details={"metrics": {"holdout_positive_rate": BASELINE_CTR}})  # fmt: skip
    frame = generate_clicks(WINDOW_ROWS, seed=11, shift=DriftShift(**SHIFTED))
    log_labelled(log, frame, callers={"web": 0.1, "app": 0.1, "email": 0.1})
    operator = DriftMonitorOperator(
        task_id="assess_drift", model=CTR, window_start=START.isoformat(), window_end=END.isoformat()
    )
    result = operator.execute(task_context("assess_drift"))
    assert result["verdict"] == "critical"
    outbox = connections / "outbox" / "alerts.jsonl"
    (line,) = outbox.read_text().splitlines()
    sent = json.loads(line)
    assert sent["tier"] == "critical" and sent["model_name"] == CTR
    alerts = store.records(action=AuditAction.ALERT_NOTIFIED)
    assert [a.decision for a in alerts] == ["sent"]
    assert alerts[0].details["deliveries"][0]["delivered"] is True
    # The same hour assessed again (a retry): the alert is not sent twice.
    operator.execute(task_context("assess_drift"))
    assert len(outbox.read_text().splitlines()) == 1
    assert [a.decision for a in store.records(action=AuditAction.ALERT_NOTIFIED)] == ["sent", "suppressed"]
    log.dispose()
    store.dispose()


def test_a_window_whose_labels_arrive_later_is_reassessed_by_the_next_run(
    connections: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labels come hours after the predictions: the hour is first assessed with its metric pending (never a
    drop), and the next hourly run assesses it again once they are in."""
    monkeypatch.setenv("MODELOPS_COLD_START_DAYS", "0")
    log = PredictionLog(f"sqlite:///{connections / 'predictions.db'}")
    store = AuditStore(f"sqlite:///{connections / 'audit.db'}", keyring=keyring_for_tests())
    store.append(actor="test", action=AuditAction.MODEL_REGISTERED, subject=f"model:{CTR}@1",
                 decision=Decision.CANDIDATE, details={"metrics": {"holdout_positive_rate": BASELINE_CTR}})  # fmt: skip
    frame = generate_clicks(WINDOW_ROWS, seed=11, shift=DriftShift(**SHIFTED))
    log_labelled(log, frame, callers={"web": None, "app": None, "email": None})

    def run(start: datetime) -> dict[str, Any]:
        operator = DriftMonitorOperator(
            task_id="assess_drift",
            model=CTR,
            window_start=start.isoformat(),
            window_end=(start + timedelta(hours=1)).isoformat(),
        )
        return operator.execute(task_context("assess_drift"))

    first = run(START)
    assert first["verdict"] == "warning" and first["business"]["status"] == "pending_labels"
    # The labels arrive: every request of the hour gets its clicks (far fewer than the baseline).
    import numpy as np

    rng = np.random.default_rng(5)
    window = log.window(CTR, START, END, features=[])
    for request_id, rows in window.groupby("request_id"):
        log.add_labels(str(request_id), [int(x) for x in rng.random(len(rows)) < 0.1])
    later = run(END)
    assert later["verdict"] == "insufficient_data"  # the next hour itself is empty
    assessed = [
        r
        for r in store.records(action=AuditAction.DRIFT_ASSESSED)
        if r.details["window_start"] == START.isoformat()
    ]
    assert [r.decision for r in assessed] == ["warning", "critical"]
    assert assessed[-1].details["business"]["status"] == "measured"
    # Nothing new to read: the run after does not assess the hour a third time.
    run(END + timedelta(hours=1))
    assert len([r for r in store.records(action=AuditAction.DRIFT_ASSESSED)
                if r.details["window_start"] == START.isoformat()]) == 2  # fmt: skip
    log.dispose()
    store.dispose()


def test_a_notifier_that_is_down_leaves_the_verdict_on_record_and_its_failure_visible(
    connections: Path, monkeypatch: pytest.MonkeyPatch, catalog: Catalog
) -> None:
    from modelops.notifications import ChannelConfig
    from tests.support import free_port

    monkeypatch.setenv("MODELOPS_COLD_START_DAYS", "0")
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODELOPS_SMTP",
        json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": free_port(),
                    "extra": {"disable_tls": True, "disable_ssl": True, "timeout": 2, "retry_limit": 0}}),
    )  # fmt: skip
    log = PredictionLog(f"sqlite:///{connections / 'predictions.db'}")
    store = AuditStore(f"sqlite:///{connections / 'audit.db'}", keyring=keyring_for_tests())
    store.append(actor="test", action=AuditAction.MODEL_REGISTERED, subject=f"model:{CTR}@1",
                 decision=Decision.CANDIDATE, details={"metrics": {"holdout_positive_rate": BASELINE_CTR}})  # fmt: skip
    log_labelled(log, generate_clicks(WINDOW_ROWS, seed=11, shift=DriftShift(**SHIFTED)),
                 callers={"web": 0.1, "app": 0.1})  # fmt: skip
    policy = catalog.monitoring_policies["standard"]
    smtp_only = policy.model_copy(
        update={
            "cold_start_days": 0,
            "channels": [ChannelConfig(kind="smtp", conn_id="modelops_smtp", to=["ops@example.com"],
                                       attempts=2, backoff_seconds=0.01)],
        }
    )  # fmt: skip
    operator = DriftMonitorOperator(
        task_id="assess_drift", model=CTR, window_start=START.isoformat(), window_end=END.isoformat()
    )
    operator.catalog = dataclasses.replace(
        catalog, monitoring_policies={**catalog.monitoring_policies, "standard": smtp_only}
    )
    result = operator.execute(task_context("assess_drift"))
    assert result["verdict"] == "critical"
    assert [r.decision for r in store.records(action=AuditAction.DRIFT_ASSESSED)] == ["critical"]
    (alert,) = store.records(action=AuditAction.ALERT_NOTIFIED)
    smtp = [d for d in alert.details["deliveries"] if d["kind"] == "smtp"]
    assert smtp and smtp[0]["delivered"] is False and smtp[0]["attempts"] == 2
    # The outbox (always on) still has it, so the alert is sent, and the SMTP failure is on record.
    assert alert.decision == "sent"
    log.dispose()
    store.dispose()


def test_a_reference_whose_bytes_changed_stops_the_window_with_a_clear_error(
    tmp_path: Path, served: Served, catalog: Catalog, prediction_log: PredictionLog, reference
) -> None:
    copy = tmp_path / "clicks.csv"
    reference.to_csv(copy, index=False)
    version = register(
        served, CTR, tags={Tag.TRAIN_DATA_SHA256: sha256_file(copy), Tag.TRAIN_DATA_URI: str(copy)}
    )
    log_predictions(prediction_log, CTR, generate_clicks(WINDOW_ROWS, seed=2), version=version)
    copy.write_text(copy.read_text() + copy.read_text().splitlines()[1] + "\n")  # one row added afterwards
    with pytest.raises(MonitoringError, match="it changed since; restore the validated snapshot"):
        assess_window(served, catalog, CTR, prediction_log, tmp_path / "storage")
