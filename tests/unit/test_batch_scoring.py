"""Batch scoring on Spark: a real click model trained and registered in a real SQLite MLflow registry,
promoted in a real keyed audit log, scoring a real folder of CSV files and a Parquet file through real
Spark (local mode, one session for the module) with ``mlflow.pyfunc.spark_udf``; the scores, the prediction
log and the audit record checked against the model's own in-process predictions and the files' bytes."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from modelops.audit import AuditStore
from modelops.data.synthetic import generate_clicks
from modelops.errors import BatchScoringError, ConfigurationError
from modelops.registry import ModelRegistry
from modelops.serving.prediction_log import PredictionLog, predictions_table
from modelops.settings import ModelSpec, load_catalog
from modelops.spark import DEFAULT_MASTER, spark_session, spark_settings
from modelops.stages.batch_scoring import (
    OUTPUT_FILE,
    batch_caller_id,
    chunk_request_id,
    score_batch,
)
from modelops.stages.training import build_pipeline
from modelops.vocabulary import Alias, AuditAction, Decision
from tests.support import authorise, keyring_for_tests, mlflow_client, sqlite_tracking_uri

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

CTR = "ctr_recommender"
EXPERIMENT = "modelops-tests/batch-scoring"
# A value only the input's non-feature column holds: it must reach neither the output nor the audit log.
MARKER = "do-not-log-7f3a"


@dataclass
class Model:
    registry: ModelRegistry
    spec: ModelSpec
    version: str
    run_id: str
    model_dir: Path
    root: Path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """The click model trained for real, saved as training saves it (skops, signature, predict_proba)."""
    import mlflow.sklearn
    from mlflow.models import infer_signature

    spec = load_catalog().model(CTR)
    root = tmp_path_factory.mktemp("batch")
    tracking_uri = sqlite_tracking_uri(root)
    mlflow_client(tracking_uri).create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    training = generate_clicks(1500, seed=3)
    pipeline = build_pipeline(spec).fit(training[spec.features], training[spec.target])
    example = training[spec.features].head(5)
    model_dir = root / "model"
    mlflow.sklearn.save_model(
        pipeline,
        str(model_dir),
        pip_requirements=["scikit-learn"],
        signature=infer_signature(example, pipeline.predict_proba(example)),
        pyfunc_predict_fn="predict_proba",
        serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
        skops_trusted_types=spec.skops_trusted_types,
    )
    registry = ModelRegistry(tracking_uri)
    run_id = registry.log_run(
        experiment=EXPERIMENT, run_name="fixture", tags={}, artifact_dirs={"model": model_dir}
    )
    registry.ensure_model(CTR, {})
    version = registry.register_version(CTR, run_id=run_id, artifact_path="model", tags={}).version
    return Model(registry, spec, version, run_id, model_dir, root)


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    """One real Spark session (local mode) for the module, as the operator starts one per task."""
    from pyspark import SparkContext

    with spark_session() as session:
        jvm = SparkContext._gateway.proc
        yield session
    assert jvm.poll() is not None, "the Spark JVM outlived its session"
    assert SparkContext._gateway is None


@pytest.fixture
def audit(tmp_path: Path, model: Model) -> Iterator[AuditStore]:
    """An audit log in which the fixture's version is the promoted champion."""
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}", keyring=keyring_for_tests())
    authorise(store, model.registry, CTR, model.version, approve=False, promote=True)
    yield store
    store.dispose()


@pytest.fixture
def log(tmp_path: Path) -> Iterator[PredictionLog]:
    prediction_log = PredictionLog(f"sqlite:///{tmp_path / 'predictions.db'}")
    yield prediction_log
    prediction_log.dispose()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """The roots batch scoring may read: a folder of two CSV files and one Parquet file beside it. The
    inputs carry ``user_id`` (a key), the target and a free-text column (neither is a feature)."""
    root = tmp_path / "data"
    folder = root / "csv"
    folder.mkdir(parents=True)
    for index, (rows, seed) in enumerate(((1200, 11), (700, 12))):
        frame = generate_clicks(rows, seed=seed)
        frame["note"] = MARKER
        frame.to_csv(folder / f"part-{index}.csv", index=False)
    (folder / "_SUCCESS").write_text("")  # a writer's marker file: skipped
    frame = generate_clicks(900, seed=13)
    frame["note"] = MARKER
    frame.to_parquet(root / "clicks.parquet", index=False)
    return root


def expected_p1(model: Model, frame: pd.DataFrame) -> np.ndarray:
    """The champion's own predictions, in this process: p1 of MLflow's pyfunc of the saved model."""
    import mlflow.pyfunc

    return np.asarray(mlflow.pyfunc.load_model(str(model.model_dir)).predict(frame[model.spec.features]))[
        :, 1
    ]


def run(model: Model, audit: AuditStore, log: PredictionLog, session: Any, data: Path, **kwargs: Any) -> Any:
    """The stage as the operator calls it; ``session``: the module's Spark session (None: pass ``spark=``)."""
    arguments: dict[str, Any] = {
        "spec": model.spec,
        "registry": model.registry,
        "audit": audit,
        "prediction_log": log,
        "spark": nullcontext(session),
        "input_uri": str(data / "csv"),
        "output_uri": str(data.parent / "out"),
        "input_roots": [str(data)],
        "caller_id": batch_caller_id("modelops_batch_scoring", "manual__test"),
        "chunk_rows": 500,
    }
    return score_batch(**(arguments | kwargs))


def logged(log: PredictionLog) -> pd.DataFrame:
    with log.engine.connect() as conn:
        return pd.read_sql(sa.select(predictions_table).order_by(predictions_table.c.request_id), conn)


@contextmanager
def no_spark() -> Iterator[None]:
    raise AssertionError("a refused batch must not start Spark")
    yield  # pragma: no cover


def test_folder_of_csv_scores_as_the_model_does_with_log_and_record(
    model: Model, audit: AuditStore, log: PredictionLog, spark: Any, data: Path
) -> None:
    outcome = run(model, audit, log, spark, data)

    assert outcome.decision == Decision.SCORED and outcome.refusal is None, outcome.summary
    # The scores: every row of both files, in order, keyed, equal to the in-process predictions.
    frames = [pd.read_csv(data / "csv" / f"part-{i}.csv") for i in (0, 1)]
    scores = pd.read_parquet(data.parent / "out" / OUTPUT_FILE)
    assert list(scores.columns) == ["user_id", "source_file", "row_number", "prediction"]
    assert len(scores) == 1900
    assert scores["source_file"].tolist() == ["part-0.csv"] * 1200 + ["part-1.csv"] * 700
    assert scores["row_number"].tolist() == list(range(1200)) + list(range(700))
    both = pd.concat(frames, ignore_index=True)
    assert scores["user_id"].tolist() == both["user_id"].tolist()
    np.testing.assert_allclose(scores["prediction"].to_numpy(), expected_p1(model, both), rtol=1e-12)
    metadata = pq.read_schema(data.parent / "out" / OUTPUT_FILE).metadata
    assert metadata[b"modelops.version"] == model.version.encode()

    # The prediction log: one record per 500 rows per file (3 + 2), every row with its output.
    rows = logged(log)
    caller = batch_caller_id("modelops_batch_scoring", "manual__test")
    assert set(rows["caller_id"]) == {caller} and set(rows["model_version"]) == {model.version}
    assert len(rows) == 5 and rows["n_rows"].sum() == 1900 and set(rows["status_code"]) == {200}
    first = rows.set_index("request_id").loc[chunk_request_id(caller, CTR, 0, 0)]
    assert (
        json.loads(first["inputs"])[0]
        == json.loads(frames[0].loc[[0], model.spec.features].to_json(orient="records"))[0]
    )
    assert len(json.loads(first["outputs"])) == 500
    assert json.loads(first["outputs"])[0][1] == pytest.approx(scores["prediction"].iloc[0])

    # The audit record: the champion record it scored under, every input's and the output's sha256.
    (entry,) = outcome.records
    assert entry.action == AuditAction.BATCH_SCORED and entry.decision == Decision.SCORED
    assert entry.subject == f"model:{CTR}@{model.version}"
    (promotion,) = audit.records(action=AuditAction.MODEL_DEPLOYED)
    details = entry.details
    assert details["champion_record_seq"] == promotion.seq and details["version"] == model.version
    assert details["rows"] == 1900 and details["key_columns"] == ["user_id"]
    assert [f["sha256"] for f in details["input"]["files"]] == [
        hashlib.sha256((data / "csv" / f"part-{i}.csv").read_bytes()).hexdigest() for i in (0, 1)
    ]
    assert (
        details["output"]["sha256"]
        == hashlib.sha256((data.parent / "out" / OUTPUT_FILE).read_bytes()).hexdigest()
    )
    written = audit.append(
        actor="test",
        action=entry.action,
        subject=entry.subject,
        decision=entry.decision,
        details=entry.details,
    )
    assert audit.authentic(written)
    # No data value in the record (the free-text column's marker, a feature value).
    text = json.dumps(details)
    assert MARKER not in text and MARKER not in outcome.summary
    assert outcome.asset_extra["version"] == model.version and outcome.asset_extra["rows"] == 1900
    assert outcome.details["rows_per_second"] > 0


def test_parquet_file_with_named_id_columns(
    model: Model, audit: AuditStore, log: PredictionLog, spark: Any, data: Path
) -> None:
    outcome = run(
        model,
        audit,
        log,
        spark,
        data,
        input_uri=str(data / "clicks.parquet"),
        id_columns=["user_id", "clicked"],
        chunk_rows=10_000,
    )

    assert outcome.decision == Decision.SCORED, outcome.summary
    frame = pd.read_parquet(data / "clicks.parquet")
    scores = pd.read_parquet(data.parent / "out" / OUTPUT_FILE)
    assert list(scores.columns) == ["user_id", "clicked", "source_file", "row_number", "prediction"]
    assert scores["clicked"].tolist() == frame["clicked"].tolist()
    np.testing.assert_allclose(scores["prediction"].to_numpy(), expected_p1(model, frame), rtol=1e-12)
    rows = logged(log)
    assert len(rows) == 1 and rows["n_rows"].tolist() == [900]


def test_a_retry_overwrites_its_output_and_logs_nothing_twice(
    model: Model, audit: AuditStore, log: PredictionLog, spark: Any, data: Path
) -> None:
    first = run(model, audit, log, spark, data)
    output = data.parent / "out" / OUTPUT_FILE
    before = logged(log)
    output.write_bytes(b"half a file from a crashed try")

    again = run(model, audit, log, spark, data)

    assert again.decision == Decision.SCORED
    assert (
        again.details["prediction_log_records_written"] == 0
        and first.details["prediction_log_records_written"] == 5
    )
    after = logged(log)
    pd.testing.assert_frame_equal(after, before)
    assert again.details["output"]["sha256"] == first.details["output"]["sha256"]
    assert hashlib.sha256(output.read_bytes()).hexdigest() == first.details["output"]["sha256"]
    # Another run of the same input is another caller: logged anew, under its own request ids.
    run(model, audit, log, spark, data, caller_id=batch_caller_id("modelops_batch_scoring", "manual__other"))
    assert len(logged(log)) == 10


def register_copy(model: Model, folder: Path, run_name: str) -> tuple[str, str]:
    """A new version with its own copy of the model's files; returns (run id, version)."""
    shutil.copytree(model.model_dir, folder / "model")
    run_id = model.registry.log_run(
        experiment=EXPERIMENT, run_name=run_name, tags={}, artifact_dirs={"model": folder / "model"}
    )
    return run_id, model.registry.register_version(CTR, run_id=run_id, artifact_path="model", tags={}).version


def test_a_retry_after_the_champion_changed_is_refused(
    model: Model, audit: AuditStore, log: PredictionLog, spark: Any, data: Path, tmp_path: Path
) -> None:
    run(model, audit, log, spark, data, chunk_rows=10_000)
    _, newer = register_copy(model, tmp_path / "newer", "newer")
    authorise(audit, model.registry, CTR, newer, approve=False, promote=True)

    retry = run(model, audit, log, None, data, spark=no_spark(), chunk_rows=10_000)

    assert retry.decision == Decision.REFUSED
    assert f"logged its scores with v{model.version}, and the champion is v{newer}" in retry.refusal
    assert len(logged(log)) == 2


def test_model_files_changed_after_promotion_are_refused(
    model: Model, tmp_path: Path, log: PredictionLog, data: Path
) -> None:
    """A second version promoted, then its MLmodel overwritten through MLflow's artifact API: nothing of it is
    loaded, nothing is scored or logged, and the refusal is on record."""
    folder = tmp_path / "copy"
    run_id, victim = register_copy(model, folder, "tamper")
    store = AuditStore(f"sqlite:///{tmp_path / 'audit-victim.db'}", keyring=keyring_for_tests())
    authorise(store, model.registry, CTR, victim, approve=False, promote=True)
    mlmodel = folder / "model" / "MLmodel"
    mlmodel.write_text(mlmodel.read_text() + "\n# tampered\n")
    mlflow_client(model.registry.tracking_uri).log_artifact(run_id, str(mlmodel), "model")

    outcome = run(model, store, log, None, data, spark=no_spark())

    assert outcome.decision == Decision.REFUSED
    assert "MLmodel changed" in outcome.refusal and f"version {victim}" in outcome.refusal
    assert outcome.records[0].decision == Decision.REFUSED
    assert outcome.records[0].subject == f"model:{CTR}@{victim}"
    assert logged(log).empty and not (data.parent / "out").exists()
    store.dispose()


def test_no_champion_is_refused_naming_the_model(
    model: Model, tmp_path: Path, log: PredictionLog, data: Path
) -> None:
    """The registry's alias does not count: only a promotion (or rollback) record names a champion."""
    model.registry.set_alias(CTR, Alias.CHAMPION, model.version)
    store = AuditStore(f"sqlite:///{tmp_path / 'empty-audit.db'}", keyring=keyring_for_tests())

    outcome = run(model, store, log, None, data, spark=no_spark())

    assert outcome.decision == Decision.REFUSED
    assert f"model {CTR!r} has no champion" in outcome.refusal and "modelops_deployment" in outcome.refusal
    store.dispose()


def test_missing_feature_columns_are_named(
    model: Model, audit: AuditStore, log: PredictionLog, data: Path
) -> None:
    frame = pd.read_csv(data / "csv" / "part-1.csv").drop(columns=["device", "item_price"])
    frame.to_csv(data / "csv" / "part-1.csv", index=False)

    outcome = run(model, audit, log, None, data, spark=no_spark())

    assert outcome.decision == Decision.REFUSED
    assert "part-1.csv lacks the feature column(s) ['item_price', 'device']" in outcome.refusal
    assert "part-0.csv" not in outcome.refusal and MARKER not in outcome.refusal


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("missing", "does not exist"),
        ("outside", "outside the folders batch scoring may read"),
        ("garbage", "is not a readable parquet file"),
        ("empty", "is empty"),
    ],
)
def test_unreadable_or_missing_input_is_named(
    model: Model, audit: AuditStore, log: PredictionLog, data: Path, tmp_path: Path, where: str, expected: str
) -> None:
    target = {
        "missing": data / "nowhere",
        "outside": tmp_path / "elsewhere.csv",
        "garbage": data / "broken.parquet",
        "empty": data / "empty.csv",
    }[where]
    if where == "outside":
        shutil.copy(data / "csv" / "part-0.csv", target)
    elif where == "garbage":
        target.write_bytes(b"PAR1 not really")
    elif where == "empty":
        target.write_bytes(b"")

    outcome = run(model, audit, log, None, data, spark=no_spark(), input_uri=str(target))

    assert outcome.decision == Decision.REFUSED
    assert expected in outcome.refusal and str(target.name) in outcome.refusal


def test_serving_disabled_is_refused(model: Model, audit: AuditStore, log: PredictionLog, data: Path) -> None:
    spec = model.spec.model_copy(update={"serving": model.spec.serving.model_copy(update={"enabled": False})})
    disabled = Model(model.registry, spec, model.version, model.run_id, model.model_dir, model.root)

    outcome = run(disabled, audit, log, None, data, spark=no_spark())

    assert outcome.decision == Decision.REFUSED and "serving disabled" in outcome.refusal


def with_an_email(data: Path) -> str:
    """Row 3 of part-1.csv gets an email address as its ``device`` (a text feature); returns the address."""
    address = "jane.doe@example.com"
    frame = pd.read_csv(data / "csv" / "part-1.csv")
    frame.loc[3, "device"] = address
    frame.to_csv(data / "csv" / "part-1.csv", index=False)
    return address


def test_personal_data_in_a_feature_is_refused_as_the_gateway_refuses_it(
    model: Model, audit: AuditStore, log: PredictionLog, data: Path
) -> None:
    address = with_an_email(data)
    patterns = load_catalog().dataset(model.spec.dataset).pii_patterns

    outcome = run(model, audit, log, None, data, spark=no_spark(), pii_patterns=patterns)

    assert outcome.decision == Decision.REFUSED
    assert "personal data" in outcome.refusal and "column 'device': email address" in outcome.refusal
    assert address not in json.dumps(outcome.records[0].details) and logged(log).empty


def test_personal_data_is_masked_in_the_log_when_the_spec_says_mask(
    model: Model, audit: AuditStore, log: PredictionLog, spark: Any, data: Path
) -> None:
    address = with_an_email(data)
    serving = model.spec.serving.model_copy(
        update={"screening": model.spec.serving.screening.model_copy(update={"pii": "mask"})}
    )
    masking = Model(
        model.registry,
        model.spec.model_copy(update={"serving": serving}),
        model.version,
        model.run_id,
        model.model_dir,
        model.root,
    )
    patterns = load_catalog().dataset(model.spec.dataset).pii_patterns

    outcome = run(masking, audit, log, spark, data, pii_patterns=patterns, chunk_rows=10_000)

    assert outcome.decision == Decision.SCORED, outcome.summary
    assert outcome.records[0].details["pii"] == {
        "screening": "mask",
        "masked_in_log": {"device": ["email address"]},
    }
    rows = logged(log)
    second = json.loads(rows.set_index("request_id").loc[chunk_request_id(run_caller(), CTR, 1, 0), "inputs"])
    assert second[3]["device"] == "ja***" and address not in rows["inputs"].str.cat()
    # The model scored the rows as read.
    raw = pd.read_csv(data / "csv" / "part-1.csv")
    scores = pd.read_parquet(data.parent / "out" / OUTPUT_FILE)
    np.testing.assert_allclose(scores["prediction"].to_numpy()[1200:], expected_p1(model, raw), rtol=1e-12)


def run_caller() -> str:
    return batch_caller_id("modelops_batch_scoring", "manual__test")


def test_spark_settings_from_the_environment() -> None:
    assert spark_settings({}).master == DEFAULT_MASTER
    cluster = spark_settings(
        {
            "MODELOPS_SPARK_MASTER": "spark://spark-master:7077",
            "MODELOPS_SPARK_CONF": '{"spark.executor.memory": "4g"}',
        }
    )
    assert cluster.master == "spark://spark-master:7077" and not cluster.local
    assert cluster.conf == {"spark.executor.memory": "4g"}
    with pytest.raises(ConfigurationError, match="MODELOPS_SPARK_CONF is not valid JSON"):
        spark_settings({"MODELOPS_SPARK_CONF": "{spark"})


# --- through the operator, as the DAG's task runs it -------------------------------------------------


class OutletEvents(dict):
    def __missing__(self, key: Any) -> Any:
        from types import SimpleNamespace

        self[key] = SimpleNamespace(extra={})
        return self[key]


def operator_context(params: dict[str, Any]) -> dict[str, Any]:
    from types import SimpleNamespace

    return {
        "dag_run": SimpleNamespace(
            dag_id="modelops_batch_scoring",
            run_id="manual__2026-11-27T20:00:00+00:00",
            triggering_user_name=None,
        ),
        "ti": SimpleNamespace(task_id="score_batch"),
        "params": params,
        "outlet_events": OutletEvents(),
    }


@pytest.fixture
def through_airflow(
    model: Model, spark: Any, data: Path, modelops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The hooks' connections (MLflow, audit and prediction logs in ``modelops_home``), the data folder as a
    dataset root, the promotion on record, and the module's Spark session handed to the operator."""
    import modelops.spark

    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT",
        json.dumps({"conn_type": "http", "extra": {"tracking_uri": model.registry.tracking_uri}}),
    )
    monkeypatch.setenv("MODELOPS_DATASET_ROOT", str(data))
    monkeypatch.setattr(modelops.spark, "spark_session", lambda **_: nullcontext(spark))
    store = AuditStore(f"sqlite:///{modelops_home / 'audit.db'}", keyring=keyring_for_tests())
    authorise(store, model.registry, CTR, model.version, approve=False, promote=True)
    store.dispose()
    return modelops_home


def test_the_operator_records_logs_and_emits_the_asset(
    model: Model, data: Path, through_airflow: Path
) -> None:
    from modelops.assets import BATCH_SCORES
    from modelops.operators.batch_scoring import BatchScoreOperator

    home = through_airflow
    operator = BatchScoreOperator(task_id="score_batch", outlets=[BATCH_SCORES])
    context = operator_context({"model": CTR, "input_uri": str(data / "clicks.parquet"), "output_uri": None})

    xcom = operator.execute(context)

    # The default output: <storage_root>/batch_scores/<model>/<run id as a folder name>/scores.parquet.
    output = home / "storage" / "batch_scores" / CTR / "manual__2026-11-27T20_00_00_00_00" / OUTPUT_FILE
    assert xcom["decision"] == "scored" and xcom["output"]["uri"] == output.as_uri()
    assert len(pd.read_parquet(output)) == 900
    store = AuditStore(f"sqlite:///{home / 'audit.db'}", keyring=keyring_for_tests())
    (record,) = store.records(action=AuditAction.BATCH_SCORED)
    assert record.decision == Decision.SCORED and store.authentic(record)
    assert record.actor == "airflow:modelops_batch_scoring.score_batch"
    assert record.details["output"]["sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
    store.dispose()
    log = PredictionLog(f"sqlite:///{home / 'predictions.db'}")
    rows = logged(log)
    log.dispose()
    assert rows["caller_id"].tolist() == ["batch:modelops_batch_scoring/manual__2026-11-27T20:00:00+00:00"]
    assert rows["n_rows"].tolist() == [900]
    assert context["outlet_events"][BATCH_SCORES].extra["rows"] == 900


def test_the_operator_fails_a_refusal_on_record(data: Path, through_airflow: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from modelops.operators.batch_scoring import BatchScoreOperator

    operator = BatchScoreOperator(task_id="score_batch")
    context = operator_context({"model": CTR, "input_uri": str(data / "missing.csv"), "output_uri": None})

    with pytest.raises(AirflowFailException, match="missing.csv does not exist"):
        operator.execute(context)

    store = AuditStore(f"sqlite:///{through_airflow / 'audit.db'}", keyring=keyring_for_tests())
    (record,) = store.records(action=AuditAction.BATCH_SCORED)
    assert record.decision == Decision.REFUSED and "missing.csv" in record.details["reason"]
    store.dispose()


# --- last: a failure in Spark's workers ---------------------------------------------------------------


def test_a_failing_model_call_names_its_type_and_no_value(
    model: Model, audit: AuditStore, log: PredictionLog, spark: Any, data: Path, capfd: pytest.CaptureFixture
) -> None:
    """A text where the signature wants a number fails in the Spark worker (MLflow's schema check, whose
    message may quote values): retried by Airflow, named by type, and no value reaches the logs. Last in
    the module: the failed task's Python workers are not reused, the next scoring would load anew."""
    frame = pd.read_csv(data / "csv" / "part-0.csv")
    frame["user_age"] = frame["user_age"].astype(str)
    frame.loc[5, "user_age"] = "forty-two-7f3a"
    frame.to_csv(data / "csv" / "part-0.csv", index=False)
    capfd.readouterr()

    with pytest.raises(BatchScoringError, match="Spark failed to score a slice of 1200 rows") as failure:
        run(model, audit, log, spark, data)

    assert "forty-two" not in str(failure.value) and failure.value.__cause__ is None
    out, err = capfd.readouterr()
    assert "forty-two" not in out + err
    assert logged(log).empty
