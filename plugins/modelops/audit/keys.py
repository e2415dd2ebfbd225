"""The audit log's signing keys: every record carries an HMAC-SHA256 of its hash under a named key.

A keyring has one *current* key (signs new records) and any number of *retired* keys (verify old
records only). Rotating is adding a new current key and keeping the old one as retired: the first record
signed with the new key is an ``audit.key_rotated`` record endorsed with the old key
(:meth:`AuditStore.append <modelops.audit.chain.AuditStore.append>` writes it), so the rotation itself is
on the chain. A key that is dropped from the keyring makes every record it signed unverifiable, which
``verify`` reports by key id. Anchors of the chain's head (:mod:`modelops.audit.anchors`) are signed with
the same keyring, so a forged anchor fails as a forged record does.

Hand-written on :mod:`hmac` because the standard library does exactly this; the keyring is only the
key-id bookkeeping around it. Imports nothing of Airflow: the CLI and the gateway use it too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from modelops.errors import ConfigurationError

# 32 characters of a random token is 192+ bits: far beyond guessing, and what `secrets.token_urlsafe(32)`
# gives. Shorter secrets are refused, so a placeholder such as "changeme" never signs a record.
MIN_SECRET_LENGTH = 32
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

KEYS_ENV = "MODELOPS_AUDIT_KEYS"
"""Environment variable with the keyring as JSON, for processes outside Airflow (the CLI, the gateway)."""

KEYRING_EXAMPLE = '{"current": "k1", "keys": {"k1": "<32+ random characters>"}}'


@dataclass(frozen=True)
class AuditKeyring:
    current: str
    # Secrets stay out of repr(), so a keyring in a traceback or a log line shows key ids only.
    keys: Mapping[str, str] = field(repr=False)

    def __post_init__(self) -> None:
        for key_id, secret in self.keys.items():
            if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
                raise ConfigurationError(
                    f"audit key id {key_id!r} is not valid: use 1-64 letters, digits, '.', '_' or '-'"
                )
            if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
                raise ConfigurationError(
                    f"audit key {key_id!r} is shorter than {MIN_SECRET_LENGTH} characters; generate one "
                    "with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
        if self.current not in self.keys:
            raise ConfigurationError(
                f"the current audit key {self.current!r} is not in the keyring (key ids: "
                f"{sorted(self.keys)}); add its secret or name one of those as current"
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "the audit keyring") -> AuditKeyring:
        """``{"current": "k2", "keys": {"k2": "...", "k1": "..."}}``."""
        if not isinstance(data, Mapping) or not isinstance(data.get("keys"), Mapping):
            raise ConfigurationError(f"{source} must be a JSON object like {KEYRING_EXAMPLE}")
        current = data.get("current")
        if not isinstance(current, str):
            raise ConfigurationError(f"{source} names no current key; expected {KEYRING_EXAMPLE}")
        return cls(current=current, keys=dict(data["keys"]))

    @classmethod
    def from_json(cls, text: str, *, source: str = "the audit keyring") -> AuditKeyring:
        try:
            data = json.loads(text)
        except ValueError as exc:
            # The text holds secrets: name the position of the problem, never quote the text.
            raise ConfigurationError(
                f"{source} is not valid JSON ({exc.msg} at character {exc.pos}); expected {KEYRING_EXAMPLE}"
            ) from None
        return cls.from_mapping(data, source=source)

    @classmethod
    def from_connection_fields(
        cls, *, login: str | None, password: str | None, extra: Mapping[str, Any], source: str
    ) -> AuditKeyring:
        """An Airflow connection's fields: login = current key id, password = its secret, and
        ``extra.retired_keys`` = ``{key id: secret}`` of keys that only verify old records."""
        if not login or not password:
            raise ConfigurationError(
                f"{source} needs login = the current key id and password = its secret (32+ characters); "
                'e.g. AIRFLOW_CONN_MODELOPS_AUDIT_KEY=\'{"conn_type": "generic", "login": "k1", '
                '"password": "<secret>"}\''
            )
        retired = extra.get("retired_keys", {})
        if not isinstance(retired, Mapping):
            raise ConfigurationError(f"{source}: extra.retired_keys must map key ids to secrets")
        if login in retired:
            raise ConfigurationError(f"{source}: key {login!r} is both current and retired; keep it once")
        return cls(current=login, keys={**dict(retired), login: password})

    @property
    def key_ids(self) -> list[str]:
        return sorted(self.keys)

    def sign(self, message: str, *, key_id: str | None = None) -> str:
        """HMAC-SHA256 hex of ``message`` under ``key_id`` (default: the current key)."""
        key_id = self.current if key_id is None else key_id
        secret = self.keys.get(key_id)
        if secret is None:
            raise ConfigurationError(f"audit key {key_id!r} is not in the keyring {self.key_ids}")
        return hmac.new(secret.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()

    def knows(self, key_id: str) -> bool:
        return key_id in self.keys

    def check(self, message: str, mac: str, *, key_id: str) -> bool:
        """Whether ``mac`` is the HMAC of ``message`` under ``key_id``; False for an unknown key id too."""
        if key_id not in self.keys or not isinstance(mac, str):
            return False
        return hmac.compare_digest(self.sign(message, key_id=key_id), mac)
