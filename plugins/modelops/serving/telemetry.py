"""The gateway's telemetry: Prometheus metrics and W3C trace context, with the maintained libraries.

:class:`GatewayMetrics` owns a private ``prometheus_client.CollectorRegistry`` (never the process-global
one, so every app a test creates starts at zero and no two clash on metric names) and renders it for a
``/metrics`` route. :func:`trace_context` reads an incoming ``traceparent`` with OpenTelemetry's W3C
propagator and gives the gateway's own hop in that trace (or a new trace), to log with the prediction
and return to the caller.

Wiring, in the gateway::

    metrics = GatewayMetrics()
    ...
    trace = trace_context(request.headers)       # first thing in a scoring handler
    ...                                          # score; log trace.traceparent with the prediction
    metrics.observe(name, version, arm, status, seconds)
    return Response(..., headers={**trace.response_headers(), ...})

    @app.get("/metrics")
    def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from modelops.vocabulary import Arm

# The arms that answer a call: the champion, the canary's challenger, a staged version (smoke test).
CHAMPION = Arm.CHAMPION.value
CHALLENGER = Arm.CHALLENGER.value
ARMS = tuple(arm.value for arm in Arm)

# Seconds. Scoring is ~1-50 ms on the gateway; the long tail (model reloads, a slow database) up to 10 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LABELS = ("model", "version", "arm", "status")

TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"


class GatewayMetrics:
    """Request, error and latency metrics of the scoring routes, in a registry of their own.

    Every series is labelled ``model``, ``version`` (empty when the call failed before a version was
    chosen), ``arm`` (``champion``/``challenger``) and ``status`` (the class: ``2xx``, ``4xx``, ``5xx``):

    * ``modelops_gateway_requests_total``: scoring calls answered;
    * ``modelops_gateway_errors_total``: those answered with a status of 400 or more;
    * ``modelops_gateway_request_duration_seconds``: their latency (a histogram).

    Label values are what the gateway passes: pass only model names it serves (a name from the URL that
    it refuses would add a series per made-up name).
    """

    def __init__(self, *, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "modelops_gateway_requests",
            "Scoring calls answered by the gateway.",
            _LABELS,
            registry=self.registry,
        )
        self.errors = Counter(
            "modelops_gateway_errors",
            "Scoring calls answered with an HTTP status of 400 or more.",
            _LABELS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "modelops_gateway_request_duration_seconds",
            "Time to answer a scoring call, in seconds.",
            _LABELS,
            buckets=tuple(buckets),
            registry=self.registry,
        )
        # The three children of each label set, looked up once: ``labels()`` validates and hashes its
        # arguments under a lock on every call (a third of observe's time).
        self._children: dict[tuple[str, ...], tuple[Any, Any, Any]] = {}

    def observe(self, model: str, version: str | None, arm: str, status: int, seconds: float) -> None:
        """Count one scoring call answered with HTTP ``status`` after ``seconds``."""
        if arm not in ARMS:
            raise ValueError(f"arm {arm!r} is not one of {ARMS}; pass the arm that served the call")
        if not 100 <= status <= 599:
            raise ValueError(f"HTTP status {status} is not in 100-599; pass the status the call was answered")
        labels = (model, version or "", arm, f"{status // 100}xx")
        children = self._children.get(labels)
        if children is None:
            children = (
                self.requests.labels(*labels),
                self.errors.labels(*labels) if status >= 400 else None,
                self.latency.labels(*labels),
            )
            self._children[labels] = children
        requests, errors, latency = children
        requests.inc()
        if errors is not None:  # the status class is a label: a set's calls are all errors or none
            errors.inc()
        latency.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus' text format, and the content type to serve it with."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class TraceContext(NamedTuple):
    """The gateway's hop of a W3C trace (https://www.w3.org/TR/trace-context/).

    ``traceparent``: ``00-<trace id>-<span id>-<flags>``, the gateway's span in the caller's trace (or in
    a trace started here): the value to log with the prediction, on log lines and on the response.
    ``parent_span_id`` is the caller's span, None when the trace started here. ``tracestate`` is the
    caller's, passed on unchanged (None when absent or invalid).
    """

    traceparent: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    tracestate: str | None

    @property
    def started_here(self) -> bool:
        """True when the caller sent no valid ``traceparent``."""
        return self.parent_span_id is None

    def response_headers(self) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) for the response, so a caller can find the call's logs."""
        headers = {TRACEPARENT_HEADER: self.traceparent}
        if self.tracestate:
            headers[TRACESTATE_HEADER] = self.tracestate
        return headers


_PROPAGATOR = TraceContextTextMapPropagator()
_IDS = RandomIdGenerator()


def trace_context(headers: Mapping[str, Any]) -> TraceContext:
    """The trace context of a request from its ``headers`` (a mapping; Starlette's ``Headers`` works).

    A valid ``traceparent`` is continued: same trace id and sampled flag, a new span id for the gateway,
    the caller's span as parent. One that is absent, invalid, or sent more than once (the W3C rule) starts
    a new trace, sampled. Never raises on what a caller sent.
    """
    carrier = _carrier(headers)
    if not carrier:
        # No trace headers (most calls): a new sampled trace, formatted as the propagator would, without
        # its extract/inject round trip (a third of this function's time).
        trace_id, span_id = _IDS.generate_trace_id(), _IDS.generate_span_id()
        own_trace, own_span = trace.format_trace_id(trace_id), trace.format_span_id(span_id)
        return TraceContext(
            traceparent=f"00-{own_trace}-{own_span}-{trace.TraceFlags.SAMPLED:02x}",
            trace_id=own_trace,
            span_id=own_span,
            parent_span_id=None,
            tracestate=None,
        )
    parent = trace.INVALID_SPAN_CONTEXT
    if len(carrier.get(TRACEPARENT_HEADER, ())) == 1:
        extracted = _PROPAGATOR.extract(carrier)
        parent = trace.get_current_span(extracted).get_span_context()
    if parent.is_valid:
        own = trace.SpanContext(
            trace_id=parent.trace_id,
            span_id=_IDS.generate_span_id(),
            is_remote=False,
            trace_flags=parent.trace_flags,
            trace_state=parent.trace_state,
        )
    else:
        own = trace.SpanContext(
            trace_id=_IDS.generate_trace_id(),
            span_id=_IDS.generate_span_id(),
            is_remote=False,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
    out: dict[str, str] = {}
    _PROPAGATOR.inject(out, trace.set_span_in_context(trace.NonRecordingSpan(own), Context()))
    return TraceContext(
        traceparent=out[TRACEPARENT_HEADER],
        trace_id=trace.format_trace_id(own.trace_id),
        span_id=trace.format_span_id(own.span_id),
        parent_span_id=trace.format_span_id(parent.span_id) if parent.is_valid else None,
        tracestate=out.get(TRACESTATE_HEADER),
    )


def _carrier(headers: Mapping[str, Any]) -> dict[str, list[str]]:
    """The trace headers by lower-case name, every value kept (a repeated traceparent is invalid)."""
    carrier: dict[str, list[str]] = {}
    items = headers.multi_items() if hasattr(headers, "multi_items") else headers.items()
    for name, value in items:
        key = name.lower() if isinstance(name, str) else None
        if key in (TRACEPARENT_HEADER, TRACESTATE_HEADER):
            # A list value (several header fields of one name) stays several values; anything not text
            # counts as a value too, so it invalidates rather than being read.
            values = value if isinstance(value, list | tuple) else [value]
            carrier.setdefault(key, []).extend(v if isinstance(v, str) else "" for v in values)
    return carrier
