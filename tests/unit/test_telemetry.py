"""The gateway's Prometheus metrics (parsed back with prometheus_client's own parser) and W3C trace
context (continued when valid, restarted when absent or invalid, never an exception)."""

from __future__ import annotations

import re

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from starlette.datastructures import Headers

from modelops.serving.telemetry import GatewayMetrics, TraceContext, trace_context

TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def samples(metrics: GatewayMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def labels(model: str, version: str, arm: str, status: str, **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"model": model, "version": version, "arm": arm, "status": status, **extra}.items()))


def test_metrics_count_requests_errors_and_latency_per_model_version_arm_and_status() -> None:
    metrics = GatewayMetrics()
    metrics.observe("ctr", "3", "champion", 200, 0.004)
    metrics.observe("ctr", "3", "champion", 200, 0.02)
    metrics.observe("ctr", "4", "challenger", 200, 0.3)
    metrics.observe("ctr", "3", "champion", 422, 0.001)
    metrics.observe("ctr", None, "champion", 503, 2.0)
    found = samples(metrics)

    ok = labels("ctr", "3", "champion", "2xx")
    assert found["modelops_gateway_requests_total", ok] == 2
    assert found["modelops_gateway_requests_total", labels("ctr", "4", "challenger", "2xx")] == 1
    assert found["modelops_gateway_requests_total", labels("ctr", "3", "champion", "4xx")] == 1
    assert found["modelops_gateway_requests_total", labels("ctr", "", "champion", "5xx")] == 1
    # Errors: only the calls answered with 4xx/5xx.
    errors = {key[1]: value for key, value in found.items() if key[0] == "modelops_gateway_errors_total"}
    assert errors == {labels("ctr", "3", "champion", "4xx"): 1, labels("ctr", "", "champion", "5xx"): 1}
    # The histogram: cumulative buckets, count and sum.
    histogram = "modelops_gateway_request_duration_seconds"
    assert found[f"{histogram}_count", ok] == 2
    assert found[f"{histogram}_sum", ok] == pytest.approx(0.024)
    assert found[f"{histogram}_bucket", labels("ctr", "3", "champion", "2xx", le="0.0025")] == 0
    assert found[f"{histogram}_bucket", labels("ctr", "3", "champion", "2xx", le="0.005")] == 1
    assert found[f"{histogram}_bucket", labels("ctr", "3", "champion", "2xx", le="0.025")] == 2
    assert found[f"{histogram}_bucket", labels("ctr", "3", "champion", "2xx", le="+Inf")] == 2


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = GatewayMetrics(), GatewayMetrics()  # no "Duplicated timeseries" error
    first.observe("ctr", "1", "champion", 200, 0.01)
    assert samples(second) == {}
    assert (
        REGISTRY.get_sample_value(
            "modelops_gateway_requests_total", dict(labels("ctr", "1", "champion", "2xx"))
        )
        is None
    )


def test_metrics_refuse_unknown_arms_and_statuses() -> None:
    metrics = GatewayMetrics()
    with pytest.raises(ValueError, match="arm 'canary' is not one of"):
        metrics.observe("ctr", "1", "canary", 200, 0.01)
    with pytest.raises(ValueError, match="HTTP status 42 is not in 100-599"):
        metrics.observe("ctr", "1", "champion", 42, 0.01)


def test_a_valid_traceparent_is_continued_in_the_same_trace() -> None:
    incoming = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    context = trace_context(Headers({"traceparent": incoming, "tracestate": "vendor=abc,other=1"}))
    assert isinstance(context, TraceContext) and TRACEPARENT.match(context.traceparent)
    version, trace_id, span_id, flags = context.traceparent.split("-")
    assert (version, trace_id, flags) == ("00", CALLER_TRACE, "01")
    assert span_id != CALLER_SPAN and span_id == context.span_id  # the gateway's own hop
    assert context.trace_id == CALLER_TRACE and context.parent_span_id == CALLER_SPAN
    assert not context.started_here
    assert context.response_headers() == {
        "traceparent": context.traceparent,
        "tracestate": "vendor=abc,other=1",
    }
    # The caller's sampling decision is kept; a plain dict with any header case works too.
    unsampled = trace_context({"TraceParent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"})
    assert unsampled.traceparent.endswith("-00") and unsampled.trace_id == CALLER_TRACE
    # A tuple unpacks with the traceparent first.
    traceparent, *_ = context
    assert traceparent == context.traceparent


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"traceparent": "garbage"},
        {"traceparent": ""},
        {"traceparent": f"00-{'0' * 32}-{CALLER_SPAN}-01"},  # all-zero trace id
        {"traceparent": f"00-{CALLER_TRACE}-{'0' * 16}-01"},  # all-zero span id
        {"traceparent": f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01"},  # forbidden version
        {"traceparent": f"00-{CALLER_TRACE.upper()}-{CALLER_SPAN}-01"},  # upper case hex
        {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01-extra"},  # version 00 has no more fields
        {"traceparent": "00-" + "a" * 5000},
        {"traceparent": "\x00\xff\u2603"},
        {"traceparent": b"00-bytes"},
        {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "tracestate": "=,==\x00" * 200},
    ],
    ids=lambda headers: repr(headers)[:40],
)
def test_an_absent_or_invalid_traceparent_starts_a_new_trace(headers: dict[str, object]) -> None:
    context = trace_context(headers)
    assert TRACEPARENT.match(context.traceparent)
    if "tracestate" in headers:  # a valid traceparent with a garbage tracestate: continued, state dropped
        assert context.trace_id == CALLER_TRACE and not context.tracestate
        return
    assert context.started_here and context.parent_span_id is None
    assert context.trace_id != CALLER_TRACE and context.trace_id != "0" * 32
    assert context.traceparent.endswith("-01")
    assert context.response_headers() == {"traceparent": context.traceparent}


def test_a_repeated_traceparent_header_is_invalid() -> None:
    # W3C: several traceparent fields cannot be told apart, so the trace restarts.
    valid = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    headers = Headers(raw=[(b"traceparent", valid.encode()), (b"traceparent", valid.encode())])
    assert trace_context(headers).started_here
    assert trace_context({"traceparent": [valid, valid]}).started_here


def test_new_traces_are_distinct() -> None:
    assert len({trace_context({}).trace_id for _ in range(100)}) == 100
