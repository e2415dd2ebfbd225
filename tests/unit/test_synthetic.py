"""Synthetic ctr_clicks data: determinism, schema, signal, defects, drift, the GX suite and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from modelops.data.synthetic import (
    CATEGORIES,
    COLUMNS,
    DEFECTS,
    DEVICES,
    STRONG_DRIFT,
    DriftShift,
    generate_clicks,
    number_to_words,
    write_csv,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SUITE_PATH = PROJECT_ROOT / "include" / "expectations" / "ctr_clicks.json"
NUMERIC = ["user_age", "user_balance", "click_history_length", "item_price", "hour_of_day"]
CATEGORICAL = ["item_category", "device"]


@pytest.fixture(scope="module")
def clicks() -> pd.DataFrame:
    return generate_clicks(8000, seed=7)


def test_same_seed_gives_identical_frames_and_other_seed_differs() -> None:
    pd.testing.assert_frame_equal(generate_clicks(500, seed=3), generate_clicks(500, seed=3))
    assert not generate_clicks(500, seed=3).equals(generate_clicks(500, seed=4))


def test_columns_and_dtypes(clicks: pd.DataFrame) -> None:
    assert list(clicks.columns) == list(COLUMNS)
    for column in ["user_id", "user_age", "click_history_length", "hour_of_day", "clicked"]:
        assert clicks[column].dtype == np.int64, column
    for column in ["user_balance", "item_price"]:
        assert clicks[column].dtype == np.float64, column
    assert not clicks.isna().any().any()


def test_value_ranges(clicks: pd.DataFrame) -> None:
    assert clicks["user_age"].between(18, 75).all()
    assert 30 < clicks["user_age"].mean() < 48
    assert (clicks["user_balance"] >= 0).all()
    assert (clicks["click_history_length"] >= 0).all()
    assert (clicks["item_price"] > 0).all()
    assert clicks["hour_of_day"].between(0, 23).all()
    assert set(clicks["item_category"]) == set(CATEGORIES)
    assert set(clicks["device"]) == set(DEVICES)
    assert set(clicks["clicked"]) == {0, 1}
    # Prices depend on the category, activity on the hour of day.
    median_price = clicks.groupby("item_category")["item_price"].median()
    assert median_price["electronics"] > 5 * median_price["grocery"]
    hourly = clicks["hour_of_day"].value_counts().sort_index()
    assert hourly.loc[19:21].mean() > 5 * hourly.loc[2:4].mean()


def test_label_rate(clicks: pd.DataFrame) -> None:
    assert 0.10 <= clicks["clicked"].mean() <= 0.25


def test_label_signal_is_learnable(clicks: pd.DataFrame) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from threadpoolctl import threadpool_limits

    features = clicks[NUMERIC + CATEGORICAL].astype({column: "category" for column in CATEGORICAL})
    split = int(len(clicks) * 0.8)
    model = HistGradientBoostingClassifier(max_iter=120, random_state=42, categorical_features="from_dtype")
    # One OpenMP thread: on a small, busy machine more threads make this 8000-row fit 50x slower.
    with threadpool_limits(limits=1):
        model.fit(features.iloc[:split], clicks["clicked"].iloc[:split])
    scores = model.predict_proba(features.iloc[split:])[:, 1]
    assert roc_auc_score(clicks["clicked"].iloc[split:], scores) > 0.7


def test_clean_frame_passes_the_real_expectation_suite(clicks: pd.DataFrame) -> None:
    result, n_expectations = _validate(clicks)
    assert n_expectations == len(json.loads(SUITE_PATH.read_text())["expectations"])
    failed = [r.expectation_config.type for r in result.results if not r.success]
    assert result.success, failed


def test_defective_frames_fail_the_suite(clicks: pd.DataFrame) -> None:
    broken = generate_clicks(2000, seed=7, defects=DEFECTS)
    result, _ = _validate(broken)
    assert not result.success


def _validate(frame: pd.DataFrame):
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    batch_definition = (
        context.data_sources.add_pandas("synthetic")
        .add_dataframe_asset("ctr_clicks")
        .add_batch_definition_whole_dataframe("whole")
    )
    suite = gx.ExpectationSuite(**json.loads(SUITE_PATH.read_text()))
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    return batch.validate(suite), len(suite.expectations)


def test_with_pii_adds_realistic_emails() -> None:
    frame = generate_clicks(300, seed=7, with_pii=True)
    assert list(frame.columns) == [*COLUMNS, "email"]
    email = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
    assert frame["email"].map(lambda value: bool(email.fullmatch(value))).all()
    # One stable address per user, and the PII column leaves the other columns unchanged.
    assert (frame.groupby("user_id")["email"].nunique() == 1).all()
    pd.testing.assert_frame_equal(frame[list(COLUMNS)], generate_clicks(300, seed=7))


def test_defect_missing_column() -> None:
    frame = generate_clicks(200, defects=["missing_column"])
    assert "device" not in frame.columns
    assert len(frame.columns) == len(COLUMNS) - 1


def test_defect_wrong_types() -> None:
    frame = generate_clicks(200, defects=["wrong_types"])
    assert frame["user_age"].dtype == object
    assert frame["user_age"].map(lambda value: isinstance(value, str)).all()
    assert number_to_words(30) == "thirty" and number_to_words(42) == "forty-two"


def test_defect_nulls() -> None:
    frame = generate_clicks(200, defects=["nulls"])
    assert 0 < frame["user_age"].isna().sum() < 50


def test_defect_out_of_range() -> None:
    frame = generate_clicks(200, defects=["out_of_range"])
    assert (frame["hour_of_day"] == 27).any()
    assert (frame["item_price"] < 0).any()


def test_unknown_defect_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown defect") as info:
        generate_clicks(100, defects=["typo"])
    for name in DEFECTS:
        assert name in str(info.value)


def test_shift_changes_the_distributions(clicks: pd.DataFrame) -> None:
    shifted = generate_clicks(8000, seed=7, shift=STRONG_DRIFT)
    assert list(shifted.columns) == list(COLUMNS)
    assert shifted["user_age"].mean() > clicks["user_age"].mean() + 12
    assert 0.15 < (shifted["user_age"] == 100).mean() < 0.25
    assert (clicks["user_age"] <= 75).all()
    assert (
        (shifted["item_category"] == "fashion").mean() > 0.35 > (clicks["item_category"] == "fashion").mean()
    )
    assert shifted["item_price"].median() > 1.3 * clicks["item_price"].median()
    # A stationary shift is the same as no shift.
    pd.testing.assert_frame_equal(generate_clicks(300, shift=DriftShift()), generate_clicks(300))


def test_invalid_shift_is_rejected() -> None:
    with pytest.raises(ValueError, match="out_of_range_share"):
        DriftShift(out_of_range_share=1.5)
    with pytest.raises(ValueError, match="unknown categories"):
        DriftShift(category_weights={"cars": 1.0})


def test_write_csv_creates_parent_folders(tmp_path: Path) -> None:
    frame = generate_clicks(150)
    path = write_csv(frame, tmp_path / "a" / "b" / "clicks.csv")
    assert path.is_file()
    pd.testing.assert_frame_equal(pd.read_csv(path), frame)


def test_cli_writes_a_csv(tmp_path: Path) -> None:
    out = tmp_path / "incoming" / "ctr_clicks.csv"
    completed = subprocess.run(
        [sys.executable, "-m", "modelops.data.synthetic", "--rows", "250", "--seed", "7", "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROJECT_ROOT,
        env=_env_with_plugins(),
    )
    assert str(out) in completed.stdout and "250" in completed.stdout
    assert len(pd.read_csv(out)) == 250
    pd.testing.assert_frame_equal(pd.read_csv(out), generate_clicks(250, seed=7))


def _env_with_plugins() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT / "plugins"), env.get("PYTHONPATH")]))
    return env
