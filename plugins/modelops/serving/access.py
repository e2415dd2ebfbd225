"""Who may call the scoring gateway: per-team API keys, kept only as SHA-256 digests.

A key is a high-entropy random string (:func:`new_key`), so a plain SHA-256 of it is enough to store: there
is nothing to brute-force that a salt or a slow hash would protect. The gateway reads the digests from
``MODELOPS_GATEWAY_KEYS`` (JSON ``{"<key_id>": {"team": "...", "sha256": "..."}}``; whatever deploys the
gateway may fill it from an Airflow connection's extra, the gateway itself imports no Airflow) and finds a
caller by looking the presented key's digest up in a dict: no key is compared character by character, and
no key is ever kept, logged or echoed. The caller id the prediction log records is ``<team>:<key_id>``.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from modelops.errors import ConfigurationError

KEYS_ENV = "MODELOPS_GATEWAY_KEYS"
KEYS_EXAMPLE = '{"web-shop": {"team": "growth-marketing", "sha256": "<sha256 hex of the key>"}}'
CLIENT_KEYS_ENV = "MODELOPS_GATEWAY_CLIENT_KEYS_FILE"
"""A client's own keys (a JSON file ``{"<key_id>": {"team": "...", "key": "..."}}``, owner-only): what the
traffic simulator and the demo send. Never read by the gateway."""
API_KEY_HEADER = "X-Api-Key"
KEY_PREFIX = "mok_"
"""Every key starts with it, so secret scanners and people can tell a ModelOps gateway key on sight."""
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TEAM_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def new_key() -> str:
    """A new API key: 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_entry(team: str, key: str) -> dict[str, str]:
    """What ``MODELOPS_GATEWAY_KEYS`` holds for one key: its team and digest, never the key."""
    return {"team": team, "sha256": key_digest(key)}


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: a team's key, or the platform itself (the admin token)."""

    caller_id: str
    team: str | None
    key_id: str | None
    platform: bool = False

    def may_call(self, allowed_teams: Iterable[str]) -> bool:
        return self.platform or (self.team is not None and self.team in set(allowed_teams))


class ApiKeyring:
    """The gateway's known keys by digest. Its repr names only how many keys and teams it holds."""

    def __init__(self, entries: Mapping[str, Mapping[str, str]], *, source: str = KEYS_ENV) -> None:
        by_digest: dict[str, Caller] = {}
        for key_id, entry in entries.items():
            where = f"{source}: key id {key_id!r}"
            if not isinstance(key_id, str) or not KEY_ID_PATTERN.match(key_id):
                raise ConfigurationError(
                    f"{where} is not a valid key id: use 1-64 letters, digits, '.', '_' or '-', "
                    "starting with a letter or digit"
                )
            if not isinstance(entry, Mapping) or set(entry) != {"team", "sha256"}:
                raise ConfigurationError(
                    f"{where} must be an object with exactly 'team' and 'sha256', e.g. {KEYS_EXAMPLE}; "
                    "make one with `modelops gateway create-key --team TEAM`"
                )
            team, digest = entry["team"], entry["sha256"]
            if not isinstance(team, str) or not TEAM_PATTERN.match(team):
                raise ConfigurationError(
                    f"{where}: 'team' must be a team name (letters, digits, '.', '_', '-')"
                )
            if not isinstance(digest, str) or not _SHA256_HEX.match(digest):
                raise ConfigurationError(
                    f"{where}: 'sha256' must be the 64 lowercase hex digits of the key's SHA-256 (never "
                    "the key itself); `modelops gateway create-key` prints it"
                )
            if digest in by_digest:
                raise ConfigurationError(
                    f"{where} has the same digest as key id {by_digest[digest].key_id!r}: one key, two ids; "
                    "create a new key for one of them"
                )
            by_digest[digest] = Caller(caller_id=f"{team}:{key_id}", team=team, key_id=key_id)
        self._by_digest = by_digest

    @classmethod
    def from_json(cls, text: str, *, source: str = KEYS_ENV) -> ApiKeyring:
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            # The position, not the text: the variable holds digests only, but say nothing more than needed.
            raise ConfigurationError(
                f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                f"expected e.g. {KEYS_EXAMPLE}"
            ) from None
        if not isinstance(entries, dict) or not entries:
            raise ConfigurationError(
                f"{source} must be a non-empty JSON object of key ids, e.g. {KEYS_EXAMPLE}; "
                "make entries with `modelops gateway create-key --team TEAM`"
            )
        return cls(entries, source=source)

    def authenticate(self, key: str) -> Caller | None:
        """The caller whose key this is, or None. A dict look-up on the digest: no timing on the key."""
        return self._by_digest.get(key_digest(key))

    @property
    def teams(self) -> list[str]:
        return sorted({caller.team for caller in self._by_digest.values() if caller.team})

    def __len__(self) -> int:
        return len(self._by_digest)

    def __repr__(self) -> str:
        return f"ApiKeyring({len(self)} keys, teams {self.teams})"


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request presents: ``Authorization: Bearer <key>``, else ``X-Api-Key``; None if neither."""
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = (headers.get(API_KEY_HEADER) or "").strip()
    return key or None


# --- the client side ------------------------------------------------------------------------------


def read_client_keys(path: str) -> dict[str, dict[str, str]]:
    """A client's keys file (``CLIENT_KEYS_ENV``): ``{"<key_id>": {"team": "...", "key": "..."}}``."""
    from pathlib import Path

    file = Path(path)
    try:
        data: Any = json.loads(file.read_text())
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the gateway keys file {file} ({exc.strerror}); set {CLIENT_KEYS_ENV} to a readable "
            "file (make demo writes .demo/modelops/gateway_keys.json)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"the gateway keys file {file} is not valid JSON ({exc.msg} at line {exc.lineno}); expected "
            '{"<key_id>": {"team": "...", "key": "..."}}'
        ) from None
    if not isinstance(data, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("team"), str)
        for entry in data.values()
    ):
        raise ConfigurationError(
            f"the gateway keys file {file} must map key ids to {{'team': ..., 'key': ...}} objects"
        )
    return data
