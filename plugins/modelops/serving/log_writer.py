"""The prediction log written off the request path: queued, then committed in batches by one thread.

:meth:`PredictionLog.record` commits one row per scoring call on the request's thread (1.5 ms for a
1-row call on SQLite, more at the tail). :class:`BatchedPredictionWriter` takes the same
:class:`PredictionRecord`, checks and serializes it on the caller's thread (so a record the database
would refuse fails there, as with ``record()``), queues the row, and returns. One background thread
inserts the queued rows many per transaction, into the same table with the same column values.

What it guarantees:

* nothing is dropped: the queue is bounded and a full queue makes :meth:`~BatchedPredictionWriter.submit`
  wait (back-pressure), or raise :class:`PredictionLogBacklogged` after its ``timeout``;
* a failed write (database down, locked, restarting) is retried with capped exponential backoff while
  its rows stay queued; the insert is ``ON CONFLICT (request_id) DO NOTHING``, so a retry after a commit
  whose acknowledgement was lost writes nothing twice and does not fail on the duplicate;
* :meth:`~BatchedPredictionWriter.flush` returns once everything submitted before it is committed;
  :meth:`~BatchedPredictionWriter.close` drains the queue and stops the thread (idempotent). A writer
  still open at interpreter exit is closed by an ``atexit`` hook; a SIGTERM must be turned into
  ``close()`` by the process (uvicorn does: the gateway's lifespan shutdown runs on SIGTERM).

Labels for a request whose row is still queued: the gateway checks
:meth:`~BatchedPredictionWriter.pending` *before* ``add_labels`` and flushes only then::

    if writer.pending(request_id):
        writer.flush()
    prediction_log.add_labels(request_id, labels)

Checked before, not after an ``UnknownRequestError``: a row committed between a failed lookup and the
check would otherwise be refused. Only ids still queued pay for a flush, so labels sent with made-up ids
cannot make the gateway flush on demand.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import Counter, deque
from dataclasses import dataclass
from itertools import islice
from typing import Any

import sqlalchemy as sa

from modelops.errors import ModelOpsError
from modelops.serving.prediction_log import (
    PredictionLog,
    PredictionRecord,
    dialect_insert,
    predictions_table,
    record_row,
)

logger = logging.getLogger(__name__)


class PredictionLogBacklogged(ModelOpsError):
    """``submit`` waited ``timeout`` seconds for room in a full queue: the database is slow or down."""


class WriterClosed(ModelOpsError):
    """The writer was closed (or its thread died); it accepts no more records."""


@dataclass(frozen=True)
class WriterStats:
    """A snapshot of a writer: records ``queued`` (not yet committed), ``submitted`` and ``written`` since
    it started, failed write attempts, and the last write error (None once a write succeeds again)."""

    queued: int
    submitted: int
    written: int
    failed_writes: int
    last_error: str | None


@dataclass(frozen=True)
class _Queued:
    enqueued_at: float  # time.monotonic() when submitted: the flush timer runs from the oldest one
    request_id: str
    row: dict[str, Any]


class BatchedPredictionWriter:
    """Writes :class:`PredictionRecord` rows to ``log``'s table in batches from one background thread.

    ``max_queue``: records held at most (queued or being written); ``submit`` waits beyond it.
    ``max_batch``: rows per transaction at most. ``flush_interval_s``: the longest a record waits for a
    batch to fill before it is written anyway. ``retry_initial_s``/``retry_max_s``: the backoff between
    failed writes (doubling up to the maximum). Thread-safe: any number of threads may submit.
    """

    def __init__(
        self,
        log: PredictionLog,
        *,
        max_queue: int = 10_000,
        max_batch: int = 500,
        flush_interval_s: float = 0.05,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 5.0,
    ) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError(f"max_queue ({max_queue}) and max_batch ({max_batch}) must be at least 1")
        if flush_interval_s < 0 or retry_initial_s <= 0 or retry_max_s < retry_initial_s:
            raise ValueError(
                f"flush_interval_s ({flush_interval_s}) must be >= 0 and 0 < retry_initial_s "
                f"({retry_initial_s}) <= retry_max_s ({retry_max_s})"
            )
        self.log = log
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.flush_interval_s = flush_interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._insert = dialect_insert(log.engine.dialect.name)(predictions_table).on_conflict_do_nothing(
            index_elements=["request_id"]
        )
        self._cond = threading.Condition(threading.Lock())
        # Records stay in the queue until their batch is committed: a failed write leaves them there, and
        # pending() and the back-pressure bound see them.
        self._queue: deque[_Queued] = deque()
        self._pending: Counter[str] = Counter()
        self._submitted = 0
        self._written = 0
        self._failed_writes = 0
        self._last_error: str | None = None
        self._flush_waiters = 0
        self._closing = False
        self._crash: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"prediction-log-writer-{id(self):x}", daemon=True
        )
        self._thread.start()
        _open_writers.add(self)

    def __repr__(self) -> str:
        return f"BatchedPredictionWriter({self.log!r}, queued={len(self._queue)})"

    # --- the request side --------------------------------------------------------------------------

    def submit(self, record: PredictionRecord, *, timeout: float | None = None) -> None:
        """Queue ``record`` for writing and return; never drops it.

        The record is checked and serialized here, so one the table would refuse raises now
        (``ValueError``/``TypeError``), as ``PredictionLog.record`` would. When the queue is full this
        waits for room: forever with ``timeout=None``, else up to ``timeout`` seconds and then raises
        :class:`PredictionLogBacklogged` (the record is not queued). Raises :class:`WriterClosed` after
        :meth:`close`.
        """
        row = record_row(record)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._check_open()
                if len(self._queue) < self.max_queue:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PredictionLogBacklogged(
                        f"the prediction log writer's queue has been full ({self.max_queue} records) for "
                        f"{timeout} s, so request {record.request_id!r} was not logged; the database at "
                        f"{self.log!r} is slow or down (last error: {self._last_error or 'none'}): restore "
                        "it, or raise max_queue if it is only slow"
                    )
                self._cond.wait(remaining)
            self._queue.append(_Queued(time.monotonic(), record.request_id, row))
            self._pending[record.request_id] += 1
            self._submitted += 1
            if len(self._queue) == 1 or len(self._queue) >= self.max_batch:
                # The first record starts the writer's flush timer; a full batch is written without it.
                self._cond.notify_all()

    def pending(self, request_id: str) -> bool:
        """Whether a record with this id is queued and not yet committed (O(1))."""
        with self._cond:
            return request_id in self._pending

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted before this call is committed; False if ``timeout`` passed
        first. Raises :class:`WriterClosed` if the writer's thread died with records unwritten."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            self._flush_waiters += 1
            self._cond.notify_all()  # write now rather than at the end of the flush interval
            try:
                while self._written < target:
                    if self._crash is not None:
                        self._check_open()
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return True
            finally:
                self._flush_waiters -= 1

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting records, write every queued one and stop the thread. Idempotent.

        With a ``timeout``, raises :class:`PredictionLogBacklogged` if records are still unwritten by then
        (the thread keeps retrying; call ``close()`` again to keep waiting). Call it from a thread that
        is not inside :meth:`submit` (a signal handler interrupting ``submit`` on the same thread would
        wait for itself).
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread.is_alive():
            raise PredictionLogBacklogged(
                f"closing the prediction log writer: {len(self._queue)} record(s) still unwritten after "
                f"{timeout} s (last error: {self._last_error or 'none'}); the writer keeps retrying, call "
                "close() again to wait longer"
            )
        _open_writers.discard(self)
        if self._crash is not None and self._queue:
            self._check_open()
        logger.info(
            "prediction log writer closed: %d record(s) written, %d still queued",
            self._written,
            len(self._queue),
        )

    def stats(self) -> WriterStats:
        """Counters for metrics and health checks."""
        with self._cond:
            return WriterStats(
                queued=len(self._queue),
                submitted=self._submitted,
                written=self._written,
                failed_writes=self._failed_writes,
                last_error=self._last_error,
            )

    def _check_open(self) -> None:
        if self._crash is not None:
            raise WriterClosed(
                f"the prediction log writer's thread died ({type(self._crash).__name__}: {self._crash}) "
                f"with {len(self._queue)} record(s) unwritten; this is a bug: report it with the traceback "
                "logged by modelops.serving.log_writer"
            ) from self._crash
        if self._closing:
            raise WriterClosed("the prediction log writer is closed; create a new one to log more records")

    # --- the writer thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            backoff = 0.0
            while True:
                batch = self._next_batch(retrying=backoff > 0)
                if batch is None:
                    return
                try:
                    self._write_rows([item.row for item in batch])
                except sa.exc.SQLAlchemyError as exc:
                    # The rows stay queued; records are checked at submit, so what fails here is the
                    # database (down, locked, restarting, misconfigured) and is worth retrying.
                    backoff = min(self.retry_max_s, backoff * 2 if backoff else self.retry_initial_s)
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    with self._cond:
                        self._failed_writes += 1
                        self._last_error = error
                        failures = self._failed_writes
                    logger.warning(
                        "writing %d prediction log row(s) to %r failed (%s); retrying in %.2f s (%d failed "
                        "writes so far), nothing is dropped",
                        len(batch),
                        self.log,
                        error,
                        backoff,
                        failures,
                    )
                    time.sleep(backoff)
                    continue
                backoff = 0.0
                self._committed(batch)
        except BaseException as exc:
            # Not swallowed: recorded so that submit/flush/close raise instead of waiting forever, then
            # re-raised so threading's excepthook logs the traceback.
            with self._cond:
                self._crash = exc
                self._cond.notify_all()
            logger.exception("the prediction log writer's thread died")
            raise

    def _next_batch(self, *, retrying: bool) -> list[_Queued] | None:
        """The oldest queued records (still queued) once a batch is due; None when closed and drained."""
        with self._cond:
            while True:
                if not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                due = self._queue[0].enqueued_at + self.flush_interval_s
                now = time.monotonic()
                if (
                    retrying
                    or self._closing
                    or self._flush_waiters
                    or len(self._queue) >= self.max_batch
                    or now >= due
                ):
                    return list(islice(self._queue, self.max_batch))
                self._cond.wait(due - now)

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        # One transaction, one executemany (SQLite) / multi-row VALUES (psycopg2) for the whole batch.
        with self.log.engine.begin() as conn:
            conn.execute(self._insert, rows)

    def _committed(self, batch: list[_Queued]) -> None:
        with self._cond:
            for item in batch:
                # The batch is the queue's head: nothing but this thread removes from the queue.
                self._queue.popleft()
                left = self._pending[item.request_id] - 1
                if left:
                    self._pending[item.request_id] = left
                else:
                    del self._pending[item.request_id]
            self._written += len(batch)
            self._last_error = None
            self._cond.notify_all()  # room for blocked submitters; flushers check their target


# Writers still open at interpreter exit are drained (daemon threads would otherwise just stop). Weak:
# a writer nobody references any more is not kept alive by this.
_open_writers: weakref.WeakSet[BatchedPredictionWriter] = weakref.WeakSet()


@atexit.register
def _close_open_writers() -> None:
    for writer in list(_open_writers):
        writer.close()
