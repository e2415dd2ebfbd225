"""Monitoring alerts, delivered through Airflow notifiers to every channel a monitoring policy configures.

A monitoring task builds an :class:`Alert` and calls :func:`deliver` with the policy's channels and its
task context. Every channel gets its own bounded retry and :func:`deliver` never raises: each channel
gives a :class:`DeliveryResult`, so the caller records the verdict and any failed delivery alike.

Channels (``channels:`` in a monitoring policy, each a :class:`ChannelConfig`)::

    channels:
      - {kind: outbox}                                   # always delivered, added when missing
      - {kind: smtp, conn_id: modelops_smtp, to: [ml-platform@example.com]}
      - {kind: webhook, conn_id: modelops_alert_webhook}

* ``outbox`` (:class:`OutboxNotifier`, the embedded default): one JSON line per alert appended to
  ``$MODELOPS_HOME/outbox/alerts.jsonl`` (or ``path``), and the alert in the task log.
* ``smtp``: the SMTP provider's ``SmtpNotifier`` through the Airflow connection ``conn_id`` (host, port,
  login/password; extras ``from_email``, ``disable_tls``, ``disable_ssl``, ``timeout``, ``retry_limit``).
  Mail goes to ``to`` and the alert's own ``recipients``.
* ``webhook``: the HTTP provider's ``HttpNotifier`` POSTs the alert as JSON through the Airflow HTTP
  connection ``conn_id`` (plus ``endpoint``); or, with ``url`` instead, a small httpx notifier (see
  :class:`UrlWebhookNotifier`). A URL holding a token belongs in a connection, not in a policy file.

More kinds (Slack, PagerDuty, ...) plug in with :func:`register_channel_kind`; the Slack provider is not
installed, so no Slack channel is built in.

The notifiers are called with ``notifier.notify(context)``, never ``notifier(context)``: calling a
``BaseNotifier`` renders every template field with Jinja first, so an alert title or body holding ``{{``
or ``{%`` (a feature name, a user-supplied value) would be evaluated or break the rendering. The
context is only passed through; a plain dict (even ``{}``) is enough.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from airflow.sdk.bases.notifier import BaseNotifier
from pydantic import AwareDatetime, Field, field_validator, model_validator

from modelops.errors import ConfigurationError
from modelops.settings import StrictModel, modelops_home

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)

AlertTier = Literal["warning", "critical", "recovered"]

OUTBOX_FILE = Path("outbox") / "alerts.jsonl"
"""The outbox, relative to ``$MODELOPS_HOME``."""

_ERROR_LIMIT = 500
"""Longest error text a :class:`DeliveryResult` keeps."""


def default_outbox_path() -> Path:
    """``$MODELOPS_HOME/outbox/alerts.jsonl``, resolved when an alert is written (not at import)."""
    return modelops_home() / OUTBOX_FILE


class Alert(StrictModel):
    """One monitoring alert about a model version and a window of its served predictions."""

    model_name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    window_start: AwareDatetime
    window_end: AwareDatetime
    tier: AlertTier
    title: str = Field(min_length=1)
    body: str = ""
    dedup_key: str = Field(
        pattern=r"^[\x21-\x7e]{1,200}$",
        description="Same key, same incident: receivers group or deduplicate on it (printable ASCII)",
    )
    recipients: list[str] = Field(default_factory=list, description="Extra mail recipients of this alert")

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _ordered_window(self) -> Alert:
        if self.window_end < self.window_start:
            raise ValueError("window_end is before window_start")
        return self

    def payload(self) -> dict[str, Any]:
        """The alert as JSON-ready data: what the outbox records and the webhook receives."""
        return self.model_dump(mode="json")


class DeliveryResult(StrictModel):
    """What became of an alert on one channel."""

    channel: str = Field(description="The channel's label, e.g. 'smtp:modelops_smtp' (never a URL)")
    kind: str
    delivered: bool
    attempts: int
    error: str | None = Field(default=None, description="'<type>: <message>' of the last failure, scrubbed")


# --- channels -------------------------------------------------------------------------------------------

_COMMON_FIELDS = frozenset({"kind", "attempts", "backoff_seconds"})


@dataclass(frozen=True)
class ChannelKind:
    """How one ``kind`` of channel is checked and turned into a notifier for an alert."""

    build: Callable[[ChannelConfig, Alert], BaseNotifier]
    fields: frozenset[str]
    """The :class:`ChannelConfig` fields this kind accepts, besides ``kind``, ``attempts`` and
    ``backoff_seconds``; setting any other is an error."""
    check: Callable[[ChannelConfig], None] | None = None
    """Raises ``ValueError`` when a configuration of this kind is incomplete."""


_CHANNEL_KINDS: dict[str, ChannelKind] = {}


def register_channel_kind(
    kind: str,
    build: Callable[[ChannelConfig, Alert], BaseNotifier],
    *,
    fields: Collection[str] = ("conn_id", "options"),
    check: Callable[[ChannelConfig], None] | None = None,
) -> None:
    """Make ``kind`` a channel a policy may configure; register before the policy is loaded.

    ``build(channel, alert)`` returns a fresh ``BaseNotifier`` for one attempt; :func:`deliver` calls its
    ``notify(context)``. Settings specific to the kind go in ``options`` (e.g. a Slack channel name).
    """
    unknown = set(fields) - set(ChannelConfig.model_fields)
    if unknown:
        raise ValueError(f"channel kind {kind!r}: no ChannelConfig field(s) {sorted(unknown)}")
    _CHANNEL_KINDS[kind] = ChannelKind(build=build, fields=frozenset(fields), check=check)


def channel_kinds() -> list[str]:
    """The registered channel kinds."""
    return sorted(_CHANNEL_KINDS)


class ChannelConfig(StrictModel):
    """One delivery channel of a monitoring policy's ``channels:`` list."""

    kind: str = Field(description="outbox, smtp, webhook, or a kind registered with register_channel_kind")
    conn_id: str | None = Field(default=None, min_length=1, description="smtp, webhook: Airflow connection")
    to: list[str] = Field(default_factory=list, description="smtp: recipients, besides the alert's own")
    from_email: str | None = Field(default=None, description="smtp: sender; default the connection's")
    url: str | None = Field(default=None, description="webhook without a connection: the URL to POST to")
    endpoint: str | None = Field(default=None, description="webhook with conn_id: path after its base URL")
    path: str | None = Field(
        default=None, description="outbox: the JSON-lines file; default in MODELOPS_HOME"
    )
    timeout_seconds: float = Field(default=10.0, gt=0, le=300, description="webhook: per request")
    options: dict[str, Any] = Field(default_factory=dict, description="Settings of a registered plug-in kind")
    attempts: int = Field(default=3, ge=1, le=10, description="Tries before the delivery counts as failed")
    backoff_seconds: float = Field(
        default=1.0, ge=0, le=60, description="Wait before the 2nd try; doubles for each later one"
    )

    @field_validator("to")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            if "@" not in address or any(c.isspace() or c in ",;" for c in address):
                raise ValueError(f"{address!r} is not one email address")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("url must be an http:// or https:// URL with a host")
        return value

    @model_validator(mode="after")
    def _fits_kind(self) -> ChannelConfig:
        spec = _CHANNEL_KINDS.get(self.kind)
        if spec is None:
            raise ValueError(f"unknown channel kind {self.kind!r}; known: {', '.join(channel_kinds())}")
        misplaced = sorted(self.model_fields_set - _COMMON_FIELDS - spec.fields)
        if misplaced:
            raise ValueError(f"a {self.kind} channel takes no {', '.join(misplaced)}")
        if spec.check is not None:
            spec.check(self)
        return self

    @property
    def label(self) -> str:
        """How results and logs name the channel: its kind and connection or host, never a full URL."""
        if self.conn_id:
            return f"{self.kind}:{self.conn_id}"
        if self.url:
            return f"{self.kind}:{urlsplit(self.url).hostname}"
        return self.kind


class ChannelMisconfigured(ConfigurationError):
    """A channel cannot deliver this alert whatever happens (e.g. no recipients): not retried."""


# --- outbox ---------------------------------------------------------------------------------------------


def append_line(path: Path, line: str) -> None:
    """Append ``line`` (one line of text) with a single ``write`` on an ``O_APPEND`` descriptor.

    With ``O_APPEND`` the kernel moves to the end and writes in one step, so lines from concurrent
    writers (processes or threads) never interleave or overwrite each other on a local file system.
    """
    if "\n" in line.rstrip("\n"):
        raise ValueError("an outbox line may not contain a newline")
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


class OutboxNotifier(BaseNotifier):
    """Appends the alert as one JSON line to a local outbox file and logs it to the task log.

    The embedded default channel: it needs no service, and a relay (or a person) can read the outbox.
    Usable as any notifier: ``OutboxNotifier(alert)(context)``; its fields are never templated.
    """

    template_fields: Sequence[str] = ()

    def __init__(self, alert: Alert, path: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alert = alert
        self.path = Path(path) if path is not None else None

    def notify(self, context: Context | Mapping[str, Any]) -> None:
        path = self.path or default_outbox_path()
        record = {"recorded_at": datetime.now(UTC).isoformat(), **self.alert.payload()}
        append_line(path, json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":")))
        alert = self.alert
        level = logging.INFO if alert.tier == "recovered" else logging.WARNING
        self.log.log(
            level,
            "ModelOps alert %s (%s) for %s v%s, window %s to %s: %s; written to %s",
            alert.tier.upper(),
            alert.dedup_key,
            alert.model_name,
            alert.version,
            alert.window_start.isoformat(),
            alert.window_end.isoformat(),
            alert.title,
            path,
        )


def _build_outbox(channel: ChannelConfig, alert: Alert) -> BaseNotifier:
    return OutboxNotifier(alert, path=channel.path)


# --- smtp -----------------------------------------------------------------------------------------------


def email_subject(alert: Alert) -> str:
    """One line: tier, model, version and title (no CR/LF can reach the header)."""
    subject = f"[ModelOps {alert.tier}] {alert.model_name} v{alert.version}: {alert.title}"
    return " ".join(subject.split())


def email_html(alert: Alert) -> str:
    """The mail body: every value HTML-escaped (the alert is data, not markup)."""
    e = html.escape
    return (
        f"<h2>{e(alert.title)}</h2>"
        f"<p><b>{e(alert.tier)}</b>: model {e(alert.model_name)} version {e(alert.version)}, "
        f"window {e(alert.window_start.isoformat())} to {e(alert.window_end.isoformat())}</p>"
        f'<pre style="white-space: pre-wrap">{e(alert.body)}</pre>'
        f"<p>Dedup key: <code>{e(alert.dedup_key)}</code></p>"
    )


def _check_smtp(channel: ChannelConfig) -> None:
    if not channel.conn_id:
        raise ValueError("an smtp channel needs conn_id (the Airflow SMTP connection)")


def _build_smtp(channel: ChannelConfig, alert: Alert) -> BaseNotifier:
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    recipients = list(dict.fromkeys([*channel.to, *alert.recipients]))
    if not recipients:
        raise ChannelMisconfigured(
            f"{channel.label}: no recipients (neither the channel's to nor the alert's)"
        )
    # subject and html_content are given, so notify() renders nothing; from_email=None takes the
    # connection's extra from_email (and fails when it has none).
    return SmtpNotifier(
        to=recipients,
        from_email=channel.from_email,
        subject=email_subject(alert),
        html_content=email_html(alert),
        smtp_conn_id=channel.conn_id,
        custom_headers={"X-ModelOps-Dedup-Key": alert.dedup_key, "X-ModelOps-Tier": alert.tier},
    )


# --- webhook --------------------------------------------------------------------------------------------


class WebhookRejected(Exception):
    """The webhook answered with an error status."""


class UrlWebhookNotifier(BaseNotifier):
    """POSTs JSON to a plain URL with httpx.

    For a ``webhook`` channel configured with ``url`` rather than ``conn_id``: the HTTP provider's
    ``HttpNotifier`` (used for ``conn_id``) goes through ``HttpHook``, which always looks up an Airflow
    connection, so it cannot post to a bare URL.
    """

    template_fields: Sequence[str] = ()

    def __init__(
        self,
        *,
        url: str,
        json: Any,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.url = url
        self.json = json
        self.headers = dict(headers or {})
        self.timeout = timeout

    def notify(self, context: Context | Mapping[str, Any]) -> None:
        import httpx

        response = httpx.post(self.url, json=self.json, headers=self.headers, timeout=self.timeout)
        if response.is_error:
            # Not raise_for_status(): its message holds the URL, which may hold a token.
            raise WebhookRejected(f"HTTP {response.status_code} {response.reason_phrase}")


def _check_webhook(channel: ChannelConfig) -> None:
    if bool(channel.conn_id) == bool(channel.url):
        raise ValueError("a webhook channel needs exactly one of conn_id (an HTTP connection) and url")
    if channel.endpoint is not None and channel.url:
        raise ValueError("endpoint goes with conn_id; with url, put the whole path in the url")


def _build_webhook(channel: ChannelConfig, alert: Alert) -> BaseNotifier:
    headers = {"X-ModelOps-Dedup-Key": alert.dedup_key}
    if channel.url:
        return UrlWebhookNotifier(
            url=channel.url, json=alert.payload(), headers=headers, timeout=channel.timeout_seconds
        )
    from airflow.providers.http.notifications.http import HttpNotifier

    return HttpNotifier(
        http_conn_id=channel.conn_id,
        endpoint=channel.endpoint,
        method="POST",
        json=alert.payload(),
        headers=headers,
        # HttpHook sends without a timeout unless told; check_response raises on a 4xx/5xx answer.
        extra_options={"timeout": channel.timeout_seconds, "check_response": True},
    )


register_channel_kind("outbox", _build_outbox, fields=("path",))
register_channel_kind("smtp", _build_smtp, fields=("conn_id", "to", "from_email"), check=_check_smtp)
register_channel_kind(
    "webhook", _build_webhook, fields=("conn_id", "url", "endpoint", "timeout_seconds"), check=_check_webhook
)


# --- delivery -------------------------------------------------------------------------------------------


def deliver(
    alert: Alert,
    channels: Sequence[ChannelConfig] = (),
    context: Context | Mapping[str, Any] | None = None,
) -> list[DeliveryResult]:
    """Send ``alert`` to every channel, in order, each with its own bounded retry; never raises.

    The outbox is always delivered: when ``channels`` has no ``outbox`` channel, the default one goes
    first. ``context`` is the task context (``{}`` when omitted); it is passed to each notifier's
    ``notify`` and never used to render the alert. Returns one result per channel, in delivery order.
    """
    configured = list(channels)
    if not any(channel.kind == "outbox" for channel in configured):
        configured.insert(0, ChannelConfig(kind="outbox"))
    ctx: Any = context if context is not None else {}
    return [_deliver_one(alert, channel, ctx) for channel in configured]


def _deliver_one(alert: Alert, channel: ChannelConfig, context: Any) -> DeliveryResult:
    spec = _CHANNEL_KINDS[channel.kind]
    error: Exception | None = None
    attempt = 0
    for attempt in range(1, channel.attempts + 1):
        try:
            # A fresh notifier per attempt: SmtpNotifier fills its fields and caches its hook as it runs.
            spec.build(channel, alert).notify(context)
        except ChannelMisconfigured as exc:
            error = exc
            break
        except Exception as exc:
            error = exc
            log.warning(
                "Alert %s: %s attempt %d of %d failed: %s",
                alert.dedup_key,
                channel.label,
                attempt,
                channel.attempts,
                _describe(exc, channel),
            )
            if attempt < channel.attempts and channel.backoff_seconds:
                time.sleep(channel.backoff_seconds * 2 ** (attempt - 1))
        else:
            return DeliveryResult(channel=channel.label, kind=channel.kind, delivered=True, attempts=attempt)
    described = _describe(error, channel) if error is not None else "not attempted"
    log.error("Alert %s: not delivered to %s: %s", alert.dedup_key, channel.label, described)
    return DeliveryResult(
        channel=channel.label, kind=channel.kind, delivered=False, attempts=attempt, error=described
    )


# --- error text without secrets -------------------------------------------------------------------------

_SECRET_EXTRA = re.compile(r"pass|secret|token|key|auth|credential", re.IGNORECASE)
_URL = re.compile(r"\b([a-z][a-z0-9+.-]*://)(?:[^\s/@'\"]*@)?([^\s/?#'\"]*)[^\s'\"]*", re.IGNORECASE)
_URL_PATH = re.compile(r"(\burl: )\S+")


def _channel_secrets(channel: ChannelConfig) -> set[str]:
    """Values an error message about ``channel`` must not show: the password and secret-looking extras of
    its connection, and the path, query and user info of its URLs (webhook tokens live there)."""
    secrets: set[str] = set()
    urls = [channel.url] if channel.url else []
    if channel.conn_id:
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            conn = BaseHook.get_connection(channel.conn_id)
        except AirflowNotFoundException:
            conn = None  # no connection, so no password of its to hide
        if conn is not None:
            secrets.update(filter(None, [conn.password]))
            for name, value in (conn.extra_dejson or {}).items():
                if _SECRET_EXTRA.search(name) and isinstance(value, str):
                    secrets.add(value)
            if conn.host and "://" in conn.host:
                urls.append(conn.host)
    if channel.endpoint:
        secrets.add(channel.endpoint.strip("/"))
    for url in urls:
        parts = urlsplit(url)
        secrets.update(filter(None, [parts.path.strip("/"), parts.query, parts.password, parts.username]))
    return {secret for secret in secrets if len(secret) >= 4}


def _origin_only(match: re.Match[str]) -> str:
    origin = match.group(1) + match.group(2)
    return origin if match.group(0) == origin else f"{origin}/***"


def _describe(exc: BaseException, channel: ChannelConfig) -> str:
    """``<type>: <message>``, with the channel's secrets masked, every URL cut to its scheme and host,
    and the length bounded."""
    message = str(exc)
    for secret in sorted(_channel_secrets(channel), key=len, reverse=True):
        message = message.replace(secret, "***")
    message = _URL.sub(_origin_only, message)
    message = _URL_PATH.sub(r"\1***", message)
    text = f"{type(exc).__name__}: {' '.join(message.split())}"
    return text if len(text) <= _ERROR_LIMIT else text[: _ERROR_LIMIT - 3] + "..."
