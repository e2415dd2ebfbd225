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

PREDICTIONS_TABLE = "modelops_predictions"
LABELS_TABLE = "modelops_labels"

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


class PredictionLog:
    """Read and write the prediction log at a SQLAlchemy URL; creates its tables if absent."""

    def __init__(self, url: str) -> None:
        self.url = url
        # The gateway writes while Airflow tasks read: on SQLite the engine uses WAL (readers proceed
        # during a write) and a busy timeout (a second writer waits instead of failing).
        self.engine: Engine = db.create_engine(url, what="the prediction log")
        metadata.create_all(self.engine)

    def __repr__(self) -> str:
        return f"PredictionLog({db.safe_url(self.url)!r})"

    # --- writing ---------------------------------------------------------------------------------

    def record(self, entry: PredictionRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                predictions_table.insert().values(
                    request_id=entry.request_id,
                    received_at=entry.received_at,
                    caller_id=entry.caller_id,
                    model_name=entry.model_name,
                    model_version=entry.model_version,
                    status_code=entry.status_code,
                    latency_ms=float(entry.latency_ms),
                    n_rows=int(entry.n_rows),
                    inputs=_to_json(entry.inputs),
                    outputs=None if entry.outputs is None else _to_json(entry.outputs),
                    error=entry.error,
                )
            )

    def add_labels(self, request_id: str, labels: Sequence[int]) -> int:
        """Store ground truth for every row of a request; redelivery overwrites, never duplicates.

        Returns the number of labels stored. Raises :class:`UnknownRequestError` for an unknown
        request id and :class:`LabelCountMismatch` when ``labels`` does not have one per scored row.
        """
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(predictions_table.c.n_rows, predictions_table.c.status_code).where(
                    predictions_table.c.request_id == request_id
                )
            ).one_or_none()
            if row is None:
                raise UnknownRequestError(
                    f"request id {request_id!r} is not in the prediction log; send labels with the "
                    "X-Request-Id returned by the scoring call"
                )
            if len(labels) != row.n_rows:
                raise LabelCountMismatch(
                    f"request {request_id!r} scored {row.n_rows} row(s) but {len(labels)} label(s) were "
                    "sent; send exactly one label per scored row, in request order"
                )
            if not labels:
                return 0
            now = datetime.now(UTC)
            values = [
                {"request_id": request_id, "row_index": index, "label": int(label), "labelled_at": now}
                for index, label in enumerate(labels)
            ]
            insert = _dialect_insert(conn.dialect.name)(labels_table).values(values)
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=["request_id", "row_index"],
                    set_={"label": insert.excluded.label, "labelled_at": insert.excluded.labelled_at},
                )
            )
        return len(values)

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
        single feature ``input``. Column dtypes are what pandas infers from the values. The JSON of each call is
        parsed and turned into per-column lists one call at a time, so the read holds the columns being
        built, never every call's JSON text nor a dict per row.
        """
        builder = _WindowBuilder(features)
        table = predictions_table
        requests = (
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
        labels = (
            sa.select(labels_table.c.request_id, labels_table.c.row_index, labels_table.c.label)
            .join(table, table.c.request_id == labels_table.c.request_id)
            .where(self._successful_in_window(model_name, start, end))
            .execution_options(yield_per=_FETCH_BATCH)
        )
        with self.engine.connect() as conn:
            for batch in conn.execute(requests).partitions():
                for request in batch:
                    builder.add_request(request)
            builder.add_labels(chain.from_iterable(conn.execute(labels).partitions()))
        return builder.frame()

    def request_stats(self, model_name: str, start: datetime, end: datetime) -> RequestStats:
        """Counts, error rate and latency percentiles of every call (successful or failed) to
        ``model_name`` with ``start <= received_at < end``.

        A call failed when its status is >= 400 or it has an error. Percentiles are numpy's (method
        ``linear``) over every call's latency. An empty window has zero counts and None elsewhere.
        """
        table = predictions_table
        query = sa.select(table.c.status_code, table.c.latency_ms, table.c.error.is_not(None)).where(
            self._in_window(model_name, start, end)
        )
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

    def dispose(self) -> None:
        self.engine.dispose()


def _dialect_insert(dialect_name: str, *, what: str = "the prediction log", hint: str | None = None) -> Any:
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


class _WindowBuilder:
    """The columns of :meth:`PredictionLog.window`, built one call at a time.

    Features and predictions go to one list per column (padded with None where a call did not send a
    feature), converted to typed arrays every :data:`_CHUNK_ROWS` rows so that the Python objects the
    JSON parser made do not pile up; what is the same for every row of a call (request id, caller,
    version, time) is kept once per call and repeated with numpy at the end.
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
        self.request_ids: list[str] = []
        self.received: list[datetime] = []
        self.callers: list[str] = []
        self.versions: list[str | None] = []
        self.counts: list[int] = []
        self.offsets: dict[str, int] = {}
        self.total = 0  # rows added
        self.flushed = 0  # rows converted
        self.labels: np.ndarray | None = None

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
        self.offsets[request.request_id] = self.total
        self.request_ids.append(request.request_id)
        self.received.append(request.received_at)
        self.callers.append(request.caller_id)
        self.versions.append(request.model_version)
        self.counts.append(n)
        self.total += n
        if self.total - self.flushed >= _CHUNK_ROWS:
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
                    self.flushed, [None] * (self.total - self.flushed) + list(values)
                )

    def _flush(self) -> None:
        for column in self.columns.values():
            column.flush(_scalar_column)
        self.predictions.flush(_inferred_column)
        self.flushed = self.total

    def add_labels(self, labels: Iterable[Any]) -> None:
        self.labels = np.full(self.total, np.nan, dtype="float64")
        count_of = dict(zip(self.request_ids, self.counts, strict=True))
        for request_id, row_index, label in labels:
            offset = self.offsets.get(request_id)
            if offset is not None and 0 <= row_index < count_of[request_id]:
                self.labels[offset + row_index] = label

    def frame(self) -> pd.DataFrame:
        self._flush()
        counts = np.asarray(self.counts, dtype="int64")
        data: dict[str, Any] = {name: column.series() for name, column in self.columns.items()}
        self.columns.clear()
        data["prediction"] = self.predictions.series()
        data["request_id"] = np.repeat(np.asarray(self.request_ids, dtype=object), counts)
        starts = np.cumsum(counts) - counts
        data["row_index"] = np.arange(self.total, dtype="int64") - np.repeat(starts, counts)
        received = pd.to_datetime(pd.Series(self.received, dtype=object), utc=True)
        data["received_at"] = pd.DatetimeIndex(received).as_unit("ns").repeat(counts)
        data["caller_id"] = np.repeat(np.asarray(self.callers, dtype=object), counts)
        data["model_version"] = np.repeat(np.asarray(self.versions, dtype=object), counts)
        data["label"] = self.labels if self.labels is not None else np.full(self.total, np.nan)
        return pd.DataFrame(data, copy=False)


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
