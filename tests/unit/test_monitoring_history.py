"""The monitoring history on SQLite and PostgreSQL: upserts, ordering, filters, JSON round trips."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from modelops.errors import ConfigurationError
from modelops.monitoring_history import HistoryRow, MonitoringHistory, canonical_json

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest.fixture(params=["sqlite", "postgresql"])
def history(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MonitoringHistory]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/nested/history.db"
    else:
        url = request.getfixturevalue("postgres_url")
    store = MonitoringHistory(url)
    yield store
    store.dispose()


def make_row(
    hour: int,
    *,
    model: str = "ctr",
    version: str = "1",
    verdict: str = "ok",
    rows: int = 100,
    **changes: object,
) -> HistoryRow:
    start = T0 + hour * HOUR
    row = HistoryRow(
        model_name=model,
        model_version=version,
        window_start=start,
        window_end=start + HOUR,
        verdict=verdict,
        rows=rows,
        assessed_at=start + HOUR + timedelta(minutes=5),
        metrics={"drift_share": 0.25, "error_rate": 0.0, "latency_p95_ms": 12.5, "label_coverage": None},
        report_sha256="ab" * 32,
        details={"drifted_features": ["user_age"], "reasons": []},
    )
    return replace(row, **changes) if changes else row


def test_rows_round_trip_and_come_back_oldest_first(history: MonitoringHistory) -> None:
    later, earlier, other_model = make_row(2), make_row(0), make_row(1, model="other")
    for row in (later, earlier, other_model):
        history.upsert(row)
    assert history.rows("ctr") == [earlier, later]
    assert history.rows("other") == [other_model]
    assert history.rows("nobody") == []
    back = history.rows("ctr")[0]
    assert back.window_start == T0 and back.window_start.tzinfo is not None
    assert back.window_start.utcoffset() == timedelta(0)
    assert back.metrics == {
        "drift_share": 0.25,
        "error_rate": 0.0,
        "latency_p95_ms": 12.5,
        "label_coverage": None,
    }
    assert back.details == {"drifted_features": ["user_age"], "reasons": []}


def test_the_same_key_again_replaces_the_row(history: MonitoringHistory) -> None:
    first = make_row(0)
    history.upsert(first)
    history.upsert(first)
    assert history.rows("ctr") == [first]
    retried = replace(first, verdict="critical", rows=120, metrics={"drift_share": 0.9}, details=None)
    history.upsert(retried)
    assert history.rows("ctr") == [retried]
    # Another version of the same window is another row.
    history.upsert(replace(first, model_version="2"))
    assert [row.model_version for row in history.rows("ctr")] == ["1", "2"]


def test_the_same_row_is_stored_byte_identically(history: MonitoringHistory) -> None:
    row = make_row(0, metrics={"b": 1.0, "a": 2.0}, details={"z": {"y": 1, "x": [1, 2]}, "a": None})
    history.upsert(row)
    with history.engine.connect() as conn:
        first = conn.exec_driver_sql("SELECT metrics, details FROM modelops_monitoring_history").one()
    history.upsert(
        replace(row, metrics={"a": 2.0, "b": 1.0}, details={"a": None, "z": {"x": [1, 2], "y": 1}})
    )
    with history.engine.connect() as conn:
        second = conn.exec_driver_sql("SELECT metrics, details FROM modelops_monitoring_history").one()
    assert tuple(first) == tuple(second) == ('{"a":2.0,"b":1.0}', '{"a":null,"z":{"x":[1,2],"y":1}}')


def test_nan_and_infinities_are_stored_as_null(history: MonitoringHistory) -> None:
    history.upsert(
        make_row(
            0,
            metrics={"drift_share": float("nan"), "baseline": float("inf"), "n": 3},
            details={"x": -math_inf()},
        )
    )
    (row,) = history.rows("ctr")
    assert row.metrics == {"baseline": None, "drift_share": None, "n": 3.0}
    assert row.details == {"x": None}


def math_inf() -> float:
    return float("inf")


def test_filters_by_version_and_time(history: MonitoringHistory) -> None:
    for hour, version in ((0, "1"), (1, "1"), (2, "2"), (3, "2")):
        history.upsert(make_row(hour, version=version))
    assert [row.window_start for row in history.rows("ctr", version="2")] == [T0 + 2 * HOUR, T0 + 3 * HOUR]
    assert [row.window_start for row in history.rows("ctr", since=T0 + HOUR)] == [
        T0 + HOUR,
        T0 + 2 * HOUR,
        T0 + 3 * HOUR,
    ]
    # until keeps windows that end at or before it.
    assert [row.window_start for row in history.rows("ctr", until=T0 + 2 * HOUR)] == [T0, T0 + HOUR]
    assert history.rows("ctr", version="1", since=T0 + HOUR, until=T0 + 2 * HOUR) == [make_row(1)]
    # Another time zone means the same instant.
    plus_two = timezone(timedelta(hours=2))
    assert history.rows("ctr", since=(T0 + 3 * HOUR).astimezone(plus_two)) == [make_row(3, version="2")]


def test_last_is_the_newest_window_before_a_time_with_a_verdict(history: MonitoringHistory) -> None:
    assert history.last("ctr") is None
    for hour, verdict in ((0, "ok"), (1, "critical"), (2, "warning"), (3, "ok")):
        history.upsert(make_row(hour, verdict=verdict))
    assert history.last("ctr") == make_row(3)
    assert history.last("ctr", before=T0 + 3 * HOUR) == make_row(2, verdict="warning")
    assert history.last("ctr", before=T0 + 3 * HOUR - timedelta(seconds=1)) == make_row(1, verdict="critical")
    assert history.last("ctr", verdicts={"critical", "warning"}) == make_row(2, verdict="warning")
    assert history.last("ctr", before=T0 + 2 * HOUR, verdicts={"warning"}) is None
    assert history.last("ctr", verdicts=set()) is None
    assert history.last("ctr", before=T0) is None
    assert history.last("other") is None


def test_naive_datetimes_are_refused(history: MonitoringHistory) -> None:
    naive = datetime(2026, 3, 1, 12, 0)
    with pytest.raises(ValueError, match="window_start=2026-03-01T12:00:00 is a naive datetime"):
        make_row(0, window_start=naive)
    with pytest.raises(ValueError, match="assessed_at=.* naive datetime"):
        make_row(0, assessed_at=naive)
    for name in ("since", "until"):
        with pytest.raises(ValueError, match=f"{name}=.* naive datetime.*timezone-aware"):
            history.rows("ctr", **{name: naive})
    with pytest.raises(ValueError, match="before=.* naive datetime"):
        history.last("ctr", before=naive)


def test_rows_are_checked_when_made() -> None:
    with pytest.raises(ValueError, match="not after window_start"):
        make_row(0, window_end=T0)
    with pytest.raises(TypeError, match="metric 'drift_share' must be a number"):
        make_row(0, metrics={"drift_share": "high"})
    with pytest.raises(TypeError, match="details must be a mapping"):
        make_row(0, details=["x"])


def test_canonical_json() -> None:
    import numpy as np

    assert (
        canonical_json({"b": np.float64(0.5), "a": [np.int64(1), float("nan")]}) == '{"a":[1,null],"b":0.5}'
    )


def test_reopening_keeps_rows_and_bad_urls_are_configuration_errors(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/history.db"
    first = MonitoringHistory(url)
    first.upsert(make_row(0))
    first.dispose()
    second = MonitoringHistory(url)
    assert second.rows("ctr") == [make_row(0)]
    assert repr(second) == f"MonitoringHistory('{url}')"
    second.dispose()
    with pytest.raises(ConfigurationError, match="cannot open the monitoring history"):
        MonitoringHistory("nosuchdb://u:secret@h/x")


def test_imports_no_airflow() -> None:
    code = (
        "import sys, modelops.monitoring_history; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
