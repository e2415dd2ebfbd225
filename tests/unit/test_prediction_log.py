"""The prediction log on SQLite (and PostgreSQL when available): recording, windows, labels, the hook."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from modelops.errors import ConfigurationError
from modelops.serving.prediction_log import (
    LabelCountMismatch,
    PredictionLog,
    PredictionRecord,
    UnknownRequestError,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def make_record(
    received_at: datetime,
    *,
    rows: int = 2,
    status: int = 200,
    model: str = "ctr",
    version: str | None = "1",
    caller: str = "shop",
) -> PredictionRecord:
    inputs = [{"user_age": 30.0 + i, "device": "mobile"} for i in range(rows)]
    ok = 200 <= status < 300
    return PredictionRecord(
        request_id=uuid.uuid4().hex,
        received_at=received_at,
        caller_id=caller,
        model_name=model,
        model_version=version,
        status_code=status,
        latency_ms=1.5,
        n_rows=rows,
        inputs=inputs,
        outputs=[[0.9 - i / 10, 0.1 + i / 10] for i in range(rows)] if ok else None,
        error=None if ok else "BAD_REQUEST: missing column",
    )


@pytest.fixture
def sqlite_log(tmp_path: Path) -> PredictionLog:
    log = PredictionLog(f"sqlite:///{tmp_path}/nested/predictions.db")
    yield log
    log.dispose()


def exercise_log(log: PredictionLog) -> None:
    """The same checks on every backend."""
    before = make_record(T0 - timedelta(microseconds=1))
    at_start = make_record(T0, rows=3)
    inside = make_record(T0 + timedelta(minutes=30), caller="app", version="2")
    failed = make_record(T0 + timedelta(minutes=31), status=400)
    other_model = make_record(T0 + timedelta(minutes=32), model="other")
    at_end = make_record(T0 + timedelta(hours=1))
    for entry in (before, at_start, inside, failed, other_model, at_end):
        log.record(entry)

    frame = log.window("ctr", T0, T0 + timedelta(hours=1))
    # Half-open [start, end): the record at start is in, the ones just before and at end are out,
    # failures and other models never appear.
    assert list(frame["request_id"].unique()) == [at_start.request_id, inside.request_id]
    assert len(frame) == 5 == log.count("ctr", T0, T0 + timedelta(hours=1))
    assert list(frame.columns) == [
        "user_age",
        "device",
        "prediction",
        "request_id",
        "row_index",
        "received_at",
        "caller_id",
        "model_version",
        "label",
    ]
    assert list(frame["row_index"]) == [0, 1, 2, 0, 1]
    assert frame["prediction"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.1, 0.2])
    assert frame["received_at"].iloc[0] == pd.Timestamp(T0)
    assert str(frame["received_at"].dt.tz) == "UTC"
    assert frame.loc[frame["request_id"] == inside.request_id, "caller_id"].tolist() == ["app", "app"]
    assert frame.loc[frame["request_id"] == inside.request_id, "model_version"].tolist() == ["2", "2"]
    assert frame["label"].isna().all()
    assert log.count("ctr", T0 - timedelta(microseconds=1), T0) == 2

    # Labels join per row; redelivery (even corrected) replaces rather than duplicates.
    assert log.add_labels(at_start.request_id, [1, 0, 1]) == 3
    assert log.add_labels(at_start.request_id, [1, 0, 0]) == 3
    frame = log.window("ctr", T0, T0 + timedelta(hours=1))
    assert frame["label"].tolist()[:3] == [1.0, 0.0, 0.0]
    assert all(math.isnan(value) for value in frame["label"].tolist()[3:])

    with pytest.raises(UnknownRequestError, match="not in the prediction log") as unknown:
        log.add_labels("does-not-exist", [1])
    assert isinstance(unknown.value, KeyError)
    with pytest.raises(LabelCountMismatch, match="scored 2 row"):
        log.add_labels(inside.request_id, [1])

    empty = log.window("ctr", T0 + timedelta(days=1), T0 + timedelta(days=2))
    assert empty.empty and "prediction" in empty.columns and "label" in empty.columns
    assert log.count("nobody", T0, T0 + timedelta(days=1)) == 0


def test_sqlite_log_records_windows_and_labels(sqlite_log: PredictionLog) -> None:
    exercise_log(sqlite_log)


def test_windows_in_other_time_zones_mean_the_same_instant(sqlite_log: PredictionLog) -> None:
    entry = make_record(T0)
    sqlite_log.record(entry)
    plus_two = T0.astimezone(pd.Timestamp(T0).tz_convert("Etc/GMT-2").tzinfo)
    assert sqlite_log.count("ctr", plus_two, plus_two + timedelta(seconds=1)) == 2
    with pytest.raises(ValueError, match="timezone-aware"):
        sqlite_log.count("ctr", datetime(2026, 3, 1), datetime(2026, 3, 2))


def test_failed_requests_are_kept_with_their_error(sqlite_log: PredictionLog) -> None:
    failed = make_record(T0, status=503, version=None, rows=0)
    sqlite_log.record(failed)
    with sqlite_log.engine.connect() as conn:
        row = conn.exec_driver_sql(
            "SELECT status_code, model_version, outputs, error FROM modelops_predictions"
        ).one()
    assert tuple(row) == (503, None, None, "BAD_REQUEST: missing column")


def test_sqlite_uses_write_ahead_logging(sqlite_log: PredictionLog) -> None:
    with sqlite_log.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_reopening_keeps_existing_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/predictions.db"
    first = PredictionLog(url)
    first.record(make_record(T0))
    first.dispose()
    second = PredictionLog(url)
    assert second.count("ctr", T0, T0 + timedelta(seconds=1)) == 2
    second.dispose()


def test_postgres_log_records_windows_and_labels(postgres_url: str) -> None:
    log = PredictionLog(postgres_url)
    try:
        exercise_log(log)
    finally:
        log.dispose()


def test_hook_reads_the_connection(modelops_home: Path) -> None:
    from modelops.hooks.prediction_log import PredictionLogHook

    hook = PredictionLogHook()
    log = hook.prediction_log
    assert hook.prediction_log is log and hook.get_conn() is log
    hook.log.info("the Airflow logger is untouched")
    log.record(make_record(T0))
    assert log.count("ctr", T0, T0 + timedelta(seconds=1)) == 2
    assert (modelops_home / "predictions.db").is_file()
    log.dispose()


def test_hook_without_connection_says_how_to_define_it(
    modelops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelops.hooks.prediction_log import PredictionLogHook

    monkeypatch.delenv("AIRFLOW_CONN_MODELOPS_PREDICTIONS")
    with pytest.raises(ConfigurationError, match="AIRFLOW_CONN_MODELOPS_PREDICTIONS") as error:
        _ = PredictionLogHook().prediction_log
    assert "modelops_predictions" in str(error.value)
    assert "airflow_settings.yaml" in str(error.value)
