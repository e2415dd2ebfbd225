"""BatchedPredictionWriter on a real SQLite file and a real PostgreSQL database: every submitted record is
written exactly once, whatever the concurrency, back-pressure, failed writes or a SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from modelops.serving import prediction_log
from modelops.serving.log_writer import (
    BatchedPredictionWriter,
    PredictionLogBacklogged,
    WriterClosed,
)
from modelops.serving.prediction_log import PredictionLog, PredictionRecord, predictions_table

PROJECT_ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def make_record(index: int = 0, *, rows: int = 2) -> PredictionRecord:
    return PredictionRecord(
        request_id=uuid.uuid4().hex,
        received_at=T0 + timedelta(milliseconds=index),
        caller_id="shop",
        model_name="ctr",
        model_version="1",
        status_code=200,
        latency_ms=1.5,
        n_rows=rows,
        inputs=[{"user_age": 30.0 + i, "device": "mobile"} for i in range(rows)],
        outputs=[[0.9 - i / 10, 0.1 + i / 10] for i in range(rows)],
    )


def stored_ids(log: PredictionLog) -> list[str]:
    with log.engine.connect() as conn:
        return list(conn.execute(sa.select(predictions_table.c.request_id)).scalars())


@pytest.fixture
def sqlite_log(tmp_path: Path) -> Iterator[PredictionLog]:
    log = PredictionLog(f"sqlite:///{tmp_path}/predictions.db")
    yield log
    log.dispose()


@pytest.fixture
def postgres_log(postgres_url: str) -> Iterator[PredictionLog]:
    log = PredictionLog(postgres_url)
    yield log
    log.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def any_log(request: pytest.FixtureRequest) -> PredictionLog:
    return request.getfixturevalue(f"{request.param}_log")


def submit_concurrently(writer: BatchedPredictionWriter, threads: int, each: int) -> list[str]:
    ids: list[list[str]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def load(mine: list[str]) -> None:
        start.wait()
        for index in range(each):
            record = make_record(index, rows=1 + index % 3)
            writer.submit(record)
            mine.append(record.request_id)

    workers = [threading.Thread(target=load, args=(mine,)) for mine in ids]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return [request_id for mine in ids for request_id in mine]


def test_concurrent_submitters_write_every_record_exactly_once(any_log: PredictionLog) -> None:
    writer = BatchedPredictionWriter(any_log, max_queue=100, max_batch=64, flush_interval_s=0.01)
    submitted = submit_concurrently(writer, threads=8, each=250)
    writer.close()
    stored = stored_ids(any_log)
    assert len(stored) == 8 * 250
    assert sorted(stored) == sorted(submitted)
    stats = writer.stats()
    assert (stats.queued, stats.submitted, stats.written, stats.failed_writes) == (0, 2000, 2000, 0)


def test_rows_are_the_ones_record_writes(any_log: PredictionLog) -> None:
    """Same table, same column values as PredictionLog.record, so window() reads both alike."""
    direct = make_record(rows=3)
    queued = replace(
        direct, request_id=uuid.uuid4().hex, received_at=direct.received_at + timedelta(seconds=0.5)
    )
    failed = replace(make_record(), request_id=uuid.uuid4().hex, status_code=503, outputs=None, error="E: x")
    any_log.record(direct)
    writer = BatchedPredictionWriter(any_log, max_queue=10, max_batch=10, flush_interval_s=0.0)
    writer.submit(queued)
    writer.submit(failed)
    writer.close()
    with any_log.engine.connect() as conn:
        rows = {row.request_id: row._asdict() for row in conn.execute(sa.select(predictions_table))}
    written, expected = rows[queued.request_id], rows[direct.request_id]
    assert written["received_at"] == queued.received_at and expected["received_at"] == direct.received_at
    same = {"request_id": None, "received_at": None}
    assert {**written, **same} == {**expected, **same}
    assert rows[failed.request_id]["outputs"] is None and rows[failed.request_id]["status_code"] == 503
    frame = any_log.window("ctr", T0, T0 + timedelta(seconds=1))
    assert frame["request_id"].tolist() == [direct.request_id] * 3 + [queued.request_id] * 3


@pytest.mark.parametrize(
    "value",
    [
        [{"a": 1.5, "b": "x", "c": None, "d": True}],
        [{"a": float("nan"), "b": [float("inf"), 1.0], "c": (1, float("-inf"))}],
        [{"a": np.float64(0.25), "b": np.int64(3), "c": np.array([1.0, 2.0]), "d": (1, 2)}],
        [{"nested": {"x": [np.float32(0.5), {"y": float("nan")}]}}],
        [[0.9, 0.1], [0.2, 0.8]],
        [T0, "\u2603", 10**30],
    ],
)
def test_inputs_are_serialized_exactly_as_the_walk_first_way(value: Any) -> None:
    """``_to_json`` dumps directly and walks the value for NaN/inf only when the dump refuses: the bytes
    are those of walking first, for values with and without NaN/inf."""
    walked = json.dumps(
        prediction_log._clean_floats(value), default=prediction_log._json_default, allow_nan=False
    )
    assert prediction_log._to_json(value) == walked


def test_values_json_refuses_are_refused_alike() -> None:
    with pytest.raises(ValueError):
        json.dumps(
            prediction_log._clean_floats([np.array([np.nan])]),
            default=prediction_log._json_default,
            allow_nan=False,
        )
    with pytest.raises(ValueError):
        prediction_log._to_json([np.array([np.nan])])


def test_flush_makes_queued_records_durable_and_pending_tracks_them(sqlite_log: PredictionLog) -> None:
    writer = BatchedPredictionWriter(sqlite_log, max_queue=100, max_batch=100, flush_interval_s=60.0)
    try:
        record = make_record()
        writer.submit(record)
        assert writer.pending(record.request_id)
        assert stored_ids(sqlite_log) == []  # the timer is a minute away: still queued
        assert writer.flush(timeout=10)
        assert not writer.pending(record.request_id)
        assert stored_ids(sqlite_log) == [record.request_id]
        # The gateway's label path: flush only for an id still queued, then add_labels finds the row.
        later = make_record()
        writer.submit(later)
        if writer.pending(later.request_id):
            writer.flush()
        assert sqlite_log.add_labels(later.request_id, [1, 0]) == 2
        assert not writer.pending("never-submitted")
    finally:
        writer.close()


def test_a_lone_record_is_written_when_the_flush_interval_is_up(sqlite_log: PredictionLog) -> None:
    writer = BatchedPredictionWriter(sqlite_log, max_queue=100, max_batch=100, flush_interval_s=0.2)
    try:
        for round_ in range(2):  # the second time, from an idle writer
            record = make_record(round_)
            submitted = time.monotonic()
            writer.submit(record)
            while writer.pending(record.request_id):
                assert time.monotonic() - submitted < 10, "the timer never wrote the record"
                time.sleep(0.01)
            assert time.monotonic() - submitted >= 0.2 * 0.9  # not before the interval either
            assert record.request_id in stored_ids(sqlite_log)
    finally:
        writer.close()


def test_close_drains_the_queue_and_is_idempotent(sqlite_log: PredictionLog) -> None:
    writer = BatchedPredictionWriter(sqlite_log, max_queue=1000, max_batch=30, flush_interval_s=60.0)
    records = [make_record(index) for index in range(100)]
    for record in records:
        writer.submit(record)
    assert writer.stats().queued >= 100 - 30 * 3  # full batches may already be written, not the rest
    writer.close()
    writer.close()
    assert sorted(stored_ids(sqlite_log)) == sorted(record.request_id for record in records)
    with pytest.raises(WriterClosed, match="closed; create a new one"):
        writer.submit(make_record())
    assert writer.flush(timeout=1)


def test_a_full_queue_blocks_submit_and_drops_nothing(sqlite_log: PredictionLog) -> None:
    writer = BatchedPredictionWriter(sqlite_log, max_queue=2, max_batch=2, flush_interval_s=0.0)
    write = writer._write_rows
    high_water = 0
    gate, at_gate = threading.Event(), threading.Event()
    gate.set()

    def slow_write(rows: list[dict[str, Any]]) -> None:
        nonlocal high_water
        high_water = max(high_water, writer.stats().queued)
        if not gate.is_set():
            at_gate.set()
            gate.wait()
        time.sleep(0.05)
        write(rows)

    writer._write_rows = slow_write  # type: ignore[method-assign]
    records = [make_record(index) for index in range(20)]
    started = time.perf_counter()
    for record in records:
        writer.submit(record)
        high_water = max(high_water, writer.stats().queued)
    # submit waited for the slow writer (2 rows per 50 ms) instead of queueing beyond the bound.
    assert high_water <= 2
    assert time.perf_counter() - started >= 0.05 * (20 - 2) / 2 * 0.9

    # With a timeout, a full queue is a clear error and the record is not queued. The writer is held
    # with a full batch in hand, so the queue stays full.
    gate.clear()
    while not (at_gate.is_set() and writer.stats().queued == 2):
        if writer.stats().queued < 2:
            record = make_record()
            writer.submit(record)
            records.append(record)
        else:
            time.sleep(0.001)
    refused = make_record()
    with pytest.raises(PredictionLogBacklogged, match="queue has been full .2 records.*raise max_queue"):
        writer.submit(refused, timeout=0.01)
    gate.set()
    writer.close()
    stored = stored_ids(sqlite_log)
    assert sorted(stored) == sorted(record.request_id for record in records)
    assert refused.request_id not in stored


def fail_inserts(engine: sa.Engine, times: int) -> list[int]:
    """Make the next ``times`` inserts into the prediction log fail as a database that is down would."""
    failures = [0]

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _down(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO modelops_predictions") and failures[0] < times:
            failures[0] += 1
            raise sa.exc.OperationalError(statement, None, sqlite3.OperationalError("disk I/O error (test)"))

    return failures


def test_failed_writes_are_retried_and_every_record_arrives_once(
    sqlite_log: PredictionLog, caplog: pytest.LogCaptureFixture
) -> None:
    failures = fail_inserts(sqlite_log.engine, times=4)
    writer = BatchedPredictionWriter(
        sqlite_log, max_queue=1000, max_batch=16, flush_interval_s=0.0, retry_initial_s=0.01, retry_max_s=0.05
    )
    submitted = submit_concurrently(writer, threads=4, each=50)
    assert writer.flush(timeout=30)
    writer.close()
    assert failures[0] == 4
    stored = stored_ids(sqlite_log)
    assert len(stored) == 200 and sorted(stored) == sorted(submitted)
    stats = writer.stats()
    assert stats.failed_writes == 4 and stats.last_error is None
    assert "disk I/O error (test)" in caplog.text and "nothing is dropped" in caplog.text


def test_a_retry_after_an_unacknowledged_commit_writes_nothing_twice(any_log: PredictionLog) -> None:
    writer = BatchedPredictionWriter(
        any_log, max_queue=100, max_batch=100, flush_interval_s=60.0, retry_initial_s=0.01
    )
    write = writer._write_rows
    lost_ack = [True]

    def commit_then_fail(rows: list[dict[str, Any]]) -> None:
        write(rows)
        if lost_ack[0]:  # committed, but the client never heard: it must retry the same rows
            lost_ack[0] = False
            raise sa.exc.OperationalError("COMMIT", None, Exception("server closed the connection"))

    writer._write_rows = commit_then_fail  # type: ignore[method-assign]
    records = [make_record(index) for index in range(10)]
    for record in records[:5]:
        writer.submit(record)
    writer.flush()
    for record in records[5:]:
        writer.submit(record)
    writer.close()
    assert sorted(stored_ids(any_log)) == sorted(record.request_id for record in records)
    assert writer.stats().failed_writes == 1


def test_a_postgres_outage_holds_records_until_it_is_back(postgres_log: PredictionLog) -> None:
    """A real outage: the database refuses connections and its sessions are killed, then comes back."""
    name = postgres_log.engine.url.database
    admin = sa.create_engine(
        "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT"
    )
    writer = BatchedPredictionWriter(
        postgres_log,
        max_queue=1000,
        max_batch=50,
        flush_interval_s=0.0,
        retry_initial_s=0.02,
        retry_max_s=0.2,
    )
    try:
        before = [make_record(index) for index in range(20)]
        for record in before:
            writer.submit(record)
        assert writer.flush(timeout=30)
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(
                sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                {"name": name},
            )
        during = [make_record(index) for index in range(100)]
        for record in during:
            writer.submit(record)
        assert not writer.flush(timeout=1.0)  # the database is down: nothing can be durable
        stats = writer.stats()
        assert stats.failed_writes >= 2 and stats.queued == 100 and stats.last_error
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        assert writer.flush(timeout=30)
        writer.close()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
    stored = stored_ids(postgres_log)
    assert sorted(stored) == sorted(record.request_id for record in before + during)


def test_records_the_table_would_refuse_fail_at_submit(sqlite_log: PredictionLog) -> None:
    writer = BatchedPredictionWriter(sqlite_log, max_queue=10, max_batch=10, flush_interval_s=0.0)
    try:
        with pytest.raises(ValueError, match="naive datetime"):
            writer.submit(replace(make_record(), received_at=datetime(2026, 3, 1)))
        with pytest.raises(ValueError, match="caller_id is 201 characters, more than the 200"):
            writer.submit(replace(make_record(), caller_id="x" * 201))
        with pytest.raises(ValueError, match="without model_name"):
            writer.submit(replace(make_record(), model_name=None))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not JSON serializable"):
            writer.submit(replace(make_record(), inputs=[object()]))
        assert writer.stats().submitted == 0
    finally:
        writer.close()
    assert stored_ids(sqlite_log) == []


def test_a_dead_writer_thread_is_reported_not_waited_for(
    sqlite_log: PredictionLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the test's own crash: keep quiet
    writer = BatchedPredictionWriter(sqlite_log, max_queue=10, max_batch=10, flush_interval_s=0.0)

    def bug(rows: list[dict[str, Any]]) -> None:
        raise RuntimeError("a bug in the writer")

    writer._write_rows = bug  # type: ignore[method-assign]
    writer.submit(make_record())
    with pytest.raises(WriterClosed, match="thread died .RuntimeError: a bug in the writer. with 1 record"):
        writer.flush(timeout=10)
    with pytest.raises(WriterClosed, match="thread died"):
        writer.submit(make_record())
    with pytest.raises(WriterClosed, match="thread died"):
        writer.close()


CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time, uuid
    from datetime import UTC, datetime

    from modelops.serving.log_writer import BatchedPredictionWriter, WriterClosed
    from modelops.serving.prediction_log import PredictionLog, PredictionRecord

    url, out = sys.argv[1], sys.argv[2]
    writer = BatchedPredictionWriter(
        PredictionLog(url), max_queue=100_000, max_batch=2_000, flush_interval_s=30.0
    )
    accepted = [[] for _ in range(4)]

    def load(mine):
        while True:
            request_id = uuid.uuid4().hex
            record = PredictionRecord(
                request_id=request_id, received_at=datetime.now(UTC), caller_id="load", model_name="ctr",
                model_version="1", status_code=200, latency_ms=1.0, n_rows=1, inputs=[{"a": 1.0}],
                outputs=[[0.4, 0.6]],
            )
            try:
                writer.submit(record)
            except WriterClosed:
                return
            mine.append(request_id)

    def on_sigterm(signum, frame):
        queued = writer.stats().queued
        writer.close()
        with open(out, "w") as handle:
            json.dump({"queued_at_sigterm": queued, "accepted": [i for mine in accepted for i in mine]}, handle)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    for mine in accepted:
        threading.Thread(target=load, args=(mine,), daemon=True).start()
    print("loading", flush=True)
    while True:
        time.sleep(1)
    """
)


def test_sigterm_mid_load_with_a_closing_handler_loses_no_record(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/predictions.db"
    out = tmp_path / "accepted.json"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "plugins")}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"loading\n", child.stderr.read()
        time.sleep(1.5)  # under load: batches being written, more queued behind them
        os.kill(child.pid, signal.SIGTERM)
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, child.stderr.read() if child.stderr else ""
    result = json.loads(out.read_text())
    accepted = result["accepted"]
    assert result["queued_at_sigterm"] > 0 and len(accepted) > 2_000
    log = PredictionLog(url)
    try:
        stored = stored_ids(log)
    finally:
        log.dispose()
    # Every submit that returned is in the log once; at most one more per thread (submitted, not yet noted).
    assert set(accepted) <= set(stored) and len(stored) == len(set(stored))
    assert len(stored) - len(accepted) <= 4
