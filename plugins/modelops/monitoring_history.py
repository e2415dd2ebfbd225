"""The monitoring history: one row per model, version and assessed window.

Drift monitoring writes a row for every window it assesses (its verdict, the number of rows and a few
metrics); dashboards, trend checks and the retraining logic read them back. The same key written
again (a backfill or a retry) replaces the row. SQLAlchemy Core keeps the code the same on SQLite and
PostgreSQL; datetimes are timezone-aware UTC (naive ones are refused). Imports no Airflow.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from modelops import db
from modelops.serving.prediction_log import UTCDateTime, dialect_insert

HISTORY_TABLE = "modelops_monitoring_history"

metadata = sa.MetaData()

history_table = sa.Table(
    HISTORY_TABLE,
    metadata,
    sa.Column("model_name", sa.String(256), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("window_start", UTCDateTime(), nullable=False),
    sa.Column("window_end", UTCDateTime(), nullable=False),
    sa.Column("verdict", sa.String(64), nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("assessed_at", UTCDateTime(), nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),
    sa.Column("report_sha256", sa.String(64), nullable=True),
    sa.Column("details", sa.Text, nullable=True),
    sa.PrimaryKeyConstraint(
        "model_name", "model_version", "window_start", "window_end", name="pk_modelops_monitoring_history"
    ),
    sa.Index("ix_modelops_monitoring_history_model_end", "model_name", "window_end"),
)


def _require_aware(what: str, value: datetime) -> None:
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{what}={value.isoformat()} is a naive datetime; the monitoring history stores UTC instants, "
            "so pass a timezone-aware one (e.g. datetime(2026, 1, 1, tzinfo=UTC))"
        )


@dataclass(frozen=True)
class HistoryRow:
    """One assessed window of one model version.

    ``metrics`` maps names (``drift_share``, ``business_metric``, ``baseline``, ``label_coverage``,
    ``error_rate``, ``latency_p95_ms``...) to floats or None; NaN and infinities are stored as None.
    ``details`` is any JSON object. Datetimes must be timezone-aware.
    """

    model_name: str
    model_version: str
    window_start: datetime
    window_end: datetime
    verdict: str
    rows: int
    assessed_at: datetime
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    report_sha256: str | None = None
    details: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for what in ("window_start", "window_end", "assessed_at"):
            _require_aware(what, getattr(self, what))
        if self.window_end <= self.window_start:
            raise ValueError(
                f"window_end {self.window_end.isoformat()} is not after window_start "
                f"{self.window_start.isoformat()}"
            )
        if not isinstance(self.metrics, Mapping):
            raise TypeError(
                f"metrics must be a mapping of names to numbers, not {type(self.metrics).__name__}"
            )
        for name, value in self.metrics.items():
            if not isinstance(name, str):
                raise TypeError(f"metric names must be strings, not {name!r}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise TypeError(f"metric {name!r} must be a number or None, not {value!r}")
        if self.details is not None and not isinstance(self.details, Mapping):
            raise TypeError(f"details must be a mapping or None, not {type(self.details).__name__}")


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys and no spaces; NaN and infinities become null."""
    return json.dumps(_finite(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _finite(value.item())
    return value


def _metrics(value: Mapping[str, Any]) -> dict[str, float | None]:
    return {name: None if item is None else float(item) for name, item in _finite(value).items()}


class MonitoringHistory:
    """Read and write the monitoring history at a SQLAlchemy URL; creates its table if absent."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = db.create_engine(url, what="the monitoring history")
        try:
            metadata.create_all(self.engine)
        except (sa.exc.OperationalError, sa.exc.ProgrammingError) as exc:
            # Two monitoring tasks (one per model) may both find the table missing and both create it:
            # the loser's CREATE fails with "already exists". Looking again then finds the table.
            if "already exists" not in str(exc.orig):
                raise
            metadata.create_all(self.engine)

    def __repr__(self) -> str:
        return f"MonitoringHistory({db.safe_url(self.url)!r})"

    def upsert(self, row: HistoryRow) -> None:
        """Store ``row``; a row with the same model, version and window is replaced."""
        values = {
            "model_name": row.model_name,
            "model_version": row.model_version,
            "window_start": row.window_start,
            "window_end": row.window_end,
            "verdict": row.verdict,
            "rows": int(row.rows),
            "assessed_at": row.assessed_at,
            "metrics": canonical_json(_metrics(row.metrics)),
            "report_sha256": row.report_sha256,
            "details": None if row.details is None else canonical_json(row.details),
        }
        key = ["model_name", "model_version", "window_start", "window_end"]
        with self.engine.begin() as conn:
            insert = dialect_insert(
                conn.dialect.name, what="the monitoring history", hint="use a SQLite or PostgreSQL URL"
            )(history_table).values(values)
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=key,
                    set_={name: insert.excluded[name] for name in values if name not in key},
                )
            )

    def rows(
        self,
        model_name: str,
        *,
        version: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[HistoryRow]:
        """Rows of ``model_name`` (of one ``version`` if given), oldest window first; ``since`` keeps
        windows starting at or after it, ``until`` windows ending at or before it."""
        table = history_table
        query = sa.select(table).where(table.c.model_name == model_name)
        if version is not None:
            query = query.where(table.c.model_version == version)
        if since is not None:
            _require_aware("since", since)
            query = query.where(table.c.window_start >= since)
        if until is not None:
            _require_aware("until", until)
            query = query.where(table.c.window_end <= until)
        query = query.order_by(table.c.window_start, table.c.window_end, table.c.model_version)
        with self.engine.connect() as conn:
            return [_history_row(row) for row in conn.execute(query)]

    def last(
        self,
        model_name: str,
        *,
        before: datetime | None = None,
        verdicts: set[str] | None = None,
    ) -> HistoryRow | None:
        """The row of ``model_name`` with the newest window ending at or before ``before`` (any time if
        None) and, if given, a verdict in ``verdicts``; None when there is none. Between rows ending at
        the same time, the one assessed last wins."""
        table = history_table
        query = sa.select(table).where(table.c.model_name == model_name)
        if before is not None:
            _require_aware("before", before)
            query = query.where(table.c.window_end <= before)
        if verdicts is not None:
            if isinstance(verdicts, str):
                raise TypeError(f"verdicts must be a set of verdicts, not the string {verdicts!r}")
            if not verdicts:
                return None
            query = query.where(table.c.verdict.in_(sorted(verdicts)))
        query = query.order_by(
            table.c.window_end.desc(),
            table.c.window_start.desc(),
            table.c.assessed_at.desc(),
            table.c.model_version.desc(),
        ).limit(1)
        with self.engine.connect() as conn:
            row = conn.execute(query).one_or_none()
        return None if row is None else _history_row(row)

    def dispose(self) -> None:
        self.engine.dispose()


def _history_row(row: Any) -> HistoryRow:
    return HistoryRow(
        model_name=row.model_name,
        model_version=row.model_version,
        window_start=row.window_start,
        window_end=row.window_end,
        verdict=row.verdict,
        rows=row.rows,
        assessed_at=row.assessed_at,
        metrics=json.loads(row.metrics),
        report_sha256=row.report_sha256,
        details=None if row.details is None else json.loads(row.details),
    )
