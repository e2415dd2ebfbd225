"""Simulated scoring traffic for the scoring gateway (MLflow scoring protocol).

``simulate_traffic`` sends batches of synthetic feature rows to ``POST {url}/invocations`` as
``dataframe_split`` JSON, rotating over callers, each with its own API key (``Authorization: Bearer``: the
gateway logs the call under the key's ``team:key_id``), and keeps the true labels of every scored request
so that ``deliver_labels`` can post them later to ``POST {url}/labels`` (delayed ground truth).

The keys come from the ``keys`` argument (caller -> key), else from the JSON file named by
``MODELOPS_GATEWAY_CLIENT_KEYS_FILE`` (``{"<key_id>": {"team": "...", "key": "..."}}``, written by
``make demo``): the callers are key ids there.

CLI: ``python -m modelops.data.traffic --url http://127.0.0.1:8008 --requests 600 [--drift]
[--age-shift 15] [--out-of-range-share 0.2] [--deliver-labels] [--keys-file FILE]`` prints a one-line
JSON summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from modelops.data.synthetic import STRONG_DRIFT, DriftShift, generate_clicks
from modelops.errors import ConfigurationError, ModelOpsError
from modelops.serving.access import CLIENT_KEYS_ENV, read_client_keys
from modelops.vocabulary import ARM_HEADER, ROUTING_KEY_HEADER

log = logging.getLogger(__name__)

# The columns the model scores, in the model spec's order; user_id and the label are never sent.
FEATURE_COLUMNS: tuple[str, ...] = (
    "user_age",
    "user_balance",
    "click_history_length",
    "item_price",
    "hour_of_day",
    "item_category",
    "device",
)
LABEL_COLUMN = "clicked"
DEFAULT_CALLERS: tuple[str, ...] = ("web-shop", "mobile-app", "email-campaign")
CALLER_HEADER = "X-Caller-Id"
REQUEST_ID_HEADER = "X-Request-Id"
MAX_KEPT_ERRORS = 5


def client_keys(path: str | None = None) -> dict[str, str]:
    """``{key_id: key}`` from the keys file ``path`` (default: ``$MODELOPS_GATEWAY_CLIENT_KEYS_FILE``);
    empty when neither names one (the gateway will then answer 401)."""
    import os

    path = path or os.environ.get(CLIENT_KEYS_ENV, "").strip() or None
    if path is None:
        return {}
    return {key_id: entry["key"] for key_id, entry in read_client_keys(path).items()}


def _auth(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


class GatewayUnreachable(ModelOpsError, ConnectionError):
    """The scoring gateway does not answer at all (connection refused, DNS failure, timeout)."""


@dataclass
class TrafficReport:
    """What a traffic run did; ``pending_labels`` maps each scored request id to its true labels."""

    requests_sent: int = 0
    ok: int = 0
    failed: int = 0
    rows_scored: int = 0
    request_ids: list[str] = field(default_factory=list)
    pending_labels: dict[str, list[int]] = field(default_factory=dict)
    requests_by_caller: dict[str, int] = field(default_factory=dict)
    requests_by_arm: dict[str, int] = field(default_factory=dict)
    """Scored requests per arm that answered (champion, challenger during a canary)."""
    latencies_ms: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-safe counts without the per-request lists (which grow with the run)."""
        data = dataclasses.asdict(self)
        del data["request_ids"], data["pending_labels"]
        data["pending_label_rows"] = sum(len(labels) for labels in self.pending_labels.values())
        return data


def simulate_traffic(
    url: str,
    *,
    requests: int,
    rows_per_request: int = 5,
    seed: int = 11,
    callers: Sequence[str] = DEFAULT_CALLERS,
    shift: DriftShift | None = None,
    timeout: float = 10.0,
    client: httpx.Client | None = None,
    keys: Mapping[str, str] | None = None,
) -> TrafficReport:
    """Send ``requests`` scoring requests of ``rows_per_request`` rows each, rotating over ``callers``,
    each caller with its key from ``keys`` (default: :func:`client_keys`; none there: no key is sent).

    A request that fails (an HTTP error status, a malformed answer, a transport error once the gateway
    has answered) is counted and its message kept; the run goes on. Raises ``GatewayUnreachable`` when
    the gateway cannot be reached before it has answered any request.
    """
    if requests < 1 or rows_per_request < 1:
        raise ValueError(f"requests and rows_per_request must be >= 1, got {requests} and {rows_per_request}")
    if not callers:
        raise ValueError("callers must name at least one caller id")
    keys = client_keys() if keys is None else keys
    missing = [caller for caller in callers if keys and caller not in keys]
    if missing:
        raise ConfigurationError(
            f"no API key for callers {missing} (keys are known for {sorted(keys)}); add them to the keys "
            f"file ({CLIENT_KEYS_ENV}) or pass callers that have one"
        )
    frame = generate_clicks(requests * rows_per_request, seed=seed, shift=shift)
    features = {column: frame[column].tolist() for column in FEATURE_COLUMNS}
    labels = frame[LABEL_COLUMN].astype(int).tolist()
    endpoint = f"{url.rstrip('/')}/invocations"
    report = TrafficReport()
    latencies: list[float] = []
    gateway_answered = False

    own_client = client is None
    http = client if client is not None else httpx.Client(timeout=timeout)
    try:
        for index in range(requests):
            caller = callers[index % len(callers)]
            start, stop = index * rows_per_request, (index + 1) * rows_per_request
            columns = [features[c][start:stop] for c in FEATURE_COLUMNS]
            rows = [list(values) for values in zip(*columns, strict=True)]
            payload = {"dataframe_split": {"columns": list(FEATURE_COLUMNS), "data": rows}}
            report.requests_sent += 1
            report.requests_by_caller[caller] = report.requests_by_caller.get(caller, 0) + 1
            began = time.perf_counter()
            try:
                response = http.post(
                    endpoint,
                    json=payload,
                    # A session per request: during a canary, the split then follows the share closely.
                    headers={
                        CALLER_HEADER: caller,
                        ROUTING_KEY_HEADER: f"session-{seed}-{index}",
                        **_auth(keys.get(caller)),
                    },
                    timeout=timeout,
                )
            except httpx.TransportError as exc:
                if not gateway_answered:
                    raise GatewayUnreachable(
                        f"the scoring gateway at {url} is unreachable ({type(exc).__name__}: {exc}); "
                        "start the gateway or pass the right --url"
                    ) from exc
                _record_failure(report, f"request {index} ({caller}): {type(exc).__name__}: {exc}")
                continue
            gateway_answered = True
            latencies.append((time.perf_counter() - began) * 1000.0)
            problem = _check_scoring_response(response, expected_rows=len(rows))
            if problem is not None:
                _record_failure(report, f"request {index} ({caller}): {problem}")
                continue
            report.ok += 1
            report.rows_scored += len(rows)
            arm = response.headers.get(ARM_HEADER)
            if arm:
                report.requests_by_arm[arm] = report.requests_by_arm.get(arm, 0) + 1
            request_id = response.headers.get(REQUEST_ID_HEADER)
            if request_id:
                report.request_ids.append(request_id)
                report.pending_labels[request_id] = labels[start:stop]
            elif len(report.errors) < MAX_KEPT_ERRORS:
                # Scored, but its labels cannot be delivered without an id to attach them to.
                report.errors.append(f"request {index} ({caller}): 200 without {REQUEST_ID_HEADER} header")
    finally:
        if own_client:
            http.close()
    if latencies:
        p50, p95 = np.percentile(latencies, [50, 95])
        report.latencies_ms = {"p50": round(float(p50), 2), "p95": round(float(p95), 2)}
    return report


def _record_failure(report: TrafficReport, message: str) -> None:
    report.failed += 1
    if len(report.errors) < MAX_KEPT_ERRORS:
        report.errors.append(message)


def _check_scoring_response(response: httpx.Response, *, expected_rows: int) -> str | None:
    """``None`` for a usable scoring answer, else a message saying what is wrong with it."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {_error_text(response)}"
    try:
        body = response.json()
    except ValueError:
        return f"HTTP 200 with a body that is not JSON: {response.text[:200]!r}"
    predictions = body.get("predictions") if isinstance(body, dict) else None
    if not isinstance(predictions, list):
        return f"HTTP 200 without a 'predictions' list: {response.text[:200]!r}"
    if len(predictions) != expected_rows:
        return f"HTTP 200 with {len(predictions)} predictions for {expected_rows} rows"
    return None


def _error_text(response: httpx.Response) -> str:
    """``error_code: message`` from a gateway error body, or the start of the raw body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict) and ("error_code" in body or "message" in body):
        return f"{body.get('error_code', 'UNKNOWN')}: {body.get('message', '')}"
    return response.text[:200]


def deliver_labels(
    url: str,
    pending_labels: Mapping[str, Sequence[int]],
    *,
    client: httpx.Client | None = None,
    timeout: float = 10.0,
    api_key: str | None = None,
) -> int:
    """Post each request's true labels to ``{url}/labels``; return how many rows the gateway accepted.

    The gateway takes labels only from a team that may call the requests' model: ``api_key``, default the
    first of :data:`DEFAULT_CALLERS` with a key in :func:`client_keys`.

    A rejected delivery (an HTTP error status) is logged and skipped; an unreachable gateway raises
    ``GatewayUnreachable``.
    """
    endpoint = f"{url.rstrip('/')}/labels"
    if api_key is None:
        known = client_keys()
        api_key = next((known[caller] for caller in DEFAULT_CALLERS if caller in known), None)
    accepted = 0
    own_client = client is None
    http = client if client is not None else httpx.Client(timeout=timeout)
    try:
        for request_id, labels in pending_labels.items():
            payload = {"request_id": request_id, "labels": [int(label) for label in labels]}
            try:
                response = http.post(endpoint, json=payload, headers=_auth(api_key), timeout=timeout)
            except httpx.TransportError as exc:
                raise GatewayUnreachable(
                    f"the scoring gateway at {url} is unreachable while delivering labels "
                    f"({type(exc).__name__}: {exc}); start the gateway and deliver the labels again"
                ) from exc
            if response.status_code != 200:
                log.warning(
                    "labels for request %s rejected: HTTP %s: %s",
                    request_id,
                    response.status_code,
                    _error_text(response),
                )
                continue
            body = response.json()
            if not isinstance(body, dict) or "accepted" not in body:
                raise ModelOpsError(
                    f"the gateway at {url} answered a label delivery without an 'accepted' count "
                    f"({response.text[:200]!r}); check that --url points at the scoring gateway"
                )
            accepted += int(body["accepted"])
    finally:
        if own_client:
            http.close()
    return accepted


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modelops.data.traffic", description="Send simulated scoring traffic to the gateway."
    )
    parser.add_argument("--url", default="http://127.0.0.1:8008", help="gateway base URL")
    parser.add_argument("--requests", type=int, default=600, help="number of scoring requests")
    parser.add_argument("--rows-per-request", type=int, default=5, help="rows per request")
    parser.add_argument("--seed", type=int, default=11, help="random seed")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout in seconds")
    parser.add_argument(
        "--drift",
        action="store_true",
        help="strong shift preset: age +15, 20%% rows at age 100, fashion-heavy, prices x1.5",
    )
    parser.add_argument("--age-shift", type=float, default=None, help="years added to every user")
    parser.add_argument(
        "--out-of-range-share", type=float, default=None, help="share of rows sent with user_age=100"
    )
    parser.add_argument("--deliver-labels", action="store_true", help="post the true labels afterwards")
    parser.add_argument(
        "--keys-file",
        help=f"JSON file of the callers' API keys (default: ${CLIENT_KEYS_ENV}; make demo writes "
        ".demo/modelops/gateway_keys.json)",
    )
    args = parser.parse_args(argv)

    shift = STRONG_DRIFT if args.drift else None
    overrides = {
        name: value
        for name, value in (("age_shift", args.age_shift), ("out_of_range_share", args.out_of_range_share))
        if value is not None
    }
    if overrides:
        shift = dataclasses.replace(shift or DriftShift(), **overrides)

    try:
        keys = client_keys(args.keys_file)
        report = simulate_traffic(
            args.url,
            keys=keys,
            requests=args.requests,
            rows_per_request=args.rows_per_request,
            seed=args.seed,
            shift=shift,
            timeout=args.timeout,
        )
        summary = report.summary()
        if args.deliver_labels:
            summary["labels_delivered"] = deliver_labels(
                args.url,
                report.pending_labels,
                timeout=args.timeout,
                api_key=next((keys[c] for c in DEFAULT_CALLERS if c in keys), None),
            )
    except (GatewayUnreachable, ConfigurationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
