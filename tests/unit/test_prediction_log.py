"""The prediction log on SQLite (and PostgreSQL when available): recording, windows, labels, the hook;
and the storage layer it shares with the audit log (modelops.db)."""

from __future__ import annotations

import math
import random
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


# --- window(): the fast reader against the Python one ------------------------------------------------

_WORDS = [
    "mobile",
    "desktop",
    "tablet",
    "é",
    "😀",
    "a\nb",
    'q"uote',
    "back\\slash",
    "",
    "\x00z",
    "[x]",
    "{y}",
]


def _random_value(rng: random.Random, kind: str) -> Any:
    if rng.random() < 0.08:
        return None
    extreme = rng.random() < 0.05
    if kind == "float":
        if extreme:
            return rng.choice([-0.0, 1e-300, 1.5e300, float("nan"), 2.0**63])
        return rng.choice([rng.uniform(-1e6, 1e6), rng.random(), 0.1])
    if kind == "int":
        return rng.choice([2**53 + 1, -(2**63), 2**63 - 1]) if extreme else rng.randint(-1000, 1000)
    if kind == "mixed":
        return rng.choice([rng.randint(-5, 5), rng.uniform(-5, 5)])
    if kind == "string":
        return rng.choice(_WORDS[:3]) if rng.random() < 0.9 else rng.choice(_WORDS)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "date":
        return rng.choice(["2026-01-01", "1999-01-01T00:00:00Z", "2026-03-01 12:00:00"])
    return None  # "null": a key always sent without a value


def _hostile_value(rng: random.Random) -> Any:
    return rng.choice(
        [{"nested": 1}, [1, 2], [], {}, "text", True, 2**63, -(2**63) - 1, 2**64 + 5, 10**30, 1.5, None]
    )


def _random_log(log: PredictionLog, seed: int) -> tuple[list[str], list[str]]:
    """A log of calls of random shapes; every third seed is hostile. Returns the request ids of the
    successful calls and the feature names used."""
    rng = random.Random(seed)
    hostile = seed % 3 == 0
    kinds = ["float", "int", "mixed", "string", "bool", "date", "null"]
    names = [f"f{index}" for index in range(rng.randint(1, 6))]
    kind_of = {name: rng.choice(kinds) for name in names}
    shape = rng.choice(["pairs", "pairs", "scalars", "int_pairs"])
    ids = []
    for number in range(rng.randint(0, 12)):
        rows = rng.choice([0, 1, 2, 3, 5, 8])
        inputs: list[Any] = []
        for _ in range(rows):
            row = {name: _random_value(rng, kind_of[name]) for name in names if rng.random() < 0.95}
            if rng.random() < 0.1:
                row[rng.choice(["extra", "other", "f9"])] = _random_value(rng, rng.choice(kinds))
            if rng.random() < 0.1:
                row = dict(reversed(list(row.items())))
            if hostile and rng.random() < 0.3:
                key = rng.choice([*names, *WINDOW_COLUMNS, "input", "x"])
                row[key] = _hostile_value(rng)
            if hostile and rng.random() < 0.05:
                row = rng.choice([5, "row", None, [1, 2], True])
            inputs.append(row)
        if shape == "scalars":
            outputs: list[Any] | None = [rng.choice([rng.random(), 1, None]) for _ in range(rows)]
        elif shape == "int_pairs":
            outputs = [[rng.random(), rng.choice([0, 1])] for _ in range(rows)]
        else:
            outputs = [[1 - (p := rng.random()), p] for _ in range(rows)]
        if hostile and rng.random() < 0.2:
            outputs = rng.choice(
                [None, outputs[:-1], [[0.1, 0.2, 0.7]] * rows, [{"p": 0.5}] * rows, [[0.5]] * rows, {"a": 1}]
            )
        status = 500 if rng.random() < 0.1 else 200
        when = T0 + timedelta(seconds=rng.choice([-5, 0, 1, 1, 2, 30, 3599, 3600]))
        model = "other" if rng.random() < 0.1 else "ctr"
        record = PredictionRecord(
            request_id=f"{seed:04d}{number:04d}{uuid.uuid4().hex[:8]}",
            received_at=when,
            caller_id=rng.choice(["shop", "app"]),
            model_name=model,
            model_version=rng.choice(["1", "2", None]),
            status_code=status,
            latency_ms=1.0,
            n_rows=rows,
            inputs=inputs,
            outputs=outputs,
        )
        log.record(record)
        if status == 200:
            ids.append(record.request_id)
            if rows and rng.random() < 0.4:
                log.add_labels(record.request_id, [rng.randint(0, 1) for _ in range(rows)])
    return ids, names


def _raw_call(log: PredictionLog, inputs: str, outputs: str | None, *, at: datetime = T0) -> None:
    """A call whose JSON was not written by record(): what a damaged or forged row could hold."""
    with log.engine.begin() as conn:
        conn.execute(
            prediction_log.predictions_table.insert().values(
                request_id=uuid.uuid4().hex,
                received_at=at,
                caller_id="raw",
                model_name="ctr",
                model_version="1",
                status_code=200,
                latency_ms=1.0,
                n_rows=1,
                inputs=inputs,
                outputs=outputs,
            )
        )


def _assert_same_windows(log: PredictionLog, names: list[str]) -> bool:
    """window() equals the Python reader's frame, with and without features; True when the fast reader
    read both (rather than handing the window to the Python reader)."""
    end = T0 + timedelta(hours=1)
    fast_read = True
    for features in (None, names, [*reversed(names), "never_sent"]):
        python = log._window_python("ctr", T0, end, features=features)
        fast = log._window_arrow("ctr", T0, end, None if features is None else list(dict.fromkeys(features)))
        if fast is None:
            fast_read = False
        else:
            pd.testing.assert_frame_equal(fast, python)
        pd.testing.assert_frame_equal(log.window("ctr", T0, end, features=features), python)
    return fast_read


@pytest.mark.parametrize("small_batches", [False, True])
def test_fast_window_equals_the_python_reader_on_random_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_batches: bool
) -> None:
    if small_batches:  # many batches, several pyarrow blocks per batch, and the Python reader's chunks
        monkeypatch.setattr(prediction_log, "_ARROW_BATCH_ROWS", 7)
        monkeypatch.setattr(prediction_log, "_ARROW_BLOCK_BYTES", 256)
        monkeypatch.setattr(prediction_log, "_CHUNK_ROWS", 5)
    fast_reads = 0
    for seed in range(60):
        log = PredictionLog(f"sqlite:///{tmp_path}/random-{small_batches}-{seed}.db")
        try:
            _ids, names = _random_log(log, seed)
            fast_reads += _assert_same_windows(log, names)
        finally:
            log.dispose()
    assert fast_reads >= 15  # the fast reader did read most clean logs


def test_fast_window_reads_the_usual_log_itself(sqlite_log: PredictionLog) -> None:
    for index in range(5):
        sqlite_log.record(make_record(T0 + timedelta(seconds=index), rows=3))
    end = T0 + timedelta(hours=1)
    fast = sqlite_log._window_arrow("ctr", T0, end, ["user_age", "device"])
    assert fast is not None
    pd.testing.assert_frame_equal(
        fast, sqlite_log._window_python("ctr", T0, end, features=["user_age", "device"])
    )
    assert fast["user_age"].dtype == "float64" and fast["prediction"].dtype == "float64"


@pytest.mark.parametrize(
    ("inputs", "outputs"),
    [
        ('[{"a": 1, "a": 2}]', "[[0.5, 0.5]]"),  # a duplicate key: json.loads keeps the last value
        ('[{"a": 1,\n "b": 2}]', "[[0.5, 0.5]]"),  # a line break inside a row
        ('{"a": 1}', "[[0.5, 0.5]]"),  # an object, not an array: one row
        ('  [{"a": 1}]', "[[0.5, 0.5]]"),
        ('"[{}]"', "[[0.5, 0.5]]"),
        ("5", "[1]"),
        ('[{"a": "\\ud800"}]', "[0.5]"),  # a lone surrogate
        ('[{"a": "\\ud83d\\ude00\\u0000\\/"}]', "[0.5]"),
        ('[{"a": 1e400}, {"a": -0.0}, {"a": 1E2}]', "[1, 2, 3]"),
        ('[{"a": ' + "[" * 5000 + "]" * 5000 + "}]", "[0.5]"),  # deeper than any parser likes
        ('[{"a": 1}]', "[" * 5000 + "]" * 5000),
        ('[{"a": 1}]', '{"p": [0.5]}'),
        ('[{"a": 1}]', None),
        ('[{"a": 1}]', "[[0.5, [0.5]]]"),
        ('[{"a": 1}]', '[["x", "[y]"]]'),
        ('[{"a": 1}]', "[]"),
        ('[{"a": 1}, {"a": 2}]', "[0.1, 0.2, 0.3]"),
        ("[{}, {}]", "[true, false]"),
        ("[]", "not json"),
        # Malformed JSON that has the shape record() writes: json.loads refuses it, so does window().
        ('[{"a": 01}]', "[0.5]"),
        ('[{"a": 1,}]', "[0.5]"),
        ('[{"a": "tab\there"}]', "[0.5]"),
        ('[{"a": NaN}, {"a": Infinity}]', "[0.5, 0.5]"),
        ('[{"a": "\\x"}]', "[0.5]"),
        ('[{"a": 1}, {"a": "x}, {y"}]', "[0.5, 0.5]"),
        ('[{"a": 1}]', "[01]"),
        ('[{"a": 1}]', "[[0.5, 1,]]"),
        ('[{"a": 1}, {"a": 2}]', "[[0.5, null], [null, 0.5]]"),
        ('[{"a": 1}, {"a": 2}]', "[NaN, Infinity]"),
        ('[{"a": 1}, {"a": 2}]', "[true, 1]"),
    ],
)
def test_fast_window_hands_what_it_cannot_read_to_the_python_reader(
    sqlite_log: PredictionLog, inputs: str, outputs: str | None
) -> None:
    sqlite_log.record(make_record(T0, rows=2))
    _raw_call(sqlite_log, inputs, outputs, at=T0 + timedelta(seconds=1))
    end = T0 + timedelta(hours=1)
    for features in (None, ["a", "user_age"]):
        try:
            python = sqlite_log._window_python("ctr", T0, end, features=features)
        except (ValueError, RecursionError) as error:  # what json.loads refuses, window() refuses too
            with pytest.raises(type(error)):
                sqlite_log.window("ctr", T0, end, features=features)
            continue
        pd.testing.assert_frame_equal(sqlite_log.window("ctr", T0, end, features=features), python)


def test_malformed_json_falls_back_to_the_python_reader_and_its_error(sqlite_log: PredictionLog) -> None:
    sqlite_log.record(make_record(T0))
    _raw_call(sqlite_log, '[{"a": 1}', "[[0.5, 0.5]]", at=T0 + timedelta(seconds=1))
    assert sqlite_log._window_arrow("ctr", T0, T0 + timedelta(hours=1), None) is None
    with pytest.raises(ValueError, match="Expecting"):
        sqlite_log.window("ctr", T0, T0 + timedelta(hours=1))


def test_fast_window_equals_the_python_reader_on_postgres(postgres_url: str) -> None:
    log = PredictionLog(postgres_url)
    try:
        fast_reads = 0
        for seed in range(24):
            with log.engine.begin() as conn:  # one database, a fresh log per seed
                conn.execute(prediction_log.labels_table.delete())
                conn.execute(prediction_log.predictions_table.delete())
            _ids, names = _random_log(log, seed)
            fast_reads += _assert_same_windows(log, names)
        assert fast_reads >= 6
        _raw_call(log, '[{"a": 1,\n "b": 2}]', "[[0.5, 0.5]]", at=T0 + timedelta(seconds=1))
        _raw_call(log, '{"a": 1}', "[[0.5, 0.5]]", at=T0 + timedelta(seconds=2))
        _raw_call(log, '[{"a": "\\ud800"}]', "[0.5]", at=T0 + timedelta(seconds=3))
        _assert_same_windows(log, ["a"])
        _raw_call(log, '[{"a": 1}', "[0.5]", at=T0 + timedelta(seconds=4))  # PostgreSQL refuses it
        assert log._window_arrow("ctr", T0, T0 + timedelta(hours=1), None) is None
        with pytest.raises(ValueError, match="Expecting"):
            log.window("ctr", T0, T0 + timedelta(hours=1))
    finally:
        log.dispose()


# --- refused label deliveries are counted --------------------------------------------------------------


def exercise_label_rejections(log: PredictionLog) -> None:
    record = make_record(T0, rows=2)
    log.record(record)
    now = datetime.now(UTC)
    hour = now.replace(minute=0, second=0, microsecond=0)
    window = (hour, hour + timedelta(hours=1))
    assert log.label_rejections(*window) == {}

    secret = "attacker-chosen-" + "x" * 500
    for _ in range(3):
        with pytest.raises(UnknownRequestError):
            log.add_labels(secret, [1] * 1000)
    with pytest.raises(LabelCountMismatch):
        log.add_labels(record.request_id, [1])
    assert log.add_labels(record.request_id, [1, 0]) == 2  # first delivery: not counted
    assert log.add_labels(record.request_id, [0, 0]) == 2  # a redelivery: counted, not refused
    counts = log.label_rejections(*window)
    if counts != {"label_count_mismatch": 1, "redelivered": 1, "unknown_request_id": 3}:
        # The hour turned between the deliveries: the buckets of both hours hold them.
        counts = log.label_rejections(hour, hour + timedelta(hours=2))
    assert counts == {"label_count_mismatch": 1, "redelivered": 1, "unknown_request_id": 3}
    # Hours outside [start, end) are not summed; the request id and labels are stored nowhere.
    assert log.label_rejections(hour - timedelta(hours=2), hour) == {}
    with log.engine.connect() as conn:
        stored = conn.execute(sa.select(prediction_log.label_rejections_table)).all()
    assert all(secret not in str(row) for row in stored)
    assert {row.hour.minute for row in stored} == {0} and all(row.hour.tzinfo is not None for row in stored)
    with pytest.raises(ValueError, match="timezone-aware"):
        log.label_rejections(datetime(2026, 3, 1), datetime(2026, 3, 2))


def test_label_rejections_are_counted_on_sqlite(sqlite_log: PredictionLog) -> None:
    exercise_label_rejections(sqlite_log)


def test_label_rejections_are_counted_on_postgres(postgres_url: str) -> None:
    log = PredictionLog(postgres_url)
    try:
        exercise_label_rejections(log)
    finally:
        log.dispose()


def test_the_rejections_table_is_added_to_an_existing_log(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    engine = sa.create_engine(url)
    prediction_log.predictions_table.create(engine)
    prediction_log.labels_table.create(engine)
    engine.dispose()
    log = PredictionLog(url)
    try:
        with pytest.raises(UnknownRequestError):
            log.add_labels("nope", [1])
        now = datetime.now(UTC)
        assert log.label_rejections(now - timedelta(hours=2), now + timedelta(hours=1)) == {
            "unknown_request_id": 1
        }
    finally:
        log.dispose()


@pytest.mark.parametrize(
    "outputs",
    [
        "[0x10]",
        "[+1]",
        "[01]",
        "[.5]",
        "[1.]",
        "[inf]",
        "[nan]",
        "[NaN]",
        "[Infinity]",
        "[-0]",
        "[1e5]",
        "[null]",
    ],
)
@pytest.mark.parametrize("pairs", [False, True])
def test_fast_window_reads_predictions_as_strictly_as_json_loads(
    sqlite_log: PredictionLog, outputs: str, pairs: bool
) -> None:
    """Only the outputs' numbers are parsed (no row of the window is a pair of another shape): spellings
    JSON forbids are refused as json.loads refuses them, never read as numbers."""
    if pairs:
        outputs = "[[0.5, " + outputs[1:-1] + "]]"
    _raw_call(sqlite_log, '[{"a": 1}]', "[[0.5, 0.5]]" if pairs else "[0.5]")
    _raw_call(sqlite_log, '[{"a": 2}]', outputs, at=T0 + timedelta(seconds=1))
    end = T0 + timedelta(hours=1)
    try:
        python = sqlite_log._window_python("ctr", T0, end)
    except ValueError:
        with pytest.raises(ValueError):
            sqlite_log.window("ctr", T0, end)
        return
    pd.testing.assert_frame_equal(sqlite_log.window("ctr", T0, end), python)
