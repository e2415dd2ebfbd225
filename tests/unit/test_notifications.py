"""Monitoring alerts delivered for real: an outbox file, an SMTP server and webhooks on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from tests.support import free_port

WINDOW_START = datetime(2026, 11, 27, 13, tzinfo=UTC)
WINDOW_END = datetime(2026, 11, 27, 14, tzinfo=UTC)


def make_alert(**changes: Any) -> Any:
    from modelops.notifications import Alert

    fields: dict[str, Any] = {
        "model_name": "ctr-model",
        "version": "7",
        "window_start": WINDOW_START,
        "window_end": WINDOW_END,
        "tier": "critical",
        "title": "Drift on 4 of 12 features",
        "body": "share of drifted features 0.33 > 0.25\nfeature {{ 7*7 }} {% if %} drifted",
        "dedup_key": "ctr-model:7:drift",
        "recipients": ["owner@example.com"],
    }
    return Alert(**{**fields, **changes})


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- servers on loopback ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


class _Mailbox:
    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd)
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Mailbox]:
    """A real SMTP server (aiosmtpd) on loopback, reachable as the Airflow connection modelops_smtp."""
    from aiosmtpd.controller import Controller

    mailbox = _Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    monkeypatch.setenv("AIRFLOW_CONN_MODELOPS_SMTP", smtp_connection(port))
    try:
        yield mailbox
    finally:
        controller.stop()


def smtp_connection(port: int) -> str:
    extra = {
        "disable_tls": True,
        "disable_ssl": True,
        "from_email": "modelops@example.com",
        "timeout": 5,
        "retry_limit": 0,
    }
    return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port, "extra": extra})


class _Webhook:
    def __init__(self, status: int) -> None:
        self.status = status
        self.requests: list[dict[str, Any]] = []


@contextmanager
def webhook_server(status: int = 200) -> Iterator[tuple[str, _Webhook]]:
    """A real HTTP server on loopback recording each POST (path, headers, JSON body); yields its base URL."""
    received = _Webhook(status)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.requests.append(
                {"path": self.path, "headers": dict(self.headers), "json": json.loads(body)}
            )
            self.send_response(received.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def use_webhook_connection(monkeypatch: pytest.MonkeyPatch, base_url: str) -> None:
    host, port = base_url.removeprefix("http://").split(":")
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODELOPS_ALERT_WEBHOOK",
        json.dumps({"conn_type": "http", "host": host, "port": int(port), "schema": "http"}),
    )


# --- outbox ----------------------------------------------------------------------------------------------


def test_outbox_appends_one_json_line_per_alert(modelops_home: Path) -> None:
    from modelops.notifications import ChannelConfig, OutboxNotifier, default_outbox_path, deliver

    outbox = modelops_home / "outbox" / "alerts.jsonl"
    assert default_outbox_path() == outbox

    first = deliver(make_alert(), [ChannelConfig(kind="outbox")], {})
    OutboxNotifier(make_alert(tier="recovered", dedup_key="ctr-model:7:recovered"))({})

    assert [(r.channel, r.delivered, r.attempts, r.error) for r in first] == [("outbox", True, 1, None)]
    lines = read_lines(outbox)
    assert [line["tier"] for line in lines] == ["critical", "recovered"]
    assert lines[0]["model_name"] == "ctr-model" and lines[0]["version"] == "7"
    assert lines[0]["window_start"] == "2026-11-27T13:00:00Z"
    # The alert is data: Jinja-looking text is kept as is, even through notifier(context).
    assert lines[0]["body"] == make_alert().body
    assert "recorded_at" in lines[0]


def test_outbox_logs_the_alert(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from modelops.notifications import OutboxNotifier

    OutboxNotifier(make_alert(), path=tmp_path / "alerts.jsonl").notify({})

    out, err = capfd.readouterr()
    logged = [line for line in (out + err).splitlines() if "ModelOps alert CRITICAL" in line]
    assert len(logged) == 1
    assert "ctr-model v7" in logged[0] and "Drift on 4 of 12 features" in logged[0]


def test_outbox_is_always_delivered_and_its_path_configurable(modelops_home: Path, tmp_path: Path) -> None:
    from modelops.notifications import ChannelConfig, deliver

    results = deliver(make_alert(), [])
    assert [r.channel for r in results] == ["outbox"]
    assert len(read_lines(modelops_home / "outbox" / "alerts.jsonl")) == 1

    elsewhere = tmp_path / "relay" / "alerts.jsonl"
    deliver(make_alert(), [ChannelConfig(kind="outbox", path=str(elsewhere))])
    assert len(read_lines(elsewhere)) == 1
    assert len(read_lines(modelops_home / "outbox" / "alerts.jsonl")) == 1


def test_outbox_lines_from_concurrent_writers_stay_whole(tmp_path: Path) -> None:
    from modelops.notifications import OutboxNotifier

    outbox = tmp_path / "alerts.jsonl"
    big_body = "x" * 20_000  # well beyond one pipe buffer: a line split in two writes would interleave

    def write(worker: int) -> None:
        for i in range(25):
            OutboxNotifier(make_alert(body=big_body, dedup_key=f"w{worker}-{i}"), path=outbox).notify({})

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    lines = read_lines(outbox)
    assert len(lines) == 200
    assert {line["dedup_key"] for line in lines} == {f"w{w}-{i}" for w in range(8) for i in range(25)}


# --- smtp ------------------------------------------------------------------------------------------------


def test_smtp_channel_sends_the_alert_through_the_provider_notifier(
    modelops_home: Path, smtp_server: _Mailbox
) -> None:
    from modelops.notifications import ChannelConfig, deliver

    channel = ChannelConfig(kind="smtp", conn_id="modelops_smtp", to=["ml-platform@example.com"])
    results = deliver(make_alert(), [channel], {})

    assert [(r.channel, r.delivered, r.attempts) for r in results] == [
        ("outbox", True, 1),
        ("smtp:modelops_smtp", True, 1),
    ]
    [envelope] = smtp_server.envelopes
    assert envelope.mail_from == "modelops@example.com"
    assert envelope.rcpt_tos == ["ml-platform@example.com", "owner@example.com"]
    mail = message_from_bytes(envelope.content, policy=policy.default)
    assert "ctr-model" in mail["Subject"] and "critical" in mail["Subject"]
    assert mail["X-ModelOps-Dedup-Key"] == "ctr-model:7:drift"
    html_body = mail.get_body(("html",)).get_content()
    assert "Drift on 4 of 12 features" in html_body
    # Not rendered as a Jinja template (it would be "49" and a syntax error), but escaped as HTML text.
    assert "feature {{ 7*7 }} {% if %} drifted" in html_body


def test_smtp_channel_without_any_recipient_fails_at_once(modelops_home: Path, smtp_server: _Mailbox) -> None:
    from modelops.notifications import ChannelConfig, deliver

    channel = ChannelConfig(kind="smtp", conn_id="modelops_smtp", attempts=3, backoff_seconds=0)
    [_, result] = deliver(make_alert(recipients=[]), [channel])

    assert not result.delivered and result.attempts == 1
    assert result.error is not None and result.error.startswith("ChannelMisconfigured: ")
    assert smtp_server.envelopes == []


# --- webhook ---------------------------------------------------------------------------------------------


def test_webhook_channel_posts_the_alert_through_an_http_connection(
    modelops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelops.notifications import ChannelConfig, deliver

    with webhook_server() as (base_url, received):
        use_webhook_connection(monkeypatch, base_url)
        channel = ChannelConfig(kind="webhook", conn_id="modelops_alert_webhook", endpoint="hooks/modelops")
        results = deliver(make_alert(), [channel], {})

    assert [(r.channel, r.delivered) for r in results] == [
        ("outbox", True),
        ("webhook:modelops_alert_webhook", True),
    ]
    [request] = received.requests
    assert request["path"] == "/hooks/modelops"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["X-ModelOps-Dedup-Key"] == "ctr-model:7:drift"
    assert request["json"] == make_alert().payload()


def test_webhook_channel_posts_to_a_plain_url(modelops_home: Path) -> None:
    from modelops.notifications import ChannelConfig, deliver

    with webhook_server() as (base_url, received):
        channel = ChannelConfig(kind="webhook", url=f"{base_url}/in/alerts")
        [_, result] = deliver(make_alert(tier="warning"), [channel])

    assert result.delivered and result.channel == "webhook:127.0.0.1"
    [request] = received.requests
    assert request["path"] == "/in/alerts"
    assert request["json"]["tier"] == "warning"


@pytest.mark.parametrize("how", ["conn_id", "url"])
def test_webhook_answering_an_error_is_retried_then_reported(
    modelops_home: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    from modelops.notifications import ChannelConfig, deliver

    with webhook_server(status=503) as (base_url, received):
        use_webhook_connection(monkeypatch, base_url)
        target = {"conn_id": "modelops_alert_webhook"} if how == "conn_id" else {"url": f"{base_url}/x"}
        channel = ChannelConfig(kind="webhook", attempts=2, backoff_seconds=0, **target)
        [_, result] = deliver(make_alert(), [channel])

    assert not result.delivered and result.attempts == 2
    assert len(received.requests) == 2
    assert result.error is not None and "503" in result.error


# --- a channel that is down --------------------------------------------------------------------------------


def test_a_channel_that_is_down_fails_alone_without_raising(
    modelops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelops.notifications import ChannelConfig, deliver

    monkeypatch.setenv("AIRFLOW_CONN_MODELOPS_SMTP", smtp_connection(free_port()))  # nothing listens
    with webhook_server() as (base_url, received):
        use_webhook_connection(monkeypatch, base_url)
        channels = [
            ChannelConfig(kind="outbox"),
            ChannelConfig(kind="smtp", conn_id="modelops_smtp", attempts=3, backoff_seconds=0.01),
            ChannelConfig(kind="webhook", conn_id="modelops_alert_webhook"),
        ]
        results = deliver(make_alert(), channels, {})

    outbox, smtp, webhook = results
    assert outbox.delivered and webhook.delivered
    assert len(received.requests) == 1
    assert len(read_lines(modelops_home / "outbox" / "alerts.jsonl")) == 1
    assert smtp.channel == "smtp:modelops_smtp" and smtp.kind == "smtp"
    assert not smtp.delivered and smtp.attempts == 3
    assert smtp.error is not None and smtp.error.startswith("ConnectionRefusedError: ")


def test_delivery_errors_do_not_show_the_webhook_token(modelops_home: Path) -> None:
    from modelops.notifications import ChannelConfig, deliver

    token_url = f"http://127.0.0.1:{free_port()}/services/T0001/B0001/s3cr3tT0ken?sig=abcdef123"
    [_, result] = deliver(make_alert(), [ChannelConfig(kind="webhook", url=token_url, attempts=1)])

    assert not result.delivered and result.error is not None
    assert result.error.startswith("ConnectError: ")
    assert "s3cr3tT0ken" not in result.error and "abcdef123" not in result.error


def test_delivery_errors_do_not_show_connection_secrets(
    modelops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelops.notifications import ChannelConfig, deliver

    port = free_port()
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODELOPS_ALERT_WEBHOOK",
        json.dumps(
            {
                "conn_type": "http",
                "host": f"http://127.0.0.1:{port}/hooks/s3cr3tT0ken",
                "password": "hunter2-password",
            }
        ),
    )
    channel = ChannelConfig(kind="webhook", conn_id="modelops_alert_webhook", attempts=1)
    [_, result] = deliver(make_alert(), [channel])

    assert not result.delivered and result.error is not None
    assert "ConnectionError" in result.error
    assert "s3cr3tT0ken" not in result.error and "hunter2" not in result.error


# --- configuration ---------------------------------------------------------------------------------------


def test_channels_load_from_a_policy_yaml() -> None:
    from modelops.notifications import ChannelConfig

    class Policy(BaseModel):
        channels: list[ChannelConfig]

    policy = Policy.model_validate(
        yaml.safe_load(
            """
            channels:
              - {kind: outbox}
              - {kind: smtp, conn_id: modelops_smtp, to: [ml-platform@example.com]}
              - {kind: webhook, conn_id: modelops_alert_webhook, attempts: 5, backoff_seconds: 2}
            """
        )
    )
    assert [c.label for c in policy.channels] == [
        "outbox",
        "smtp:modelops_smtp",
        "webhook:modelops_alert_webhook",
    ]
    assert policy.channels[2].attempts == 5 and policy.channels[0].attempts == 3


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"kind": "slack", "conn_id": "x"}, "unknown channel kind 'slack'"),
        ({"kind": "smtp", "to": ["a@example.com"]}, "needs conn_id"),
        ({"kind": "smtp", "conn_id": "s", "to": ["a@example.com, b@example.com"]}, "not one email address"),
        ({"kind": "outbox", "to": ["a@example.com"]}, "a outbox channel takes no to"),
        ({"kind": "webhook"}, "exactly one of conn_id"),
        ({"kind": "webhook", "conn_id": "w", "url": "https://example.com/h"}, "exactly one of conn_id"),
        ({"kind": "webhook", "url": "ftp://example.com/h"}, "http:// or https://"),
        ({"kind": "smtp", "conn_id": "s", "attempts": 0}, "attempts"),
        ({"kind": "smtp", "conn_id": "s", "retries": 2}, "Extra inputs are not permitted"),
    ],
)
def test_channel_config_refuses_what_it_cannot_deliver(config: dict[str, Any], message: str) -> None:
    from modelops.notifications import ChannelConfig

    with pytest.raises(ValidationError, match=message):
        ChannelConfig.model_validate(config)


def test_a_registered_kind_is_configurable_and_delivered(modelops_home: Path) -> None:
    from airflow.sdk.bases.notifier import BaseNotifier

    from modelops import notifications
    from modelops.notifications import ChannelConfig, deliver, register_channel_kind

    sent: list[tuple[str, str]] = []

    class ChatNotifier(BaseNotifier):
        def __init__(self, room: str, text: str) -> None:
            super().__init__()
            self.room, self.text = room, text

        def notify(self, context: Any) -> None:
            sent.append((self.room, self.text))

    register_channel_kind("chat", lambda channel, alert: ChatNotifier(channel.options["room"], alert.title))
    try:
        channel = ChannelConfig.model_validate({"kind": "chat", "options": {"room": "#ml-alerts"}})
        [_, result] = deliver(make_alert(), [channel])
    finally:
        notifications._CHANNEL_KINDS.pop("chat")

    assert result.delivered and result.channel == "chat"
    assert sent == [("#ml-alerts", "Drift on 4 of 12 features")]


@pytest.mark.parametrize(
    "changes",
    [
        {"tier": "info"},
        {"dedup_key": "has space"},
        {"window_end": datetime(2026, 11, 27, 12, tzinfo=UTC)},
        {"window_start": datetime(2026, 11, 27, 13)},
    ],
)
def test_alert_refuses_invalid_values(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        make_alert(**changes)
