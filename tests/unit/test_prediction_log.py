"""The prediction log on SQLite (and PostgreSQL when available): recording, windows, labels, the hook;
and the storage layer it shares with the audit log (modelops.db)."""

from __future__ import annotations

import math
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from modelops import db
from modelops.errors import ConfigurationError
from modelops.serving import prediction_log
from modelops.serving.prediction_log import (
    WINDOW_COLUMNS,
    LabelCountMismatch,
    PredictionLog,
    PredictionRecord,
    RequestStats,
    UnknownRequestError,
)
from tests.support import keyring_for_tests

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


def hostile_record(received_at: datetime) -> PredictionRecord:
    """A call whose inputs collide with the window's own columns, nest values and add unknown keys."""
    inputs = [
        {
            "user_age": 30.0,
            "device": "mobile",
            "received_at": "1999-01-01T00:00:00Z",
            "label": 1,
            "request_id": "forged",
            "unknown_column": 7,
        },
        {
            "user_age": {"nested": True},
            "device": ["a", "list"],
            "received_at": 12,
            "model_version": "forged",
            "unknown_column": 8,
        },
    ]
    return PredictionRecord(
        request_id=uuid.uuid4().hex,
        received_at=received_at,
        caller_id="hostile",
        model_name="ctr",
        model_version="1",
        status_code=200,
        latency_ms=2.0,
        n_rows=2,
        inputs=inputs,
        outputs=[[0.4, 0.6], [0.3, 0.7]],
    )


def exercise_hostile_inputs(log: PredictionLog) -> None:
    """The same checks on every backend."""
    normal = make_record(T0)
    hostile = hostile_record(T0 + timedelta(minutes=1))
    log.record(normal)
    log.record(hostile)
    log.add_labels(hostile.request_id, [0, 1])
    end = T0 + timedelta(hours=1)

    frame = log.window("ctr", T0, end, features=["user_age", "device", "session_length"])
    assert list(frame.columns) == ["user_age", "device", "session_length", *WINDOW_COLUMNS]
    assert len(frame) == 4
    # The metadata is the log's own, whatever the inputs said.
    assert frame["request_id"].tolist() == [normal.request_id] * 2 + [hostile.request_id] * 2
    assert (
        frame["received_at"].tolist()
        == [pd.Timestamp(T0)] * 2 + [pd.Timestamp(T0 + timedelta(minutes=1))] * 2
    )
    assert str(frame["received_at"].dt.tz) == "UTC"
    assert frame["model_version"].tolist() == ["1"] * 4
    assert frame["row_index"].tolist() == [0, 1, 0, 1]
    assert frame["label"].tolist()[2:] == [0.0, 1.0] and frame["label"].iloc[:2].isna().all()
    assert frame["prediction"].tolist() == pytest.approx([0.1, 0.2, 0.6, 0.7])
    # Nested values become missing; a feature nobody sent is all NaN; unknown keys are ignored.
    assert frame["user_age"].dtype == "float64"
    assert frame["user_age"].tolist()[:3] == [30.0, 31.0, 30.0] and math.isnan(frame["user_age"].iloc[3])
    assert frame["device"].tolist() == ["mobile", "mobile", "mobile", None]
    assert frame["session_length"].isna().all() and frame["session_length"].dtype == "float64"
    assert "unknown_column" not in frame.columns

    # Without features: every input key, but none replaces a metadata column (colliding keys are dropped).
    everything = log.window("ctr", T0, end)
    assert list(everything.columns) == ["user_age", "device", "unknown_column", *WINDOW_COLUMNS]
    assert everything["request_id"].tolist() == frame["request_id"].tolist()
    assert everything["received_at"].tolist() == frame["received_at"].tolist()
    assert everything["model_version"].tolist() == ["1"] * 4
    assert everything["label"].tolist()[2:] == [0.0, 1.0]
    assert everything["unknown_column"].iloc[:2].isna().all()
    assert everything["unknown_column"].tolist()[2:] == [7.0, 8.0]
    assert everything["device"].tolist() == ["mobile", "mobile", "mobile", None]

    empty = log.window("ctr", end, end + timedelta(hours=1), features=["user_age"])
    assert empty.empty and list(empty.columns) == ["user_age", *WINDOW_COLUMNS]


def test_hostile_inputs_never_break_a_window_on_sqlite(sqlite_log: PredictionLog) -> None:
    exercise_hostile_inputs(sqlite_log)


def test_hostile_inputs_never_break_a_window_on_postgres(postgres_url: str) -> None:
    log = PredictionLog(postgres_url)
    try:
        exercise_hostile_inputs(log)
    finally:
        log.dispose()


def test_features_named_like_window_columns_are_refused(sqlite_log: PredictionLog) -> None:
    with pytest.raises(ValueError, match=r"features \['label'\] are named like columns window\(\) adds"):
        sqlite_log.window("ctr", T0, T0 + timedelta(hours=1), features=["user_age", "label"])
    with pytest.raises(TypeError, match="not the string"):
        sqlite_log.window("ctr", T0, T0 + timedelta(hours=1), features="user_age")


def test_window_columns_survive_chunked_conversion(
    sqlite_log: PredictionLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows are converted to typed columns a chunk at a time: a key first sent in a later chunk, rows
    that are not objects, and shapes of output that vary all come out as one column each."""
    monkeypatch.setattr(prediction_log, "_CHUNK_ROWS", 3)
    records = [
        make_record(T0, rows=2),
        make_record(T0 + timedelta(seconds=1), rows=2),
        replace_inputs(
            make_record(T0 + timedelta(seconds=2), rows=2), [{"user_age": 1, "late": "x"}, {"late": "y"}]
        ),
        replace_inputs(make_record(T0 + timedelta(seconds=3), rows=2), [5, {"user_age": 2}]),
    ]
    for record in records:
        sqlite_log.record(record)
    frame = sqlite_log.window("ctr", T0, T0 + timedelta(hours=1))
    assert list(frame.columns) == ["user_age", "device", "late", "input", *WINDOW_COLUMNS]
    assert frame["user_age"].tolist()[:5] == [30.0, 31.0, 30.0, 31.0, 1.0]
    assert math.isnan(frame["user_age"].iloc[5]) and math.isnan(frame["user_age"].iloc[6])
    assert frame["user_age"].iloc[7] == 2.0
    assert frame["late"].iloc[:4].isna().all() and frame["late"].tolist()[4:6] == ["x", "y"]
    assert frame["input"].iloc[6] == 5 and frame["input"].drop(index=6).isna().all()
    assert frame["row_index"].tolist() == [0, 1] * 4
    typed = sqlite_log.window("ctr", T0, T0 + timedelta(hours=1), features=["user_age", "device"])
    assert typed["user_age"].tolist()[:5] == [30.0, 31.0, 30.0, 31.0, 1.0]
    assert typed["device"].tolist() == ["mobile"] * 4 + [None] * 4


def replace_inputs(record: PredictionRecord, inputs: list[Any]) -> PredictionRecord:
    from dataclasses import replace

    return replace(record, inputs=inputs, n_rows=len(inputs))


def exercise_request_stats(log: PredictionLog) -> None:
    latencies = [12.0, 3.5, 250.0, 40.0, 7.25, 99.0, 1.0]
    statuses = [200, 200, 400, 503, 200, 422, 200]
    for index, (latency, status) in enumerate(zip(latencies, statuses, strict=True)):
        record = make_record(T0 + timedelta(minutes=index), status=status)
        log.record(replace_latency(record, latency))
    # A 2xx call that still carries an error counts as failed; calls outside the window or of another
    # model do not count at all.
    errored = replace_latency(make_record(T0 + timedelta(minutes=10)), 5.0)
    log.record(PredictionRecord(**{**errored.__dict__, "error": "INTERNAL: partial failure"}))
    log.record(replace_latency(make_record(T0 - timedelta(seconds=1)), 10_000.0))
    log.record(replace_latency(make_record(T0 + timedelta(hours=1)), 10_000.0))
    log.record(replace_latency(make_record(T0 + timedelta(minutes=5), model="other", status=500), 1.0))

    stats = log.request_stats("ctr", T0, T0 + timedelta(hours=1))
    values = [*latencies, 5.0]
    assert stats.requests == 8 and stats.failed == 4
    assert stats.error_rate == pytest.approx(0.5)
    assert (stats.p50_ms, stats.p95_ms, stats.p99_ms) == tuple(
        float(value) for value in np.percentile(values, [50, 95, 99], method="linear")
    )
    assert stats == log.request_stats("ctr", T0, T0 + timedelta(hours=1))  # deterministic

    empty = log.request_stats("ctr", T0 + timedelta(days=1), T0 + timedelta(days=2))
    assert empty == RequestStats(requests=0, failed=0, error_rate=None, p50_ms=None, p95_ms=None, p99_ms=None)
    with pytest.raises(ValueError, match="timezone-aware"):
        log.request_stats("ctr", datetime(2026, 3, 1), datetime(2026, 3, 2))


def replace_latency(record: PredictionRecord, latency_ms: float) -> PredictionRecord:
    from dataclasses import replace

    return replace(record, latency_ms=latency_ms)


def test_request_stats_on_sqlite(sqlite_log: PredictionLog) -> None:
    exercise_request_stats(sqlite_log)


def test_request_stats_on_postgres(postgres_url: str) -> None:
    log = PredictionLog(postgres_url)
    try:
        exercise_request_stats(log)
    finally:
        log.dispose()


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


# --- the storage layer both logs share (modelops.db) -------------------------------------------------


def _sqlite_settings(engine: sa.Engine) -> tuple[str, int, int]:
    with engine.connect() as conn:
        return (
            conn.exec_driver_sql("PRAGMA journal_mode").scalar(),
            conn.exec_driver_sql("PRAGMA busy_timeout").scalar(),
            conn.exec_driver_sql("PRAGMA foreign_keys").scalar(),
        )


def test_both_logs_get_one_engine_set_up_on_sqlite(tmp_path: Path) -> None:
    from modelops.audit import AuditStore

    log = PredictionLog(f"sqlite:///{tmp_path}/a/predictions.db")
    store = AuditStore(f"sqlite:///{tmp_path}/b/audit.db", keyring=keyring_for_tests())
    try:
        assert _sqlite_settings(log.engine) == ("wal", 30000, 1)
        assert _sqlite_settings(store._engine) == ("wal", 30000, 1)
    finally:
        log.dispose()
        store.dispose()


def test_a_write_transaction_takes_the_sqlite_write_lock_up_front(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "locks.db"
    engine = db.create_engine(f"sqlite:///{path}", immediate_transactions=True)
    other = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    try:
        with db.write_transaction(engine):
            # Nothing was written yet, and still a second writer must wait: BEGIN IMMEDIATE took the lock.
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        # Without the option a transaction starts deferred, so another writer is not blocked by a read.
        with engine.connect() as conn, conn.begin():
            conn.exec_driver_sql("SELECT 1")
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
    finally:
        other.close()
        engine.dispose()


def test_postgres_engines_ping_their_pool(postgres_url: str) -> None:
    log = PredictionLog(postgres_url)
    try:
        assert log.engine.pool._pre_ping
        with db.write_transaction(log.engine) as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        log.dispose()


def test_bad_urls_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a SQLAlchemy URL"):
        PredictionLog("predictions.db")
    with pytest.raises(
        ConfigurationError, match="cannot open the prediction log at nosuchdb://u:\\*\\*\\*@h/x"
    ):
        PredictionLog("nosuchdb://u:secret@h/x")
    assert db.sqlite_file(f"sqlite:///{tmp_path}/x.db") == tmp_path / "x.db"
    assert db.sqlite_file("sqlite://") is None and db.sqlite_file("postgresql://h/db") is None
    assert db.safe_url("postgresql+psycopg2://u:secret@h/db") == "postgresql+psycopg2://u:***@h/db"
    assert repr(PredictionLog(f"sqlite:///{tmp_path}/p.db")) == f"PredictionLog('sqlite:///{tmp_path}/p.db')"


def _connection(conn_type: str | None, **fields: Any) -> SimpleNamespace:
    defaults = {"conn_id": "modelops_x", "host": None, "schema": None, "login": None, "password": None}
    return SimpleNamespace(
        conn_type=conn_type,
        port=fields.pop("port", None),
        extra_dejson=fields.pop("extra", {}),
        **defaults | fields,
    )


def test_a_connection_becomes_a_url_in_one_place() -> None:
    from modelops.hooks import _db

    assert _db.sqlalchemy_url is db.sqlalchemy_url
    assert db.sqlalchemy_url(_connection("sqlite", host="/data/audit.db")) == "sqlite:////data/audit.db"
    assert (
        db.sqlalchemy_url(_connection("postgres", host="db", login="mo", password="p@ss", schema="modelops"))
        == "postgresql+psycopg2://mo:p%40ss@db:5432/modelops"
    )
    assert db.sqlalchemy_url(_connection("postgresql")) == "postgresql+psycopg2://127.0.0.1:5432/postgres"
    assert db.sqlalchemy_url(_connection("http", extra={"url": "sqlite:///x.db"})) == "sqlite:///x.db"
    with pytest.raises(ConfigurationError, match="'modelops_x' \\(sqlite\\) has no host"):
        db.sqlalchemy_url(_connection("sqlite"))
    with pytest.raises(ConfigurationError, match="conn_type 'http'"):
        db.sqlalchemy_url(_connection("http"))


def test_the_storage_layer_imports_no_airflow() -> None:
    code = (
        "import sys, modelops.db, modelops.audit, modelops.serving.prediction_log; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
