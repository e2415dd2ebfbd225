"""Stage 5, drift monitoring: verdicts from real Evidently runs on synthetic windows, the out-of-range
share, determinism, and the monitoring window a run covers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pendulum
import pytest

from modelops.audit import AuditStore
from modelops.data.synthetic import DriftShift, generate_clicks
from modelops.errors import MonitoringError
from modelops.operators.monitoring import DriftMonitorOperator, monitoring_window
from modelops.settings import ModelSpec, MonitoringPolicy, model_spec, monitoring_policy
from modelops.stages.monitoring import assess_drift, out_of_range

WINDOW_ROWS = 400


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return model_spec()


@pytest.fixture(scope="module")
def policy() -> MonitoringPolicy:
    return monitoring_policy()


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return generate_clicks(3000, seed=7)


@pytest.fixture(scope="module")
def stationary() -> pd.DataFrame:
    return generate_clicks(WINDOW_ROWS, seed=11)


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
    context = {"data_interval_start": start, "data_interval_end": start.add(hours=1)}
    assert monitoring_window(context, "", "") == (start, start.add(hours=1))


def test_explicit_window_wins_over_the_data_interval() -> None:
    context = {
        "data_interval_start": pendulum.datetime(2020, 1, 1),
        "data_interval_end": pendulum.datetime(2020, 1, 2),
    }
    start, end = monitoring_window(context, "2026-03-01T10:00:00+00:00", "2026-03-01T11:30:00+00:00")
    assert (start, end) == (pendulum.datetime(2026, 3, 1, 10), pendulum.datetime(2026, 3, 1, 11, 30))


@pytest.mark.parametrize(("start", "end"), [("2026-03-01T10:00:00Z", ""), ("", "2026-03-01T10:00:00Z")])
def test_window_with_only_one_end_is_refused(start: str, end: str) -> None:
    with pytest.raises(MonitoringError, match="give both window_start and window_end"):
        monitoring_window({}, start, end)


def test_window_with_an_unparseable_timestamp_is_refused() -> None:
    with pytest.raises(MonitoringError, match="must be ISO 8601 timestamps"):
        monitoring_window({}, "yesterday at noon", "2026-03-01T10:00:00Z")


@pytest.mark.parametrize("end", ["2026-03-01T10:00:00Z", "2026-03-01T09:00:00Z"])
def test_window_must_start_before_it_ends(end: str) -> None:
    with pytest.raises(MonitoringError, match="is not before window_end"):
        monitoring_window({}, "2026-03-01T10:00:00Z", end)


def test_window_without_a_data_interval_is_refused() -> None:
    with pytest.raises(MonitoringError, match="this run has no data interval"):
        monitoring_window({"data_interval_start": None, "data_interval_end": None}, "", "")
    with pytest.raises(MonitoringError, match="this run has no data interval"):
        monitoring_window({}, "", "")


# --- operator ------------------------------------------------------------------------------------


def test_operator_on_an_empty_window_records_insufficient_data(modelops_home: Path) -> None:
    start = datetime(2026, 3, 1, 10, tzinfo=UTC)
    end = start + timedelta(hours=1)
    dag_run = SimpleNamespace(
        dag_id="modelops_drift_monitoring", run_id="scheduled__1", triggering_user_name=None
    )
    context: dict[str, Any] = {
        "dag_run": dag_run,
        "ti": SimpleNamespace(task_id="assess_drift"),
        "data_interval_start": pendulum.instance(start),
        "data_interval_end": pendulum.instance(end),
    }
    result = DriftMonitorOperator(task_id="assess_drift").execute(context)
    json.dumps(result)
    assert result["verdict"] == "insufficient_data" and result["rows"] == 0
    assert result["version"] is None and result["report_uri"] is None
    assert result["request_retraining"] is False

    store = AuditStore(f"sqlite:///{modelops_home}/audit.db")
    try:
        record = store.last(action="drift.assessed")
    finally:
        store.dispose()
    assert record.decision == "insufficient_data" and record.subject == "model:ctr_recommender"
    assert record.details["window_start"] == start.isoformat()
    assert record.details["reasons"] == ["no predictions in the window"]
    written = list((modelops_home / "storage" / "monitoring" / "ctr_recommender").glob("*/assessment.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["verdict"] == "insufficient_data"
