"""The traffic simulator against a tiny real gateway (FastAPI + uvicorn on a free local port)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from modelops.data.synthetic import STRONG_DRIFT
from modelops.data.traffic import (
    FEATURE_COLUMNS,
    GatewayUnreachable,
    deliver_labels,
    main,
    simulate_traffic,
)
from tests.support import free_port, serve_in_thread

FAILING_CALLER = "broken-caller"


@dataclass
class GatewayLog:
    """What the fake gateway received."""

    callers: list[str] = field(default_factory=list)
    columns: list[list[str]] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    rows_by_request: dict[str, int] = field(default_factory=dict)
    labels: dict[str, list[int]] = field(default_factory=dict)

    def clear(self) -> None:
        self.callers.clear()
        self.columns.clear()
        self.rows.clear()
        self.rows_by_request.clear()
        self.labels.clear()


def _gateway_app(log: GatewayLog) -> FastAPI:
    """The scoring gateway contract: /invocations (dataframe_split) and /labels."""
    app = FastAPI()

    @app.post("/invocations")
    async def invocations(request: Request) -> JSONResponse:
        caller = request.headers.get("X-Caller-Id", "")
        log.callers.append(caller)
        if caller == FAILING_CALLER:
            return JSONResponse(
                {"error_code": "PERMISSION_DENIED", "message": f"caller {caller!r} is not allowed"},
                status_code=403,
            )
        body = await request.json()
        split = body["dataframe_split"]
        log.columns.append(split["columns"])
        log.rows.extend(split["data"])
        request_id = uuid.uuid4().hex
        log.rows_by_request[request_id] = len(split["data"])
        return JSONResponse({"predictions": [0.1] * len(split["data"])}, headers={"X-Request-Id": request_id})

    @app.post("/labels")
    async def labels(request: Request) -> JSONResponse:
        body = await request.json()
        request_id, labels = body["request_id"], body["labels"]
        if request_id not in log.rows_by_request:
            return JSONResponse(
                {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"unknown request {request_id}"},
                status_code=404,
            )
        if len(labels) != log.rows_by_request[request_id]:
            return JSONResponse(
                {"error_code": "INVALID_PARAMETER_VALUE", "message": "count"}, status_code=422
            )
        log.labels[request_id] = labels
        return JSONResponse({"request_id": request_id, "accepted": len(labels)})

    return app


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[str, GatewayLog]]:
    log = GatewayLog()
    with serve_in_thread(_gateway_app(log), lifespan="off") as url:
        yield url, log


@pytest.fixture
def gateway_url(gateway: tuple[str, GatewayLog]) -> str:
    gateway[1].clear()
    return gateway[0]


@pytest.fixture
def gateway_log(gateway: tuple[str, GatewayLog]) -> GatewayLog:
    return gateway[1]


def test_requests_rows_callers_and_request_ids(gateway_url: str, gateway_log: GatewayLog) -> None:
    report = simulate_traffic(gateway_url, requests=6, rows_per_request=4)
    assert (report.requests_sent, report.ok, report.failed, report.rows_scored) == (6, 6, 0, 24)
    assert gateway_log.callers == ["web-shop", "mobile-app", "email-campaign"] * 2
    assert report.requests_by_caller == {"web-shop": 2, "mobile-app": 2, "email-campaign": 2}
    assert report.request_ids == list(gateway_log.rows_by_request)
    assert set(report.pending_labels) == set(report.request_ids)
    assert all(len(labels) == 4 and set(labels) <= {0, 1} for labels in report.pending_labels.values())
    assert report.errors == []
    assert 0 < report.latencies_ms["p50"] <= report.latencies_ms["p95"]
    # Only the model's features travel: no user id, no label.
    assert all(columns == list(FEATURE_COLUMNS) for columns in gateway_log.columns)
    assert len(gateway_log.rows) == 24 and all(len(row) == len(FEATURE_COLUMNS) for row in gateway_log.rows)


def test_same_seed_sends_the_same_rows(gateway_url: str, gateway_log: GatewayLog) -> None:
    first = simulate_traffic(gateway_url, requests=2, rows_per_request=3, seed=5)
    rows = list(gateway_log.rows)
    gateway_log.clear()
    second = simulate_traffic(gateway_url, requests=2, rows_per_request=3, seed=5)
    assert gateway_log.rows == rows
    assert list(first.pending_labels.values()) == list(second.pending_labels.values())


def test_failed_request_is_counted_and_the_run_goes_on(gateway_url: str, gateway_log: GatewayLog) -> None:
    report = simulate_traffic(
        gateway_url, requests=5, rows_per_request=2, callers=("web-shop", FAILING_CALLER)
    )
    assert (report.requests_sent, report.ok, report.failed, report.rows_scored) == (5, 3, 2, 6)
    assert len(report.request_ids) == 3
    assert len(report.errors) == 2
    assert "403" in report.errors[0] and "PERMISSION_DENIED" in report.errors[0]
    assert gateway_log.callers.count(FAILING_CALLER) == 2


def test_labels_are_delivered(gateway_url: str, gateway_log: GatewayLog) -> None:
    report = simulate_traffic(gateway_url, requests=4, rows_per_request=3)
    assert deliver_labels(gateway_url, report.pending_labels) == 12
    assert gateway_log.labels == report.pending_labels


def test_rejected_label_delivery_is_skipped(gateway_url: str) -> None:
    report = simulate_traffic(gateway_url, requests=2, rows_per_request=3)
    pending = {**report.pending_labels, "never-scored": [1, 0, 1]}
    assert deliver_labels(gateway_url, pending) == 6


def test_unreachable_gateway_raises_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(GatewayUnreachable, match="unreachable") as info:
        simulate_traffic(url, requests=3, timeout=2.0)
    assert isinstance(info.value, ConnectionError)
    with httpx.Client(timeout=2.0) as client, pytest.raises(GatewayUnreachable):
        deliver_labels(url, {"abc": [1]}, client=client)


def test_drift_run_sends_out_of_range_ages(gateway_url: str, gateway_log: GatewayLog) -> None:
    report = simulate_traffic(gateway_url, requests=20, rows_per_request=5, shift=STRONG_DRIFT)
    assert report.ok == 20
    ages = [row[FEATURE_COLUMNS.index("user_age")] for row in gateway_log.rows]
    assert ages.count(100) >= 5
    drift_ages = list(ages)
    gateway_log.clear()
    simulate_traffic(gateway_url, requests=20, rows_per_request=5)
    ages = [row[FEATURE_COLUMNS.index("user_age")] for row in gateway_log.rows]
    assert max(ages) <= 75 < max(drift_ages)


def test_cli_prints_a_json_summary(
    gateway_url: str, gateway_log: GatewayLog, capsys: pytest.CaptureFixture[str]
) -> None:
    exit_code = main(
        ["--url", gateway_url, "--requests", "6", "--rows-per-request", "2", "--drift", "--deliver-labels"]
    )
    assert exit_code == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["requests_sent"] == 6 and summary["ok"] == 6 and summary["rows_scored"] == 12
    assert summary["labels_delivered"] == 12
    assert len(gateway_log.labels) == 6


def test_cli_reports_an_unreachable_gateway(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", f"http://127.0.0.1:{free_port()}", "--requests", "2", "--timeout", "2"]) == 2
    assert "unreachable" in capsys.readouterr().err
