"""Monitoring's reference: profiled once per version and reused, switched to the version's own production
traffic after its cold start when the policy says so (recorded in the audit log), rebuilt byte-identical
when its file goes missing, refused when its source changed; prediction drift against the model's own
outputs on the reference; drift per caller. A real SQLite MLflow registry with a real trained model, a real
prediction log and a real keyed audit log."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from modelops.audit import AuditStore
from modelops.data.synthetic import DriftShift, generate_clicks
from modelops.errors import MonitoringError
from modelops.evidence import CHAMPION_FIELD, evidence_summary, version_file_hashes
from modelops.monitoring_history import MonitoringHistory
from modelops.monitoring_reference import ReferenceProfile, build_profile, frame_sha256
from modelops.registry import ModelRegistry
from modelops.serving.prediction_log import PredictionLog, PredictionRecord, predictions_table
from modelops.settings import Catalog, ModelSpec, MonitoringPolicy, ReferencePolicy, load_catalog
from modelops.stages.monitoring import assess
from modelops.stages.training import build_pipeline
from modelops.storage import as_storage_path
from modelops.vocabulary import Alias, AuditAction, Decision, Tag
from tests.support import keyring_for_tests

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

CTR = "ctr_recommender"
EXPERIMENT = "modelops-tests/monitoring-reference"


@dataclass
class Model:
    registry: ModelRegistry
    spec: ModelSpec
    catalog: Catalog
    version: str
    train_sha: str
    pipeline: Any
    root: Path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """The click model trained for real on 3,000 synthetic rows, registered with its lineage tags."""
    import hashlib

    import mlflow.sklearn
    from mlflow import MlflowClient

    catalog = load_catalog()
    spec = catalog.model(CTR)
    root = tmp_path_factory.mktemp("reference")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    for experiment in (EXPERIMENT, spec.experiment_name):
        client.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())
    training = generate_clicks(3000, seed=7)
    train_file = root / "clicks.csv"
    training.to_csv(train_file, index=False)
    pipeline = build_pipeline(spec).fit(training[spec.features], training[spec.target])
    model_dir = root / "model"
    mlflow.sklearn.save_model(
        pipeline,
        str(model_dir),
        pip_requirements=["scikit-learn"],
        pyfunc_predict_fn="predict_proba",
        serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
        skops_trusted_types=spec.skops_trusted_types,
    )
    registry = ModelRegistry(tracking_uri)
    run_id = registry.log_run(
        experiment=EXPERIMENT, run_name="fixture", tags={}, artifact_dirs={"model": model_dir}
    )
    registry.ensure_model(CTR, {})
    sha = hashlib.sha256(train_file.read_bytes()).hexdigest()
    version = registry.register_version(
        CTR,
        run_id=run_id,
        artifact_path="model",
        tags={Tag.TRAIN_DATA_SHA256: sha, Tag.TRAIN_DATA_URI: str(train_file)},
    ).version
    registry.set_alias(CTR, Alias.CHAMPION, version)
    return Model(registry, spec, catalog, version, sha, pipeline, root)


@pytest.fixture
def audit(tmp_path: Path, model: Model) -> AuditStore:
    """The version's promotion record (with its file hashes): its cold start starts now."""
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}", keyring=keyring_for_tests())
    store.append(
        actor="test",
        action=AuditAction.MODEL_DEPLOYED,
        subject=f"model:{CTR}@{model.version}",
        decision=Decision.PROMOTED,
        details={
            CHAMPION_FIELD: model.version,
            **evidence_summary(version_file_hashes(model.registry, CTR, model.version)),
        },
    )
    yield store
    store.dispose()


def promoted_at(audit: AuditStore) -> datetime:
    (record,) = audit.records(action=AuditAction.MODEL_DEPLOYED)
    return datetime.fromisoformat(record.recorded_at)


@pytest.fixture
def log(tmp_path: Path) -> PredictionLog:
    prediction_log = PredictionLog(f"sqlite:///{tmp_path / 'predictions.db'}")
    yield prediction_log
    prediction_log.dispose()


def log_traffic(
    log: PredictionLog,
    model: Model,
    frame: pd.DataFrame,
    start: datetime,
    *,
    hours: float = 1.0,
    callers: tuple[str, ...] = ("web", "app", "email"),
    outputs: float | None = None,
    per_call: int = 20,
    click_rate: float | None = None,
    seed: int = 0,
) -> None:
    """``frame`` as calls spread over ``hours`` from ``start``, rotating over ``callers``; the logged outputs
    are the model's own probability pairs (or ``outputs`` as p1 for every row); with ``click_rate``, every
    call gets its labels, clicks drawn at that rate."""
    rng = np.random.default_rng(seed)
    proba = model.pipeline.predict_proba(frame[model.spec.features])
    calls = range(0, len(frame), per_call)
    for index, first in enumerate(calls):
        rows = frame.iloc[first : first + per_call]
        pairs = proba[first : first + per_call].tolist()
        if outputs is not None:
            pairs = [[1 - outputs, outputs]] * len(rows)
        request_id = uuid.uuid4().hex
        log.record(
            PredictionRecord(
                request_id=request_id,
                received_at=start + timedelta(hours=hours * index / len(calls)),
                caller_id=callers[index % len(callers)],
                model_name=CTR,
                model_version=model.version,
                status_code=200,
                latency_ms=3.0,
                n_rows=len(rows),
                inputs=rows[model.spec.features].to_dict(orient="records"),
                outputs=pairs,
            )
        )
        if click_rate is not None:
            log.add_labels(request_id, [int(x) for x in rng.random(len(rows)) < click_rate])


def switching_policy(model: Model, **update: Any) -> MonitoringPolicy:
    """The model's policy with a one-day cold start and the production window as the reference after it."""
    policy = model.catalog.policies_for(model.spec).monitoring
    reference = ReferencePolicy(after_cold_start="production_window", production_window_hours=12)
    return policy.model_copy(update={"cold_start_days": 1, "reference": reference, **update})


def run(
    model: Model,
    log: PredictionLog,
    audit: AuditStore,
    storage: Path,
    start: datetime,
    policy: MonitoringPolicy,
    history: MonitoringHistory | None = None,
):
    """Assess the hour from ``start`` and write its records, as the operator does."""
    outcome = assess(
        spec=model.spec,
        policy=policy,
        registry=model.registry,
        prediction_log=log,
        storage=as_storage_path(storage),
        start=start,
        end=start + timedelta(hours=1),
        audit=audit,
        history=history,
    )
    for entry in outcome.records:
        audit.append(
            actor="test",
            action=entry.action,
            subject=entry.subject,
            decision=entry.decision,
            details=entry.details,
            evidence=entry.evidence,
        )
    for effect in outcome.effects:
        effect()
    return outcome


def local(uri: str) -> Path:
    """The local file behind a ``file:`` storage URI."""
    from urllib.parse import urlparse

    return Path(urlparse(uri).path)


def reference_records(audit: AuditStore) -> list[Any]:
    return audit.records(action=AuditAction.MONITORING_REFERENCE_SET)


# --- the profile ----------------------------------------------------------------------------------------


def test_a_profile_is_canonical_json_and_reads_back_to_the_same_sample(model: Model) -> None:
    frame = generate_clicks(8000, seed=3)
    frame.loc[5, "user_age"] = np.nan
    profile = build_profile(frame, model.spec, sample_rows=5000, source="training_data", source_sha256="x")
    again = build_profile(frame, model.spec, sample_rows=5000, source="training_data", source_sha256="x")
    assert profile.to_json() == again.to_json() and profile.sha256 == again.sha256
    back = ReferenceProfile.from_json(profile.to_json())
    assert back == profile and back.sample_rows == 5000 and profile.rows == 8000
    sample = frame[model.spec.features].sample(5000, random_state=0).sort_index()
    restored = back.sample_frame(model.spec)
    for column in model.spec.numeric_features:
        np.testing.assert_array_equal(restored[column].to_numpy(), sample[column].to_numpy(dtype="float64"))
    for column in model.spec.categorical_features:
        assert restored[column].tolist() == sample[column].tolist()
    # Ranges and categories are the whole reference's, not the sample's.
    assert profile.ranges["user_age"] == [frame["user_age"].min(), frame["user_age"].max()]
    for column in model.spec.categorical_features:
        assert profile.categories[column] == sorted(frame[column].astype(str).unique())
    with pytest.raises(ValueError, match="not a reference profile"):
        ReferenceProfile.from_json(b'{"format": 99}')


def test_frame_sha256_changes_with_any_value(model: Model) -> None:
    frame = generate_clicks(300, seed=3)[model.spec.features]
    altered = frame.copy()
    altered.iloc[17, 0] = altered.iloc[17, 0] + 1
    assert frame_sha256(frame) == frame_sha256(frame.copy()) != frame_sha256(altered)


# --- the stage --------------------------------------------------------------------------------------------


def test_the_training_profile_is_built_once_recorded_and_reused(
    tmp_path: Path, model: Model, log: PredictionLog, audit: AuditStore
) -> None:
    policy = model.catalog.policies_for(model.spec).monitoring
    start = promoted_at(audit).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    log_traffic(log, model, generate_clicks(400, seed=11), start)
    log_traffic(log, model, generate_clicks(400, seed=12), start + timedelta(hours=1))
    first = run(model, log, audit, tmp_path, start, policy)
    (record,) = reference_records(audit)
    assert record.decision == Decision.TRAINING_DATA and record.details["requested"] == "training_data"
    assert "cold start" in record.details["reason"]
    assert record.details["source_sha256"] == model.train_sha
    profile_file = local(record.details["profile_uri"])
    assert profile_file.is_file()
    assert record.evidence["profile"] == first.records[0].details["reference"]["profile_sha256"]
    # The model's own outputs on the reference: its outputs in a stationary hour do not drift from them.
    drift = first.records[0].details["prediction_drift"]
    assert drift["method"] == "wasserstein" and drift["drifted"] is False, drift
    assert first.decision == "ok"

    second = run(model, log, audit, tmp_path, start + timedelta(hours=1), policy)
    assert len(reference_records(audit)) == 1  # reused, not recorded again
    assert second.records[0].details["reference"] == first.records[0].details["reference"]

    # A deleted profile is rebuilt from the training data, byte for byte.
    profile_file.unlink()
    again = run(model, log, audit, tmp_path, start, policy)
    assert profile_file.is_file() and len(reference_records(audit)) == 1
    assert again.details["report_sha256"] == first.details["report_sha256"]


def test_outputs_that_moved_without_the_inputs_are_prediction_drift(
    tmp_path: Path, model: Model, log: PredictionLog, audit: AuditStore
) -> None:
    policy = model.catalog.policies_for(model.spec).monitoring
    start = promoted_at(audit).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    # Same inputs as training, but every answer was 0.9 (e.g. a broken feature pipeline in the model).
    log_traffic(log, model, generate_clicks(400, seed=11), start, outputs=0.9)
    outcome = run(model, log, audit, tmp_path, start, policy)
    details = outcome.records[0].details
    assert details["drifted_features"] == [] and details["prediction_drift"]["drifted"] is True
    assert outcome.decision == "warning"
    assert any("outputs drifted" in reason for reason in details["reasons"])


def test_after_the_cold_start_the_reference_switches_to_production_traffic(
    tmp_path: Path, model: Model, log: PredictionLog, audit: AuditStore
) -> None:
    policy = switching_policy(model)
    promoted = promoted_at(audit)
    cold_end = promoted + timedelta(days=1)
    # Production differs from the training data (older users): the cold start's last 12 h are that traffic.
    older = DriftShift(age_shift=6.0)
    log_traffic(
        log, model, generate_clicks(1200, seed=21, shift=older), cold_end - timedelta(hours=12), hours=12
    )
    during = promoted.replace(minute=0, second=0, microsecond=0) + timedelta(hours=2)
    log_traffic(log, model, generate_clicks(400, seed=22, shift=older), during)
    after = cold_end.replace(minute=0, second=0, microsecond=0) + timedelta(hours=2)
    log_traffic(log, model, generate_clicks(400, seed=23, shift=older), after)

    in_cold_start = run(model, log, audit, tmp_path, during, policy)
    assert in_cold_start.records[0].details["reference"]["source"] == "training_data"
    assert "user_age" in in_cold_start.records[0].details["drifted_features"]  # against training: drift

    switched = run(model, log, audit, tmp_path, after, policy)
    training_record, production_record = reference_records(audit)
    assert training_record.decision == Decision.TRAINING_DATA
    assert production_record.decision == Decision.PRODUCTION_WINDOW
    assert production_record.details["requested"] == "production_window"
    window = production_record.details["window"]
    assert (window["start"], window["end"]) == (
        (cold_end - timedelta(hours=12)).isoformat(),
        cold_end.isoformat(),
    )
    assert (
        production_record.details["rows"] == 1200 and "cold start over" in production_record.details["reason"]
    )
    reference = switched.records[0].details["reference"]
    assert (
        reference["source"] == "production_window"
        and reference["profile_sha256"] == production_record.evidence["profile"]
    )
    # Against its own production traffic the same older users are no drift, and neither are its outputs.
    assert switched.decision == "ok" and "user_age" not in switched.records[0].details["drifted_features"]
    assert switched.records[0].details["prediction_drift"]["drifted"] is False

    # A backfill of the cold-start hour still gets the training data; the switch is not recorded twice.
    again = run(model, log, audit, tmp_path, during, policy)
    assert again.details["report_sha256"] == in_cold_start.details["report_sha256"]
    assert len(reference_records(audit)) == 2

    # The production traffic it was built from is altered and the profile deleted: no silent rebuild.
    local(production_record.details["profile_uri"]).unlink()
    with log.engine.begin() as conn:
        first_call = conn.execute(
            sa.select(predictions_table.c.request_id)
            .where(predictions_table.c.received_at >= cold_end - timedelta(hours=12))
            .order_by(predictions_table.c.received_at)
            .limit(1)
        ).scalar_one()
        inputs = json.loads(
            conn.execute(
                sa.select(predictions_table.c.inputs).where(predictions_table.c.request_id == first_call)
            ).scalar_one()
        )
        inputs[0]["user_age"] = 99
        conn.execute(
            predictions_table.update()
            .where(predictions_table.c.request_id == first_call)
            .values(inputs=json.dumps(inputs))
        )
    with pytest.raises(MonitoringError, match=f"seq={production_record.seq}.*source\\s+changed"):
        run(model, log, audit, tmp_path, after, policy)


def test_production_traffic_of_one_caller_does_not_become_the_reference(
    tmp_path: Path, model: Model, log: PredictionLog, audit: AuditStore
) -> None:
    policy = switching_policy(model)
    cold_end = promoted_at(audit) + timedelta(days=1)
    log_traffic(
        log, model, generate_clicks(1200, seed=21), cold_end - timedelta(hours=12), hours=12, callers=("one",)
    )
    after = cold_end.replace(minute=0, second=0, microsecond=0) + timedelta(hours=2)
    log_traffic(log, model, generate_clicks(400, seed=23), after)
    outcome = run(model, log, audit, tmp_path, after, policy)
    (record,) = reference_records(audit)
    assert record.decision == Decision.TRAINING_DATA and record.details["requested"] == "production_window"
    assert "not usable" in record.details["reason"] and "1 caller(s)" in record.details["reason"]
    assert outcome.records[0].details["reference"]["source"] == "training_data"


def test_a_cold_start_with_a_critical_window_keeps_the_training_data(
    tmp_path: Path, model: Model, log: PredictionLog, audit: AuditStore
) -> None:
    from modelops.monitoring_history import HistoryRow

    policy = switching_policy(model)
    cold_end = promoted_at(audit) + timedelta(days=1)
    history = MonitoringHistory(f"sqlite:///{tmp_path / 'predictions.db'}")
    log_traffic(log, model, generate_clicks(1200, seed=21), cold_end - timedelta(hours=12), hours=12)
    bad = (cold_end - timedelta(hours=5)).replace(minute=0, second=0, microsecond=0)
    history.upsert(
        HistoryRow(
            model_name=CTR,
            model_version=model.version,
            window_start=bad,
            window_end=bad + timedelta(hours=1),
            verdict="critical",
            rows=100,
            assessed_at=bad,
            metrics={},
            report_sha256="0" * 64,
        )
    )
    after = cold_end.replace(minute=0, second=0, microsecond=0) + timedelta(hours=2)
    log_traffic(log, model, generate_clicks(400, seed=23), after)
    run(model, log, audit, tmp_path, after, policy, history=history)
    (record,) = reference_records(audit)
    assert record.decision == Decision.TRAINING_DATA and "judged critical" in record.details["reason"]
    history.dispose()


def test_drift_is_assessed_per_caller_too(
    tmp_path: Path, model: Model, log: PredictionLog, audit: AuditStore
) -> None:
    policy = model.catalog.policies_for(model.spec).monitoring
    start = promoted_at(audit).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    log_traffic(log, model, generate_clicks(400, seed=11), start, callers=("web", "app"))
    shifted = generate_clicks(300, seed=12, shift=DriftShift(age_shift=15))
    log_traffic(log, model, shifted, start, callers=("partner",))
    outcome = run(model, log, audit, tmp_path, start, policy)
    by_caller = outcome.records[0].details["callers"]["drift_by_caller"]
    assert by_caller["partner"]["rows"] == 300 and "user_age" in by_caller["partner"]["drifted_features"]
    assert by_caller["web"]["drifted_features"] == [] and by_caller["app"]["drifted_features"] == []


def verdicts_ok(outcomes: dict[int, Any], expected: dict[int, str]) -> bool:
    return all(outcomes[hour].decision == verdict for hour, verdict in expected.items())


def test_twenty_four_backfilled_hours_reproduce_their_verdicts_metrics_and_report_hashes(
    tmp_path: Path, model: Model, log: PredictionLog, audit: AuditStore
) -> None:
    """A day of hours (quiet, stationary, drift alone, drift with a click-through drop, labels not in yet)
    assessed hourly, then all 24 again as a backfill: every hour's verdict, metrics, assessment hash and
    HTML report hash are the same, and the history keeps one row per hour. Evidently's HTML report is
    rendered for the four hours that alert (1-2 s each); the others leave it out to keep the test short
    (the verdict never depends on it)."""
    standard = model.catalog.policies_for(model.spec).monitoring
    without_html = standard.model_copy(update={"html_report": False})
    history = MonitoringHistory(f"sqlite:///{tmp_path / 'predictions.db'}")
    day = promoted_at(audit).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    baseline = float(generate_clicks(3000, seed=7)[model.spec.target].mean())
    audit.append(
        actor="test",
        action=AuditAction.MODEL_REGISTERED,
        subject=f"model:{CTR}@{model.version}",
        decision=Decision.CANDIDATE,
        details={"metrics": {"holdout_positive_rate": baseline}},
    )
    drifted = DriftShift(age_shift=15, out_of_range_share=0.2)
    expected = {}
    for hour in range(24):
        start = day + timedelta(hours=hour)
        if hour == 3:
            expected[hour] = "insufficient_data"  # nobody called
            continue
        shift, rate, verdict = None, baseline, "ok"
        if hour in (7, 8):
            shift, verdict = drifted, "warning"  # drift, clicks as usual
        elif hour in (15, 16):
            shift, rate, verdict = drifted, baseline * 0.3, "critical"  # drift and a click-through drop
        elif hour == 20:
            rate = None  # labels not in yet: pending, not a drop
        frame = generate_clicks(600, seed=100 + hour, shift=shift)
        log_traffic(log, model, frame, start, click_rate=rate, seed=hour)
        expected[hour] = verdict

    def assess_day() -> dict[int, Any]:
        return {
            hour: run(
                model,
                log,
                audit,
                tmp_path,
                day + timedelta(hours=hour),
                standard if expected[hour] in ("warning", "critical") else without_html,
                history,
            )
            for hour in range(24)
        }

    hourly = assess_day()
    backfill = assess_day() if verdicts_ok(hourly, expected) else hourly
    verdicts = {hour: outcome.decision for hour, outcome in hourly.items()}
    assert verdicts == expected, {
        hour: hourly[hour].records[0].details["reasons"]
        for hour in verdicts
        if verdicts[hour] != expected[hour]
    }
    for hour in range(24):
        first, again = hourly[hour], backfill[hour]
        assert again.decision == first.decision, hour
        assert again.details == first.details, hour  # metrics, report uri and hash, MLflow run
        assert again.records[0].evidence == first.records[0].evidence, hour  # incl. the HTML report's sha256
        if first.decision in ("warning", "critical"):
            assert "drift_report_html" in first.records[0].evidence, hour
    assert hourly[20].details["business"]["status"] == "pending_labels"
    rows = history.rows(CTR)
    assert len(rows) == 24 and [row.verdict for row in rows] == [expected[hour] for hour in range(24)]
    history.dispose()
