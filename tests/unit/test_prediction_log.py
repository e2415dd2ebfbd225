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

import pandas as pd
import pytest
import sqlalchemy as sa

from modelops import db
from modelops.errors import ConfigurationError
from modelops.serving.prediction_log import (
    LabelCountMismatch,
    PredictionLog,
    PredictionRecord,
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
