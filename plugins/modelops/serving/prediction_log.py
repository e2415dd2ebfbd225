"""The prediction log: every scoring call the gateway answers, and the ground truth delivered later.

The gateway writes one row per call (success or failure) to ``modelops_predictions``; late labels go
to ``modelops_labels``, one row per scored input row. Airflow tasks (monitoring, retraining) read
windows of it back as one DataFrame row per scored input row. SQLAlchemy Core keeps the code the same
on SQLite (the embedded default) and PostgreSQL (production).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Dialect, Engine

from modelops import db
from modelops.errors import ConfigurationError, ModelOpsError

PREDICTIONS_TABLE = "modelops_predictions"
LABELS_TABLE = "modelops_labels"

# Columns window() adds after the input features; a feature with one of these names would be shadowed.
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

    def _successful_in_window(self, model_name: str, start: datetime, end: datetime) -> sa.ColumnElement:
        for name, value in (("start", start), ("end", end)):
            if value.tzinfo is None:
                raise ValueError(
                    f"{name}={value.isoformat()} is a naive datetime; pass a timezone-aware one "
                    "(e.g. datetime(2026, 1, 1, tzinfo=UTC))"
                )
        table = predictions_table
        return sa.and_(
            table.c.model_name == model_name,
            table.c.received_at >= start,
            table.c.received_at < end,
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

    def window(self, model_name: str, start: datetime, end: datetime) -> pd.DataFrame:
        """One row per scored input row of successful calls with ``start <= received_at < end``.

        Columns: the input features, then ``prediction`` (p1 for a ``[p0, p1]`` output),
        ``request_id``, ``row_index``, ``received_at`` (UTC), ``caller_id``, ``model_version`` and
        ``label`` (NaN until delivered).
        """
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
        )
        labels = (
            sa.select(labels_table.c.request_id, labels_table.c.row_index, labels_table.c.label)
            .join(table, table.c.request_id == labels_table.c.request_id)
            .where(self._successful_in_window(model_name, start, end))
        )
        with self.engine.connect() as conn:
            request_rows = conn.execute(requests).all()
            label_of = {(r.request_id, r.row_index): r.label for r in conn.execute(labels)}

        records: list[dict[str, Any]] = []
        features: dict[str, None] = {}  # ordered set: first-seen order of the feature columns
        for request in request_rows:
            inputs = json.loads(request.inputs)
            outputs = json.loads(request.outputs) if request.outputs is not None else []
            for index, row in enumerate(inputs):
                features_of_row = row if isinstance(row, dict) else {"input": row}
                features.update(dict.fromkeys(features_of_row))
                label = label_of.get((request.request_id, index))
                records.append(
                    {
                        **features_of_row,
                        "prediction": _prediction_value(outputs[index]) if index < len(outputs) else None,
                        "request_id": request.request_id,
                        "row_index": index,
                        "received_at": request.received_at,
                        "caller_id": request.caller_id,
                        "model_version": request.model_version,
                        "label": float("nan") if label is None else label,
                    }
                )
        frame = pd.DataFrame.from_records(records, columns=[*features, *WINDOW_COLUMNS])
        frame["received_at"] = pd.to_datetime(frame["received_at"], utc=True)
        frame["label"] = frame["label"].astype("float64")
        frame["row_index"] = frame["row_index"].astype("int64")
        return frame

    def dispose(self) -> None:
        self.engine.dispose()


def _dialect_insert(dialect_name: str) -> Any:
    # ON CONFLICT is spelled the same on SQLite and PostgreSQL, but SQLAlchemy exposes it per dialect.
    if dialect_name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise ConfigurationError(
            f"the prediction log supports SQLite and PostgreSQL, not {dialect_name!r}; "
            "point MODELOPS_PREDICTIONS_URL / the modelops_predictions connection at one of them"
        )
    return insert
