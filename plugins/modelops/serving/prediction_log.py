"""The prediction log: every scoring call the gateway answers, and the ground truth delivered later.

The gateway writes one row per call (success or failure) to ``modelops_predictions``; late labels go
to ``modelops_labels``, one row per scored input row. Airflow tasks (monitoring, retraining) read
windows of it back as one DataFrame row per scored input row. SQLAlchemy Core keeps the code the same
on SQLite (the embedded default) and PostgreSQL (production).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Dialect, Engine

from modelops import db
from modelops.errors import ConfigurationError, ModelOpsError
from modelops.vocabulary import Arm

PREDICTIONS_TABLE = "modelops_predictions"
LABELS_TABLE = "modelops_labels"
LABEL_REJECTIONS_TABLE = "modelops_label_rejections"

# Reasons counted in modelops_label_rejections. The first two are refusals (404/400 at the gateway);
# "redelivered" is informational: a delivery that replaced labels already stored for the request.
UNKNOWN_REQUEST_ID = "unknown_request_id"
LABEL_COUNT_MISMATCH = "label_count_mismatch"
REDELIVERED = "redelivered"

# Columns window() adds after the input features. An input key with one of these names never replaces
# them: window() drops it (see its docstring).
WINDOW_COLUMNS = [
    "prediction",
    "request_id",
    "row_index",
    "received_at",
    "caller_id",
    "model_version",
    "label",
]


class UnknownRequestError(ModelOpsError, KeyError):
    """Labels were sent for a request id the prediction log has never seen."""

    def __str__(self) -> str:
        # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class LabelCountMismatch(ModelOpsError, ValueError):
    """The number of labels differs from the number of rows the request scored."""


class UTCDateTime(sa.types.TypeDecorator):
    """A timezone-aware UTC timestamp on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no time zone, so values are stored as UTC and the
    zone is re-attached on read. Naive datetimes are refused: their zone is a guess.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} given to the prediction log; "
                "pass a timezone-aware datetime (e.g. datetime.now(UTC))"
            )
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()

predictions_table = sa.Table(
    PREDICTIONS_TABLE,
    metadata,
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("received_at", UTCDateTime(), nullable=False),
    sa.Column("caller_id", sa.String(200), nullable=False),
    sa.Column("model_name", sa.String(256), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=True),
    sa.Column("status_code", sa.Integer, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("n_rows", sa.Integer, nullable=False),
    sa.Column("inputs", sa.Text, nullable=False),
    sa.Column("outputs", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    # W3C trace context of the call (55 characters: version-traceid-spanid-flags), so a log line, a trace
    # and a prediction can be joined.
    sa.Column("traceparent", sa.String(55), nullable=True),
    # Which arm answered (champion, challenger during a canary, staged for a smoke test): modelops.vocabulary.Arm.
    sa.Column("arm", sa.String(16), nullable=True),
    # What screening flagged on a scored call, e.g. "out_of_training_range:user_age" (columns, never values).
    sa.Column("flags", sa.String(500), nullable=True),
    sa.Index("ix_modelops_predictions_model_received", "model_name", "received_at"),
)

labels_table = sa.Table(
    LABELS_TABLE,
    metadata,
    sa.Column(
        "request_id",
        sa.String(32),
        sa.ForeignKey(f"{PREDICTIONS_TABLE}.request_id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("row_index", sa.Integer, nullable=False),
    sa.Column("label", sa.Integer, nullable=False),
    sa.Column("labelled_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("request_id", "row_index", name="pk_modelops_labels"),
)

# Label deliveries add_labels() refused (or that replaced earlier labels), counted per UTC hour and
# reason. Never the request id nor the labels: callers choose them (unbounded, and not for logs).
label_rejections_table = sa.Table(
    LABEL_REJECTIONS_TABLE,
    metadata,
    sa.Column("hour", UTCDateTime(), nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.PrimaryKeyConstraint("hour", "reason", name="pk_modelops_label_rejections"),
)


@dataclass(frozen=True)
class PredictionRecord:
    """One call to a scoring endpoint. ``inputs`` is a list of row dicts, ``outputs`` the predictions."""

    request_id: str
    received_at: datetime
    caller_id: str
    model_name: str
    model_version: str | None
    status_code: int
    latency_ms: float
    n_rows: int
    inputs: list[Any]
    outputs: list[Any] | None = None
    error: str | None = None
    traceparent: str | None = None
    arm: str = Arm.CHAMPION.value
    flags: str | None = None


@dataclass(frozen=True)
class RequestStats:
    """What :meth:`PredictionLog.request_stats` reports of the calls in a window.

    ``failed`` counts calls with a status >= 400 or an error; ``error_rate`` is ``failed / requests``;
    ``p50_ms``/``p95_ms``/``p99_ms`` are latency percentiles in milliseconds. None when there was no call.
    """

    requests: int
    failed: int
    error_rate: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None


def _json_default(value: Any) -> Any:
    # Inputs come from pandas/numpy: numpy scalars and arrays, timestamps.
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"value of type {type(value).__name__} is not JSON serializable")


def _to_json(value: Any) -> str:
    # Dump directly; only a value holding NaN/inf (which allow_nan=False refuses) is walked first to
    # turn those into null: the walk changes nothing otherwise, and costs as much as the dump.
    try:
        return json.dumps(value, default=_json_default, allow_nan=False)
    except ValueError:
        return json.dumps(_clean_floats(value), default=_json_default, allow_nan=False)


def _clean_floats(value: Any) -> Any:
    # NaN/inf are not JSON; store them as null like pandas' to_json does.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean_floats(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_floats(item) for item in value]
    return value


def _prediction_value(output: Any) -> Any:
    """The single number monitoring compares: p1 of a binary probability pair, else the scalar."""
    if isinstance(output, dict) and len(output) == 1:
        output = next(iter(output.values()))
    if isinstance(output, list | tuple):
        if len(output) == 2:
            return output[1]
        if len(output) == 1:
            return output[0]
    return output


# The longest string each column holds (PostgreSQL enforces it; SQLite does not).
_STRING_LIMITS = {
    column.name: column.type.length
    for column in predictions_table.columns
    if isinstance(column.type, sa.String) and column.type.length is not None
}
_REQUIRED = ("request_id", "received_at", "caller_id", "model_name")


def record_row(entry: PredictionRecord) -> dict[str, Any]:
    """The column values of ``entry`` in ``modelops_predictions`` (what :meth:`PredictionLog.record` and the
    batched writer insert), checked so that the insert cannot refuse them: a refusal in a writer thread
    would hold its queue up rather than fail the call that caused it."""
    for name in _REQUIRED:
        if getattr(entry, name) is None:
            raise ValueError(f"prediction record without {name}; every record needs one")
    if entry.received_at.tzinfo is None:
        raise ValueError(
            f"naive datetime {entry.received_at.isoformat()} given to the prediction log; "
            "pass a timezone-aware datetime (e.g. datetime.now(UTC))"
        )
    row = {
        "request_id": entry.request_id,
        "received_at": entry.received_at,
        "caller_id": entry.caller_id,
        "model_name": entry.model_name,
        "model_version": entry.model_version,
        "status_code": int(entry.status_code),
        "latency_ms": float(entry.latency_ms),
        "n_rows": int(entry.n_rows),
        "inputs": _to_json(entry.inputs),
        "outputs": None if entry.outputs is None else _to_json(entry.outputs),
        "error": entry.error,
        "traceparent": entry.traceparent,
        "arm": entry.arm,
        "flags": entry.flags,
    }
    for name, limit in _STRING_LIMITS.items():
        value = row[name]
        if value is not None and len(value) > limit:
            raise ValueError(
                f"prediction record {name} is {len(value)} characters, more than the {limit} the prediction "
                f"log stores; shorten it before logging (starts {value[:40]!r})"
            )
    return row


class PredictionLog:
    """Read and write the prediction log at a SQLAlchemy URL; creates its tables if absent."""

    def __init__(self, url: str) -> None:
        self.url = url
        # The gateway writes while Airflow tasks read: on SQLite the engine uses WAL (readers proceed
        # during a write) and a busy timeout (a second writer waits instead of failing).
        self.engine: Engine = db.create_engine(url, what="the prediction log")
        metadata.create_all(self.engine)
        _add_missing_columns(self.engine)

    def __repr__(self) -> str:
        return f"PredictionLog({db.safe_url(self.url)!r})"

    # --- writing ---------------------------------------------------------------------------------

    def record(self, entry: PredictionRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(predictions_table.insert().values(**record_row(entry)))

    def add_labels(self, request_id: str, labels: Sequence[int]) -> int:
        """Store ground truth for every row of a request; redelivery overwrites, never duplicates.

        Returns the number of labels stored. Raises :class:`UnknownRequestError` for an unknown
        request id and :class:`LabelCountMismatch` when ``labels`` does not have one per scored row;
        either refusal is first counted (see :meth:`label_rejections`), as is a redelivery.
        """
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(predictions_table.c.n_rows, predictions_table.c.status_code).where(
                    predictions_table.c.request_id == request_id
                )
            ).one_or_none()
            refused = None
            if row is None:
                refused = UNKNOWN_REQUEST_ID
            elif len(labels) != row.n_rows:
                refused = LABEL_COUNT_MISMATCH
            elif not labels:
                return 0
            else:
                now = datetime.now(UTC)
                redelivered = conn.execute(
                    sa.select(sa.literal(1)).where(labels_table.c.request_id == request_id).limit(1)
                ).first()
                values = [
                    {"request_id": request_id, "row_index": index, "label": int(label), "labelled_at": now}
                    for index, label in enumerate(labels)
                ]
                insert = dialect_insert(conn.dialect.name)(labels_table).values(values)
                conn.execute(
                    insert.on_conflict_do_update(
                        index_elements=["request_id", "row_index"],
                        set_={"label": insert.excluded.label, "labelled_at": insert.excluded.labelled_at},
                    )
                )
                if redelivered is not None:
                    _count_label_event(conn, REDELIVERED, now)
                return len(values)
        # Counted in a transaction of its own (the read above is over): a refusal is counted even
        # though nothing else is written, and the counter row is locked only for the upsert.
        with self.engine.begin() as conn:
            _count_label_event(conn, refused, datetime.now(UTC))
        if refused == UNKNOWN_REQUEST_ID:
            raise UnknownRequestError(
                f"request id {request_id!r} is not in the prediction log; send labels with the "
                "X-Request-Id returned by the scoring call"
            )
        raise LabelCountMismatch(
            f"request {request_id!r} scored {row.n_rows} row(s) but {len(labels)} label(s) were "
            "sent; send exactly one label per scored row, in request order"
        )

    def label_rejections(self, start: datetime, end: datetime) -> dict[str, int]:
        """Label deliveries counted per reason (``unknown_request_id``, ``label_count_mismatch``: refused;
        ``redelivered``: replaced earlier labels) in the UTC hours that start in [start, end)."""
        _require_aware(start=start, end=end)
        table = label_rejections_table
        query = (
            sa.select(table.c.reason, sa.func.sum(table.c.count))
            .where(table.c.hour >= start, table.c.hour < end)
            .group_by(table.c.reason)
            .order_by(table.c.reason)
        )
        with self.engine.connect() as conn:
            return {reason: int(total) for reason, total in conn.execute(query)}

    # --- reading ---------------------------------------------------------------------------------

    def _in_window(self, model_name: str, start: datetime, end: datetime) -> sa.ColumnElement:
        """Every call (any status) to ``model_name`` with ``start <= received_at < end``."""
        _require_aware(start=start, end=end)
        table = predictions_table
        return sa.and_(
            table.c.model_name == model_name,
            table.c.received_at >= start,
            table.c.received_at < end,
        )

    def _successful_in_window(self, model_name: str, start: datetime, end: datetime) -> sa.ColumnElement:
        table = predictions_table
        return sa.and_(
            self._in_window(model_name, start, end),
            table.c.status_code >= 200,
            table.c.status_code < 300,
        )

    def count(self, model_name: str, start: datetime, end: datetime) -> int:
        """Number of scored rows (not requests) of successful calls in [start, end): ``len(window())``."""
        query = sa.select(sa.func.coalesce(sa.func.sum(predictions_table.c.n_rows), 0)).where(
            self._successful_in_window(model_name, start, end)
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def window(
        self,
        model_name: str,
        start: datetime,
        end: datetime,
        *,
        features: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """One row per scored input row of successful calls with ``start <= received_at < end``.

        Columns: the input features, then ``prediction`` (p1 for a ``[p0, p1]`` output),
        ``request_id``, ``row_index``, ``received_at`` (UTC), ``caller_id``, ``model_version`` and
        ``label`` (NaN until delivered); rows in the order the calls were received.

        ``features`` given: exactly those feature columns, in that order; a feature a request did not
        send is missing (None/NaN) in its rows, and input keys that are not features are ignored. A
        feature named like one of the columns above is a ``ValueError``.
        ``features`` omitted: every input key any request sent, in first-seen order, missing where a
        request did not send it; an input key named like one of the columns above (``received_at``,
        ``label``...) is **dropped**, so what callers send never replaces the log's own columns.

        Either way a feature value that is not a scalar (a JSON object or array) becomes None, a feature
        column with no value at all is NaN (float64), and an input row that is not a JSON object is the
        single feature ``input``. Column dtypes are what pandas infers from the values.

        How it reads: the JSON texts are fetched a few hundred calls at a time; each call's array is split
        into one row object per line where record() separates rows, and pyarrow parses the lines as
        newline-delimited JSON into typed columns, about :data:`_ARROW_BATCH_ROWS` rows at a time (outputs
        that are scalars or ``[p0, p1]`` pairs are read the same way, one object per row), so no Python object is
        made per value and no more than one batch of JSON text is held. A window that this cannot read
        exactly like the pure-Python reader (nested values, rows that are not objects, values of mixed
        types in a column, integers beyond int64, other output shapes, JSON pyarrow refuses...) is read
        again by that reader, which parses each call with ``json.loads``: the frame is the same either
        way, and JSON that ``json.loads`` refuses still raises its error.
        """
        builder = _WindowBuilder(features)  # refuses bad features before any query
        names = list(builder.columns) if builder.fixed else None
        frame = self._window_arrow(model_name, start, end, names)
        if frame is not None:
            return frame
        return self._window_python(model_name, start, end, features=features)

    def _window_python(
        self,
        model_name: str,
        start: datetime,
        end: datetime,
        *,
        features: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """:meth:`window` read with ``json.loads`` one call at a time: handles every input, the reference
        for the fast path. Holds the columns being built, never every call's JSON text nor a dict per row.
        """
        builder = _WindowBuilder(features)
        requests = self._calls(model_name, start, end)
        with self.engine.connect() as conn:
            for batch in conn.execute(requests).partitions():
                for request in batch:
                    builder.add_request(request)
            builder.calls.add_labels(self._labels(conn, model_name, start, end))
        return builder.frame()

    def _calls(self, model_name: str, start: datetime, end: datetime) -> sa.Select:
        """The successful calls of a window, in the order they were received, with their JSON texts."""
        table = predictions_table
        return (
            sa.select(
                table.c.request_id,
                table.c.received_at,
                table.c.caller_id,
                table.c.model_version,
                table.c.inputs,
                table.c.outputs,
            )
            .where(self._successful_in_window(model_name, start, end))
            .order_by(table.c.received_at, table.c.request_id)
            # A server-side cursor on PostgreSQL; fetched in batches: the JSON texts are never all held.
            .execution_options(yield_per=_FETCH_BATCH)
        )

    def _labels(self, conn: sa.Connection, model_name: str, start: datetime, end: datetime) -> Iterable[Any]:
        table = predictions_table
        labels = (
            sa.select(labels_table.c.request_id, labels_table.c.row_index, labels_table.c.label)
            .join(table, table.c.request_id == labels_table.c.request_id)
            .where(self._successful_in_window(model_name, start, end))
            .execution_options(yield_per=_FETCH_BATCH)
        )
        return chain.from_iterable(conn.execute(labels).partitions())

    def _window_arrow(
        self, model_name: str, start: datetime, end: datetime, features: list[str] | None
    ) -> pd.DataFrame | None:
        """:meth:`window` parsed by pyarrow; None when the window must be read by
        :meth:`_window_python` (see :meth:`window`), or holds no row (that one is cheap)."""
        import pyarrow as pa

        query = self._calls(model_name, start, end)
        reader = _ArrowReader(features)
        # Any batch that cannot be read exactly sends the whole window to the Python reader rather than
        # mixing readers batch by batch: columns, their order and dtypes are then decided in one place,
        # and windows like that (hostile or unusual inputs) are rare.
        try:
            with self.engine.connect() as conn:
                for batch in conn.execute(query).partitions():
                    for call in batch:
                        reader.add_call(call)
                reader.parse()
                if not reader.calls.total:
                    return None
                reader.calls.add_labels(self._labels(conn, model_name, start, end))
            return reader.frame()
        except (_NotUniform, pa.ArrowInvalid):
            # ArrowInvalid: JSON pyarrow refuses (malformed, a lone surrogate, a duplicate key...): the
            # Python reader reads it or raises json.loads' error, as before. The database parses no JSON
            # here, so its errors are real ones and propagate.
            return None

    def request_stats(
        self, model_name: str, start: datetime, end: datetime, *, version: str | None = None
    ) -> RequestStats:
        """Counts, error rate and latency percentiles of every call (successful or failed) to
        ``model_name`` with ``start <= received_at < end`` (answered by ``version`` only, when given).

        A call failed when its status is >= 400 or it has an error. Percentiles are numpy's (method
        ``linear``) over every call's latency. An empty window has zero counts and None elsewhere.
        """
        table = predictions_table
        query = sa.select(table.c.status_code, table.c.latency_ms, table.c.error.is_not(None)).where(
            self._in_window(model_name, start, end)
        )
        if version is not None:
            query = query.where(table.c.model_version == str(version))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        if not rows:
            return RequestStats(requests=0, failed=0)
        latencies = np.fromiter((row[1] for row in rows), dtype="float64", count=len(rows))
        failed = sum(1 for status, _latency, has_error in rows if status >= 400 or has_error)
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99], method="linear")
        return RequestStats(
            requests=len(rows),
            failed=failed,
            error_rate=failed / len(rows),
            p50_ms=float(p50),
            p95_ms=float(p95),
            p99_ms=float(p99),
        )

    def latencies(self, model_name: str, start: datetime, end: datetime, *, version: str) -> np.ndarray:
        """Every latency (ms) of calls to ``model_name`` answered by ``version`` with ``start <= received_at
        < end``, failed calls included (what :meth:`request_stats` summarises)."""
        table = predictions_table
        query = sa.select(table.c.latency_ms).where(
            self._in_window(model_name, start, end), table.c.model_version == str(version)
        )
        with self.engine.connect() as conn:
            return np.fromiter((row[0] for row in conn.execute(query)), dtype="float64")

    def dispose(self) -> None:
        self.engine.dispose()


# Columns added to the table after it first shipped: create_all() makes new tables only, so a log created
# by an earlier release gets them here (nullable, so existing rows stay valid).
_ADDED_COLUMNS = {PREDICTIONS_TABLE: ("traceparent", "arm", "flags")}


def _add_missing_columns(engine: Engine) -> None:
    inspector = sa.inspect(engine)
    for table_name, names in _ADDED_COLUMNS.items():
        present = {column["name"] for column in inspector.get_columns(table_name)}
        table = metadata.tables[table_name]
        for name in names:
            if name in present:
                continue
            column_type = table.c[name].type.compile(dialect=engine.dialect)
            # Two processes may migrate at once: the loser's ALTER fails on the existing column.
            try:
                with engine.begin() as conn:
                    conn.execute(sa.text(f"ALTER TABLE {table_name} ADD COLUMN {name} {column_type}"))
            except (sa.exc.OperationalError, sa.exc.ProgrammingError):
                if name not in {c["name"] for c in sa.inspect(engine).get_columns(table_name)}:
                    raise


def dialect_insert(dialect_name: str, *, what: str = "the prediction log", hint: str | None = None) -> Any:
    # ON CONFLICT is spelled the same on SQLite and PostgreSQL, but SQLAlchemy exposes it per dialect.
    if dialect_name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        if hint is None:
            hint = "point MODELOPS_PREDICTIONS_URL / the modelops_predictions connection at one of them"
        raise ConfigurationError(f"{what} supports SQLite and PostgreSQL, not {dialect_name!r}; {hint}")
    return insert


def _count_label_event(conn: sa.Connection, reason: str, when: datetime) -> None:
    """Add one to the (hour of ``when``, ``reason``) counter of modelops_label_rejections."""
    hour = when.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    insert = dialect_insert(conn.dialect.name)(label_rejections_table).values(
        hour=hour, reason=reason, count=1
    )
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=["hour", "reason"],
            set_={"count": label_rejections_table.c.count + 1},
        )
    )


def _require_aware(**values: datetime) -> None:
    for name, value in values.items():
        if value.tzinfo is None:
            raise ValueError(
                f"{name}={value.isoformat()} is a naive datetime; pass a timezone-aware one "
                "(e.g. datetime(2026, 1, 1, tzinfo=UTC))"
            )


# Calls fetched per round trip by window(): ~100 rows each, so a few MB of JSON text at a time.
_FETCH_BATCH = 500
# Rows window() parses before converting them to typed columns.
_CHUNK_ROWS = 65_536
# What json.loads makes that is not a scalar: such a feature value becomes None.
_NESTED = (dict, list)
# What pd.api.types.infer_dtype says of an object column that holds scalars only.
_SCALAR_KINDS = frozenset(
    {"string", "floating", "integer", "mixed-integer-float", "boolean", "decimal", "bytes"}
)
_METADATA = frozenset(WINDOW_COLUMNS)


class _Column:
    """One output column of :class:`_WindowBuilder`: converted parts, then the values still pending."""

    def __init__(self, leading_missing: int, pending: list[Any]) -> None:
        self.leading_missing = leading_missing  # rows (all flushed) before the column was first seen
        self.parts: list[pd.Series] = []
        self.pending = pending

    def flush(self, convert: Callable[[list[Any]], pd.Series]) -> None:
        if self.pending:
            self.parts.append(convert(self.pending))
            self.pending = []

    def series(self) -> pd.Series:
        parts = self.parts
        if self.leading_missing:
            parts = [pd.Series(np.full(self.leading_missing, None, dtype=object)), *parts]
        if not parts:
            return pd.Series([], dtype="float64")
        if len(parts) == 1:
            return _settled(parts[0])
        # Concatenated parts may widen to object (ints, then a part with None): infer once more, so
        # the dtype is the one the whole column would have had.
        column = pd.concat(parts, ignore_index=True)
        return _settled(column.infer_objects() if column.dtype == object else column)


class _Calls:
    """What is the same for every row of a call (request id, caller, version, time), kept once per call
    and repeated with numpy at the end; and the labels, joined by (request id, row index)."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []
        self.received: list[datetime] = []
        self.callers: list[str] = []
        self.versions: list[str | None] = []
        self.counts: list[int] = []
        self.offsets: dict[str, int] = {}
        self.total = 0  # rows added
        self.labels: np.ndarray | None = None

    def add(self, request: Any, n: int) -> None:
        self.offsets[request.request_id] = self.total
        self.request_ids.append(request.request_id)
        self.received.append(request.received_at)
        self.callers.append(request.caller_id)
        self.versions.append(request.model_version)
        self.counts.append(n)
        self.total += n

    def add_labels(self, labels: Iterable[Any]) -> None:
        self.labels = np.full(self.total, np.nan, dtype="float64")
        count_of = dict(zip(self.request_ids, self.counts, strict=True))
        for request_id, row_index, label in labels:
            offset = self.offsets.get(request_id)
            if offset is not None and 0 <= row_index < count_of[request_id]:
                self.labels[offset + row_index] = label

    def frame(self, data: dict[str, Any]) -> pd.DataFrame:
        """``data`` (the feature columns and ``prediction``) followed by the other window columns."""
        counts = np.asarray(self.counts, dtype="int64")
        data["request_id"] = np.repeat(np.asarray(self.request_ids, dtype=object), counts)
        starts = np.cumsum(counts) - counts
        data["row_index"] = np.arange(self.total, dtype="int64") - np.repeat(starts, counts)
        received = pd.to_datetime(pd.Series(self.received, dtype=object), utc=True)
        data["received_at"] = pd.DatetimeIndex(received).as_unit("ns").repeat(counts)
        data["caller_id"] = np.repeat(np.asarray(self.callers, dtype=object), counts)
        data["model_version"] = np.repeat(np.asarray(self.versions, dtype=object), counts)
        data["label"] = self.labels if self.labels is not None else np.full(self.total, np.nan)
        return pd.DataFrame(data, copy=False)


class _WindowBuilder:
    """The columns of :meth:`PredictionLog.window`, built one call at a time with ``json.loads``.

    Features and predictions go to one list per column (padded with None where a call did not send a
    feature), converted to typed arrays every :data:`_CHUNK_ROWS` rows so that the Python objects the
    JSON parser made do not pile up; the rest is :class:`_Calls`.
    """

    def __init__(self, features: Sequence[str] | None) -> None:
        self.fixed = features is not None
        self.columns: dict[str, _Column] = {}
        if features is not None:
            if isinstance(features, str):
                raise TypeError(f"features must be a sequence of column names, not the string {features!r}")
            names = list(dict.fromkeys(features))
            clashing = [name for name in names if name in _METADATA]
            if clashing:
                raise ValueError(
                    f"features {clashing} are named like columns window() adds ({', '.join(WINDOW_COLUMNS)}); "
                    "rename the features"
                )
            self.columns = {name: _Column(0, []) for name in names}
        self.predictions = _Column(0, [])
        self.calls = _Calls()
        self.flushed = 0  # rows converted

    def add_request(self, request: Any) -> None:
        rows = json.loads(request.inputs)
        if not isinstance(rows, list):
            rows = [rows]
        n = len(rows)
        if n == 0:
            return
        wanted = self.columns.keys() if self.fixed else None
        try:
            by_name = _transpose(rows, wanted)
        except (AttributeError, TypeError):  # a row that is not an object: it is the single feature "input"
            by_name = _transpose([row if row.__class__ is dict else {"input": row} for row in rows], wanted)
        del rows
        self._add_features(by_name, n)
        outputs = json.loads(request.outputs) if request.outputs is not None else []
        if not isinstance(outputs, list):
            outputs = []
        predictions = _predictions(outputs[:n])
        if len(predictions) < n:
            predictions.extend([None] * (n - len(predictions)))
        self.predictions.pending.extend(predictions)
        self.calls.add(request, n)
        if self.calls.total - self.flushed >= _CHUNK_ROWS:
            self._flush()

    def _add_features(self, by_name: dict[str, Sequence[Any]], n: int) -> None:
        for name, column in self.columns.items():
            values = by_name.pop(name, None)
            column.pending.extend(values if values is not None else [None] * n)
        if self.fixed:
            return  # the other input keys are ignored
        for name, values in by_name.items():  # first seen in this call; metadata names are dropped
            if name not in _METADATA:
                self.columns[name] = _Column(
                    self.flushed, [None] * (self.calls.total - self.flushed) + list(values)
                )

    def _flush(self) -> None:
        for column in self.columns.values():
            column.flush(_scalar_column)
        self.predictions.flush(_inferred_column)
        self.flushed = self.calls.total

    def frame(self) -> pd.DataFrame:
        self._flush()
        data: dict[str, Any] = {name: column.series() for name, column in self.columns.items()}
        self.columns.clear()
        data["prediction"] = self.predictions.series()
        return self.calls.frame(data)


def _inferred_column(values: list[Any]) -> pd.Series:
    """``values`` with the dtype pandas infers (as ``pd.Series(values)`` would)."""
    return pd.Series(np.fromiter(values, dtype=object, count=len(values)), copy=False).infer_objects()


def _settled(column: pd.Series) -> pd.Series:
    """A whole column: one with no value at all is NaN (float64) rather than None (object)."""
    if column.dtype == object and pd.api.types.infer_dtype(column, skipna=True) == "empty":
        return column.astype("float64")
    return column


def _scalar_column(values: list[Any]) -> pd.Series:
    """A part of a feature column (see :func:`_inferred_column`); JSON objects and arrays become None,
    and repeated strings share one object."""
    column = _inferred_column(values)
    if column.dtype != object:
        return column
    kind = pd.api.types.infer_dtype(column, skipna=True)
    if kind == "string":
        # json.loads makes a new str per value: share one per distinct value (categorical features).
        codes, uniques = pd.factorize(column)
        if len(uniques) <= len(column) // 2:
            shared = np.asarray(uniques, dtype=object).take(codes)
            shared[codes == -1] = None
            return pd.Series(shared, copy=False)
    elif kind not in _SCALAR_KINDS:  # maybe a JSON object or array among the values
        nested = [index for index, value in enumerate(values) if value.__class__ in _NESTED]
        if nested:
            cleaned = list(values)
            for index in nested:
                cleaned[index] = None
            return _scalar_column(cleaned)
    return column


def _transpose(rows: list[Any], wanted: Iterable[str] | None) -> dict[str, Sequence[Any]]:
    """Input key -> the values of ``rows`` (JSON objects), None where a row lacks the key; only the
    ``wanted`` keys when given. Raises AttributeError or TypeError when a row is not a JSON object."""
    keys = tuple(rows[0].keys())
    if all(map(keys.__eq__, map(tuple, rows))):
        # The usual call: every row has the same keys in the same order; transpose in C.
        return dict(zip(keys, zip(*map(dict.values, rows), strict=False), strict=True))
    if not all(row.__class__ is dict for row in rows):
        raise TypeError("an input row is not a JSON object")
    names = dict.fromkeys(chain.from_iterable(rows)) if wanted is None else wanted
    return {name: [row.get(name) for row in rows] for name in names}


def _predictions(outputs: list[Any]) -> list[Any]:
    """:func:`_prediction_value` of every output, with a fast path for the two usual shapes."""
    if outputs:
        first = outputs[0]
        kind = first.__class__
        if kind is list and len(first) == 2:
            # Probability pairs: every output must be one for the fast path to apply.
            if all(output.__class__ is list and len(output) == 2 for output in outputs):
                return [output[1] for output in outputs]
        elif kind is float or kind is int:
            if all(output.__class__ is float or output.__class__ is int for output in outputs):
                return list(outputs)
    return [_prediction_value(output) for output in outputs]


# --- the fast reader of window() -----------------------------------------------------------------------

# Rows pyarrow parses at a time: ~10 MB of JSON text, held ~3 times (str, bytes, parser) while parsed;
# measured at 1M rows, 64k rows per batch had the lowest peak RSS (32k: +50 MB, glibc keeps freed memory).
_ARROW_BATCH_ROWS = 65_536
# Bytes of JSON text one pyarrow thread parses at a time.
_ARROW_BLOCK_BYTES = 1 << 20
# The largest integer an int64 holds, +1: pyarrow reads a bigger JSON integer as a float.
_INT64_LIMIT = 2.0**63

# What record() writes between two input rows (json.dumps' separators): the fast reader splits the rows
# of a call there, into one JSON object per line.
_ROW_SEPARATOR = "}, {"
# Characters of a flat output text besides the numbers: what is left of it must be one of the shapes.
_WHITESPACE = b" \t\r\n"
_NOT_STRUCTURE = bytes(set(range(256)) - set(b"[],"))
# What is left of a batch of rows without these: one "{" per line, nothing else.
_NOT_ROW_STRUCTURE = bytes(set(range(256)) - set(b"{[\n"))


class _NotUniform(Exception):
    """The fast reader cannot read this window exactly like the Python one; the Python one reads it."""


class _ArrowReader:
    """The columns of :meth:`PredictionLog.window` parsed by pyarrow, a batch of calls at a time.

    Input rows: each call's JSON array is split into one object per line where record() separates them
    (:data:`_ROW_SEPARATOR`), checked to be flat objects one per line (no "[", one "{" per line: a
    separator inside a string, a nested value or a row that is not an object fails the checks or the
    row count), and parsed as newline-delimited JSON. Predictions: outputs that are exactly n pairs or
    n scalars (checked on their brackets and commas; no string) become one JSON object per row. A column keeps one
    pyarrow array per batch; only null, bool, int64, double and string are accepted, which map exactly
    onto what pandas infers from ``json.loads``' values.
    """

    def __init__(self, features: list[str] | None) -> None:
        self.features = features
        self.columns: dict[str, list[Any]] = {name: [] for name in features or ()}
        self.predictions: list[Any] = []
        self.calls = _Calls()
        self.parsed = 0  # rows parsed
        self.rows: list[str] = []
        self.outputs: list[bytes] = []
        self.pairs: bool | None = None  # the output shape of every call so far
        self.pending = 0  # rows in self.rows
        self.schema: Any = None  # with features: their types in the first batch

    def add_call(self, call: Any) -> None:
        inputs, outputs = call.inputs, call.outputs
        if inputs == "[]":
            return  # no row, as in the Python reader
        if inputs[:2] != "[{" or inputs[-2:] != "}]":
            raise _NotUniform("inputs that are not an array of objects as record() writes them")
        body = inputs[1:-1]
        n = body.count(_ROW_SEPARATOR) + 1
        self.rows.append(body.replace(_ROW_SEPARATOR, "}\n{"))
        self.outputs.append(self._flat_outputs(outputs, n))
        self.calls.add(call, n)
        self.pending += n
        if self.pending >= _ARROW_BATCH_ROWS:
            self.parse()

    def _flat_outputs(self, outputs: str | None, n: int) -> bytes:
        """The call's predictions as JSON lines, one per row."""
        if outputs is None or '"' in outputs or "{" in outputs:
            raise _NotUniform("outputs that are not numbers")
        compact = outputs.encode().translate(None, _WHITESPACE)
        shape = compact.translate(None, _NOT_STRUCTURE)
        pairs = shape == b"[" + b",".join([b"[,]"] * n) + b"]"
        if not pairs and shape != b"[" + b"," * (n - 1) + b"]":
            raise _NotUniform("outputs of another shape or length")
        if self.pairs is None:
            self.pairs = pairs
        elif self.pairs != pairs:
            raise _NotUniform("outputs of mixed shapes")
        # One JSON object per prediction, parsed by pyarrow's strict JSON parser (no "+1", "0x10", "nan"):
        # {"p": scalar}, or {"a": p0, "p": p1}. With no string in the text, every comma is structural:
        # after the pairs' "],[" are set aside, the commas left are the ones inside a pair.
        if pairs:
            body = compact[2:-2].replace(b"],[", b"\x00").replace(b",", b',"p":')
            return b'{"a":' + body.replace(b"\x00", b'}\n{"a":') + b"}"
        return b'{"p":' + compact[1:-1].replace(b",", b'}\n{"p":') + b"}"

    def parse(self) -> None:
        """Parse the pending calls into one batch of every column."""
        if not self.pending:
            return
        import pyarrow as pa

        n = self.pending
        text = "\n".join(self.rows)
        self.rows.clear()
        data = text.encode()
        del text
        # Every line one flat object: it starts with "{" and holds no other "{" and no "[" (a "{" or "["
        # inside a string only costs the fast path); a line break in a row or a wrong split shows here
        # or in the row count.
        if data.translate(None, _NOT_ROW_STRUCTURE) != b"{" + b"\n{" * (n - 1):
            raise _NotUniform("rows")
        table = None
        if self.schema is not None:
            try:
                table = self._read(data, self.schema, ignore_others=len(self.schema) == len(self.columns))
            except pa.ArrowInvalid:  # a type changed (an int column got a float...): infer this batch
                table = None
        if table is None:
            table = self._read(data)
        if table.num_rows != n:
            raise _NotUniform("row count")
        names = table.column_names
        if self.features is None:
            names = self._first_seen(data, table)
            for name in names:
                if name not in _METADATA and name not in self.columns:
                    self.columns[name] = [pa.nulls(self.parsed)] if self.parsed else []
        dated = [name for name in self.columns if name in table.column_names and _is_dated(table[name].type)]
        if dated:
            # pyarrow reads ISO dates as timestamps; json.loads keeps them strings.
            table = self._read(data, pa.schema([(name, pa.string()) for name in dated]))
        del data
        for name, parts in self.columns.items():
            parts.append(_checked(table[name]) if name in table.column_names else pa.nulls(n))
        if self.features is not None and self.schema is None:
            # The next batches are parsed with these types (faster than inferring them): a value of
            # another type fails that parse, and the batch is inferred instead.
            self.schema = pa.schema(
                [(name, parts[-1].type) for name, parts in self.columns.items() if parts[-1].type in _typed()]
            )
        del table
        self.predictions.append(self._predictions(b"\n".join(self.outputs), n))
        self.outputs.clear()
        self.parsed += n
        self.pending = 0
        _release_arrow_memory()

    def _predictions(self, text: bytes, n: int) -> Any:
        table = self._read(text)
        if table.num_rows != n or "p" not in table.column_names:
            raise _NotUniform("prediction count")
        return _checked(table["p"])

    @staticmethod
    def _read(data: bytes, schema: Any = None, *, ignore_others: bool = False) -> Any:
        import pyarrow as pa
        import pyarrow.json as pj

        options = None
        if schema is not None:
            others = "ignore" if ignore_others else "infer"
            options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior=others)
        blocks = pj.ReadOptions(block_size=_ARROW_BLOCK_BYTES)
        table = pj.read_json(
            pa.BufferReader(data), read_options=blocks, parse_options=options, memory_pool=_arrow_pool()
        )
        # pyarrow 25 can build an inconsistent list (a leading null in [null, 1], [null, 0.5] is lost when
        # the type widens): refuse it (ArrowInvalid) rather than read shifted predictions.
        table.validate(full=True)
        return table

    def _first_seen(self, data: bytes, table: Any) -> list[str]:
        """The table's columns in first-seen order: the order of the Python reader. pyarrow's own order
        is that only when it parsed the batch in one block, so unless the first row has every key, the
        batch is parsed again in one block."""
        try:
            first = json.loads(data[: data.find(b"\n")] if b"\n" in data else data)
        except ValueError as error:  # pyarrow read it, json.loads does not: the Python reader says why
            raise _NotUniform("a row json.loads refuses") from error
        if set(first) == set(table.column_names):
            return list(first)
        import io

        import pyarrow.json as pj

        whole = pj.ReadOptions(use_threads=False, block_size=len(data) + 1)
        return pj.read_json(io.BytesIO(data), read_options=whole).column_names

    def frame(self) -> pd.DataFrame:
        data: dict[str, Any] = {}
        for name in list(self.columns):
            data[name] = _pandas_column(self.columns.pop(name), self.calls.total)
            _release_arrow_memory()
        data["prediction"] = _pandas_column(self.predictions, self.calls.total)
        self.predictions = []
        return self.calls.frame(data)


def _release_arrow_memory() -> None:
    """Give what pyarrow freed back to the system: numpy (malloc) cannot reuse pyarrow's pool, so the
    memory a parsed batch or a converted column held would otherwise add to the peak."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _arrow_pool() -> Any:
    """The C allocator: pyarrow's default pool keeps what a batch freed, which then adds to the peak."""
    import pyarrow as pa

    return pa.system_memory_pool()


def _typed() -> frozenset[Any]:
    import pyarrow as pa

    return frozenset({pa.bool_(), pa.int64(), pa.float64(), pa.string()})


def _is_dated(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_timestamp(kind) or pa.types.is_date(kind) or pa.types.is_time(kind)


def _checked(column: Any) -> Any:
    """One batch of a column as a single array, if its type is one the Python reader agrees on."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = array.type
    if pa.types.is_floating(kind):
        # A JSON integer beyond int64 is a float to pyarrow but an int to json.loads.
        extreme = pc.max(pc.abs(pc.if_else(pc.is_finite(array), array, 0.0))).as_py()
        if extreme is not None and extreme >= _INT64_LIMIT:
            raise _NotUniform("a number beyond int64")
    elif not (
        pa.types.is_null(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_int64(kind)
        or pa.types.is_string(kind)
    ):
        raise _NotUniform(f"a column of {kind}")
    return array


def _pandas_column(parts: list[Any], total: int) -> pd.Series:
    """The batches of one column as the Series the Python reader makes of the same values."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kinds = {part.type for part in parts if not pa.types.is_null(part.type)}
    if not kinds:
        return pd.Series(np.full(total, np.nan), copy=False)
    nulls = sum(part.null_count for part in parts)
    if kinds <= {pa.int64(), pa.float64()}:
        if kinds == {pa.int64()} and not nulls:
            return pd.Series(pa.chunked_array(parts, pa.int64()).to_numpy(), copy=False)
        # ints with floats or missing values: float64, as pandas makes of them (int64 -> float64 rounds
        # to nearest like float(int)).
        values = pa.chunked_array([pc.cast(part, pa.float64(), safe=False) for part in parts], pa.float64())
        return pd.Series(values.to_numpy(), copy=False)
    if kinds == {pa.bool_()}:
        values = pa.chunked_array([pc.cast(part, pa.bool_()) for part in parts], pa.bool_())
        if not nulls:
            return pd.Series(values.to_numpy(), copy=False)
        return pd.Series(np.asarray(values.to_pylist(), dtype=object), copy=False)  # True/False/None
    if kinds == {pa.string()}:
        values = pa.chunked_array([pc.cast(part, pa.string()) for part in parts], pa.string())
        # One str object per distinct value, as the Python reader shares categorical values.
        encoded = values.combine_chunks().dictionary_encode()
        uniques = np.asarray([*encoded.dictionary.to_pylist(), None], dtype=object)
        codes = encoded.indices.fill_null(len(uniques) - 1).to_numpy()
        return pd.Series(uniques.take(codes), copy=False)
    raise _NotUniform("values of mixed types in a column")
