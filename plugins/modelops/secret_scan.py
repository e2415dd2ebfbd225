"""Credential-like values in a model version's params, tags, input example and config files.

A model version is shared with everyone who can read the registry: a password typed into a training
param, a tracking URI with ``user:password@`` or an access key pasted into a config file would leak with
it. The compliance gate refuses such a version; this module finds the values, using the maintained
detector `detect-secrets <https://github.com/Yelp/detect-secrets>`_ (1.5) with an explicit plugin set.

A finding names *where* and *what kind*, never the value, nor a hash of it: a short password's hash is
brute-forced in seconds, and the finding ends up in the audit log and in reports.

Pure Python: imports neither Airflow nor MLflow.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

from detect_secrets.core.potential_secret import PotentialSecret
from detect_secrets.core.scan import _process_line_based_plugins
from detect_secrets.settings import transient_settings
from detect_secrets.transformers import get_transformed_file
from detect_secrets.types import NamedIO

log = logging.getLogger(__name__)

# Which detect-secrets plugins run, and why. Explicit, so an upgrade of detect-secrets that adds a plugin
# does not change what the gate decides without a review here.
PLUGINS: Final[tuple[dict[str, Any], ...]] = (
    # Vendor-specific formats: precise patterns, practically no false alarms.
    {"name": "AWSKeyDetector"},
    {"name": "ArtifactoryDetector"},
    {"name": "AzureStorageKeyDetector"},
    {"name": "DiscordBotTokenDetector"},
    {"name": "GitHubTokenDetector"},
    {"name": "GitLabTokenDetector"},
    {"name": "JwtTokenDetector"},
    {"name": "MailchimpDetector"},
    {"name": "NpmDetector"},
    {"name": "OpenAIDetector"},
    {"name": "PypiTokenDetector"},
    {"name": "SendGridDetector"},
    {"name": "SlackDetector"},
    {"name": "SquareOAuthDetector"},
    {"name": "StripeDetector"},
    {"name": "TelegramBotTokenDetector"},
    {"name": "TwilioKeyDetector"},
    {"name": "IbmCloudIamDetector"},
    {"name": "IbmCosHmacDetector"},
    {"name": "CloudantDetector"},
    {"name": "SoftlayerDetector"},
    # Generic shapes: "-----BEGIN ... PRIVATE KEY-----", scheme://user:password@host, and a value
    # assigned to a name such as password/secret/api_key.
    {"name": "PrivateKeyDetector"},
    {"name": "BasicAuthDetector"},
    {"name": "KeywordDetector"},
    # Random-looking strings, at detect-secrets' default limits. Base64HighEntropyString never flags
    # pure hex (at most 4 bits per character, below its 4.5 limit). HexHighEntropyString does flag our
    # own legitimate hex digests (the sha256 of data, reports and files, git commit ids): rather than
    # disable it, which would miss hex API tokens, a hex finding is dropped only when it is exactly a
    # digest's length AND labelled as one (see _is_labelled_digest).
    {"name": "Base64HighEntropyString", "limit": 4.5},
    {"name": "HexHighEntropyString", "limit": 3.0},
    # Not IPPublicDetector: a public IP is not a credential.
)

# detect-secrets' own heuristics against false alarms, listed so that they are part of the review.
FILTERS: Final[tuple[dict[str, Any], ...]] = tuple(
    {"path": f"detect_secrets.filters.{path}"}
    for path in (
        "allowlist.is_line_allowlisted",  # a "# pragma: allowlist secret" comment
        "heuristic.is_sequential_string",  # ABCDEF..., 0123...
        "heuristic.is_potential_uuid",
        "heuristic.is_likely_id_string",  # run_id: ..., model_id: ... (entropy and keyword plugins only)
        "heuristic.is_templated_secret",  # {password}, <password>, ${PASSWORD}
        "heuristic.is_prefixed_with_dollar_sign",
        "heuristic.is_indirect_reference",  # password = get_password()
        "heuristic.is_not_alphanumeric_string",  # password: "********"
    )
)

_DIGEST_LENGTHS: Final = frozenset({32, 40, 64, 128})  # md5 / uuid hex, sha1 (git), sha256, sha512
_HEX: Final = re.compile(r"[0-9a-fA-F]+")
# What a digest's key or line is called: train_data_sha256, file_hash, git_commit, checksum, etag...
_DIGEST_LABEL: Final = re.compile(
    r"sha|hash|digest|checksum|commit|revision|md5|etag|fingerprint|version|uuid|(^|[^a-z])id([^a-z]|$)",
    re.IGNORECASE,
)
# Text file types keep their names (the keyword plugin picks its patterns by extension); a file without
# one (MLmodel) is YAML in an MLflow model folder.
_EXTENSIONLESS_AS: Final = ".yaml"
# Binary formats are recognised by their first bytes even when they decode as UTF-8.
_BINARY_MAGIC: Final = (b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY", b"\x1f\x8b", b"\x89PNG", b"PAR1")

# detect-secrets keeps its settings in process-global state: one scan at a time in this process.
_LOCK = threading.Lock()


@dataclass(frozen=True)
class SecretFinding:
    """A credential-like value: where it is and what it looks like, never the value itself."""

    where: str
    """``param:<key>``, ``tag:<key>`` or ``file:<relative path> line <n>``."""
    kind: str
    """The detect-secrets plugin's secret type, e.g. ``AWS Access Key``, ``Secret Keyword``."""


@dataclass(frozen=True)
class SkippedFile:
    """A file :func:`scan_text_files` did not read, and why: the gate's report says what was not scanned."""

    path: str
    reason: str


@dataclass(frozen=True)
class FileScan:
    """The outcome of :func:`scan_text_files`."""

    findings: tuple[SecretFinding, ...]
    scanned: tuple[str, ...]
    """Relative paths of the files read."""
    skipped: tuple[SkippedFile, ...]

    @property
    def clean(self) -> bool:
        return not self.findings


def scan_values(values: Mapping[str, str], *, prefix: str) -> list[SecretFinding]:
    """Findings in ``key: value`` pairs (params, tags), each at ``"<prefix>:<key>"``.

    Each pair is scanned as the YAML line ``key: "value"``, so the keyword plugin sees the key (a param
    called ``db_password`` is a password whatever its value looks like); a multi-line value is also
    scanned line by line, which is how a pasted private key looks.
    """
    findings: list[SecretFinding] = []
    with _LOCK, transient_settings(_settings()):
        for key, value in values.items():
            text = "" if value is None else str(value)
            lines = [f"{key}: {json.dumps(text)}"]
            if "\n" in text:
                lines += text.splitlines()
            where = f"{prefix}:{key}"
            for secret in _scan_lines(lines, f"{prefix}.yaml"):
                if not _is_labelled_digest(secret.secret_value, key):
                    findings.append(SecretFinding(where, secret.type))
    return _unique(findings)


def scan_text_files(folder: Path, *, max_bytes: int = 5_000_000) -> FileScan:
    """Findings in every UTF-8 text file under ``folder``, at ``"file:<relative path> line <n>"``.

    Skipped, and listed as such: files over ``max_bytes``, binaries (archives such as ``model.skops``,
    anything with a NUL byte or not valid UTF-8) and symbolic links (they may point outside the folder).
    """
    folder = Path(folder)
    findings: list[SecretFinding] = []
    scanned: list[str] = []
    skipped: list[SkippedFile] = []
    with _LOCK, transient_settings(_settings()):
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder).as_posix()
            if path.is_symlink():
                skipped.append(SkippedFile(relative, "symbolic link, not followed"))
                continue
            if not path.is_file():
                continue
            size = path.stat().st_size
            if size > max_bytes:
                skipped.append(SkippedFile(relative, f"{size} bytes, over the {max_bytes}-byte cap"))
                continue
            data = path.read_bytes()
            text = _text_of(data)
            if text is None:
                skipped.append(SkippedFile(relative, "binary (not UTF-8 text)"))
                continue
            scanned.append(relative)
            hint = path.name if path.suffix else path.name + _EXTENSIONLESS_AS
            for secret, line in _scan_text(text, hint):
                if _is_labelled_digest(secret.secret_value, _before(line, secret.secret_value)):
                    continue
                findings.append(SecretFinding(f"file:{relative} line {secret.line_number}", secret.type))
    for item in skipped:
        log.info("secret scan skipped %s: %s", item.path, item.reason)
    return FileScan(tuple(_unique(findings)), tuple(scanned), tuple(skipped))


def _settings() -> dict[str, Any]:
    return {"plugins_used": list(PLUGINS), "filters_used": list(FILTERS)}


def _scan_lines(lines: list[str], filename: str) -> list[PotentialSecret]:
    # The per-line pipeline of detect-secrets' own file scan (plugins, entropy limits, filters), fed
    # from memory. Not scan_line(): that is for ad hoc command-line use and reports high-entropy strings
    # below the configured limit too. Not scan_file(): it opens the file in the locale's encoding, and a
    # value would have to be written to disk first.
    if not lines:
        return []
    return list(_process_line_based_plugins(list(enumerate(lines, start=1)), filename=filename))


def _scan_text(text: str, filename: str) -> Iterable[tuple[PotentialSecret, str]]:
    """Each secret in a file's text, with the (transformed) line it is on.

    As detect-secrets' scan_file does, from memory: first the lines as a non-eager transformer reads
    them (YAML: every value quoted on its own line, so the entropy plugins, which need quotes, see
    unquoted YAML values too), else the raw lines; if nothing is found, the eager transformers' reading.
    """
    for eager in (False, True):
        stream = io.StringIO(text)
        stream.name = filename
        lines = get_transformed_file(cast(NamedIO, stream), use_eager_transformers=eager)
        if lines is None:
            if eager:
                return []
            lines = text.splitlines()
        lines = [line.rstrip("\n") for line in lines]
        found = _scan_lines(lines, filename)
        if found:
            return [(s, lines[s.line_number - 1] if 0 < s.line_number <= len(lines) else "") for s in found]
    return []


def _text_of(data: bytes) -> str | None:
    if data.startswith(_BINARY_MAGIC) or b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _before(line: str, value: object) -> str:
    """The text of ``line`` before ``value``: where its key is."""
    index = line.find(str(value))
    return line if index < 0 else line[:index]


def _is_labelled_digest(value: object, label: str) -> bool:
    """A hex string exactly as long as a digest, whose key or line names a digest or commit.

    Both conditions: an unlabelled 40-hex value could be an API token, and a labelled value of any
    other shape is not what a digest looks like.
    """
    text = str(value or "")
    return (
        len(text) in _DIGEST_LENGTHS
        and _HEX.fullmatch(text) is not None
        and _DIGEST_LABEL.search(label) is not None
    )


def _unique(findings: list[SecretFinding]) -> list[SecretFinding]:
    return list(dict.fromkeys(findings))
