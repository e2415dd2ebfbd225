"""Licences of a model's pip requirements, judged against an allow list and a deny list.

A registered model version ships a ``requirements.txt`` (MLflow writes one next to ``MLmodel``): whoever
serves the model installs exactly those packages, so their licences are part of what the compliance gate
approves. This module reads each requirement's licence from the *installed* distribution's metadata (the
environment the gate runs in is the one the model was trained and logged in) and decides:

- ``allowed``: the licence expression passes the policy;
- ``denied``: it needs a licence on the deny list (deny wins over allow);
- ``not allowed``: it needs a licence that is on neither list; or the requirement installs from outside
  PyPI, where no metadata of ours says what will be installed;
- ``unknown``: the metadata says nothing usable (no licence, a whole licence text, an unmapped classifier,
  an invalid expression) or the package is not installed. Unknown is never a pass: a human reviews the
  package and records the outcome in :attr:`LicencePolicy.reviewed`.

Where a licence comes from, in order: :attr:`LicencePolicy.reviewed` (a human's reading beats metadata);
PEP 639 ``License-Expression``; trove classifiers (``License :: ...``) mapped by the explicit table
:data:`CLASSIFIER_LICENCES`; the free-text ``License`` field, only when it is a short, valid SPDX
expression. Expressions are parsed and normalised with ``license-expression``'s SPDX licensing.

Pure Python: imports neither Airflow nor MLflow, so the gate, the CLI and tests call it anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import Distribution, PackageNotFoundError
from pathlib import Path
from types import MappingProxyType
from typing import Final
from urllib.parse import urlparse

from boolean import AND, OR, Expression
from license_expression import (
    ExpressionError,
    LicenseSymbol,
    LicenseWithExceptionSymbol,
    get_spdx_licensing,
)
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

ALLOWED: Final = "allowed"
DENIED: Final = "denied"
UNKNOWN: Final = "unknown"
NOT_ALLOWED: Final = "not allowed"

SOURCE_EXPRESSION: Final = "License-Expression"
SOURCE_CLASSIFIER: Final = "classifier"
SOURCE_LICENSE_FIELD: Final = "License field"
SOURCE_OVERRIDE: Final = "policy override"
SOURCE_NOT_INSTALLED: Final = "not installed"
SOURCE_NO_METADATA: Final = "no licence metadata"
SOURCE_REQUIREMENTS: Final = "requirements file"

# Trove classifier -> SPDX id. Explicit and small on purpose: a classifier that is not here is reported
# as unknown rather than guessed. A classifier naming one licence *family* without a version (e.g. "BSD
# License": 0BSD, 2-, 3- or 4-clause?) maps to a LicenseRef-* id, so a policy has to allow the family
# explicitly instead of this table pretending to know the variant. (Not "LicenseRef-Apache": the SPDX
# index of license-expression aliases that id to Apache-2.0.) A GNU classifier without a version means
# any version, which SPDX spells "-or-later" of the first one. Versioned GNU classifiers do not say
# "only" or "or later": they map to the deprecated SPDX ids (GPL-3.0...), which license-expression reads
# as "-only"; a deny pattern such as "GPL-3.0-*" catches both.
CLASSIFIER_LICENCES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "License :: OSI Approved :: MIT License": "MIT",
        "License :: OSI Approved :: MIT No Attribution License (MIT-0)": "MIT-0",
        "License :: OSI Approved :: BSD License": "LicenseRef-BSD",
        "License :: OSI Approved :: Apache Software License": "LicenseRef-Apache-family",
        "License :: OSI Approved :: Python Software Foundation License": "PSF-2.0",
        "License :: OSI Approved :: ISC License (ISCL)": "ISC",
        "License :: OSI Approved :: The Unlicense (Unlicense)": "Unlicense",
        "License :: OSI Approved :: Boost Software License 1.0 (BSL-1.0)": "BSL-1.0",
        "License :: OSI Approved :: Historical Permission Notice and Disclaimer (HPND)": "HPND",
        "License :: OSI Approved :: Universal Permissive License (UPL)": "UPL-1.0",
        "License :: OSI Approved :: zlib/libpng License": "Zlib",
        "License :: CC0 1.0 Universal (CC0 1.0) Public Domain Dedication": "CC0-1.0",
        "License :: OSI Approved :: Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
        "License :: OSI Approved :: Mozilla Public License 1.1 (MPL 1.1)": "MPL-1.1",
        "License :: OSI Approved :: Eclipse Public License 2.0 (EPL-2.0)": "EPL-2.0",
        "License :: OSI Approved :: European Union Public Licence 1.2 (EUPL 1.2)": "EUPL-1.2",
        "License :: OSI Approved :: GNU General Public License (GPL)": "GPL-1.0-or-later",
        "License :: OSI Approved :: GNU General Public License v2 (GPLv2)": "GPL-2.0",
        "License :: OSI Approved :: GNU General Public License v2 or later (GPLv2+)": "GPL-2.0-or-later",
        "License :: OSI Approved :: GNU General Public License v3 (GPLv3)": "GPL-3.0",
        "License :: OSI Approved :: GNU General Public License v3 or later (GPLv3+)": "GPL-3.0-or-later",
        "License :: OSI Approved :: GNU Library or Lesser General Public License (LGPL)": "LGPL-2.0-or-later",
        "License :: OSI Approved :: GNU Lesser General Public License v2 (LGPLv2)": "LGPL-2.0",
        "License :: OSI Approved :: GNU Lesser General Public License v2 or later (LGPLv2+)": (
            "LGPL-2.0-or-later"
        ),
        "License :: OSI Approved :: GNU Lesser General Public License v3 (LGPLv3)": "LGPL-3.0",
        "License :: OSI Approved :: GNU Lesser General Public License v3 or later (LGPLv3+)": (
            "LGPL-3.0-or-later"
        ),
        "License :: OSI Approved :: GNU Affero General Public License v3": "AGPL-3.0",
        "License :: OSI Approved :: GNU Affero General Public License v3 or later (AGPLv3+)": (
            "AGPL-3.0-or-later"
        ),
        "License :: Other/Proprietary License": "LicenseRef-Proprietary",
    }
)

# Classifiers that say nothing about which licence: skipped, so that the next source is consulted.
_NON_SPECIFIC_CLASSIFIERS: Final = frozenset({"License :: OSI Approved", "License :: DFSG approved"})

# A License field longer than this, or spanning lines, is a licence text, not an expression.
_MAX_LICENSE_FIELD = 200
_SPDX = get_spdx_licensing()


@dataclass(frozen=True)
class LicencePolicy:
    """Which licences a model's requirements may carry.

    Patterns match SPDX ids case-insensitively; a trailing ``*`` matches any id starting with the rest,
    and ``"X-*"`` also matches the bare ``X`` and ``X+`` (so ``"GPL-3.0-*"`` catches the deprecated
    ``GPL-3.0``/``GPL-3.0+`` too). A ``WITH`` exception is judged by its licence and by the whole
    ``"X WITH Y"``: an exception grants extra permissions, so it never turns a denied licence into an
    allowed one, but ``"X WITH Y"`` may be allowed on its own.
    """

    allow: tuple[str, ...]
    deny: tuple[str, ...] = ()
    reviewed: Mapping[str, str] = field(default_factory=dict)
    """Package -> SPDX expression a human read from the package's licence files, for packages whose
    metadata says nothing usable. Keys are normalised like package names; overrides metadata."""

    def __post_init__(self) -> None:
        reviewed = {}
        for package, expression in self.reviewed.items():
            parsed, problem = _parse(expression)
            if parsed is None:
                raise ValueError(f"reviewed licence of {package!r}: {problem}")
            reviewed[normalise_name(package)] = parsed.render()
        object.__setattr__(self, "reviewed", MappingProxyType(reviewed))
        object.__setattr__(self, "allow", tuple(self.allow))
        object.__setattr__(self, "deny", tuple(self.deny))


@dataclass(frozen=True)
class LicenceFinding:
    """The verdict on one requirement line, with enough detail to act on it."""

    requirement: str
    """As written in the requirements file, e.g. ``scikit-learn==1.9.1``."""
    package: str | None
    """Normalised name (PEP 503), or None when the line names no package (an option, a bare URL)."""
    version: str | None
    """Installed version consulted, None if not installed."""
    licence: str | None
    """Normalised SPDX expression, or None when unknown."""
    source: str
    verdict: str
    detail: str

    @property
    def passed(self) -> bool:
        return self.verdict == ALLOWED


@dataclass(frozen=True)
class InstalledLicence:
    """What an installed distribution's metadata says about its licence."""

    licence: str | None
    """Normalised SPDX expression, or None when the metadata says nothing usable."""
    source: str
    version: str | None
    """Installed version, None when the package is not installed."""
    note: str = ""
    """Why the licence is unknown, or what was skipped to find it."""


def normalise_name(name: str) -> str:
    """PEP 503 normalised name: ``Scikit_Learn`` and ``scikit-learn`` are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --- requirements file --------------------------------------------------------------------------------

# Options that change where pip gets packages from: each is a finding in itself.
_SOURCE_OPTIONS: Final = ("-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-e", "--editable")
# Options that pull in requirements this module would not see.
_INCLUDE_OPTIONS: Final = ("-r", "--requirement")
_PYPI_HOSTS: Final = frozenset({"pypi.org", "pypi.python.org", "files.pythonhosted.org"})
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def read_requirements(path: Path) -> list[str]:
    """The lines of a pip requirements file that say what gets installed, as written.

    Comments, blank lines and harmless options (``--hash``, ``--pre``, ``-c``...) are dropped; line
    continuations are joined. Options that make pip install from elsewhere (``--index-url``,
    ``--extra-index-url``, ``--find-links``, ``-e``) or read another file (``-r``) are kept, so that
    :func:`check_licences` reports them: what they install has no metadata here to judge.
    """
    lines: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = ""
        line = _strip_comment(line).strip()
        if not line:
            continue
        if line.startswith("-"):
            option = re.split(r"[\s=]", line, maxsplit=1)[0]
            if option in _SOURCE_OPTIONS or option in _INCLUDE_OPTIONS:
                lines.append(line)
            continue
        # Per-requirement options (``pkg==1.0 --hash=sha256:...``) follow the requirement.
        lines.append(re.split(r"\s+--?[a-z]", line, maxsplit=1)[0].strip())
    if pending.strip():
        lines.append(_strip_comment(pending).strip())
    return [line for line in lines if line]


def _strip_comment(line: str) -> str:
    # pip: a comment starts at "#" at the line start or after whitespace (a URL's #egg= fragment stays).
    return re.sub(r"(^|\s)#.*$", "", line)


# --- metadata -----------------------------------------------------------------------------------------


def licence_of(package: str, *, paths: Sequence[str] | None = None) -> InstalledLicence:
    """The licence an installed distribution declares, and where in its metadata it was found.

    ``paths`` are the folders searched for ``*.dist-info`` (default: ``sys.path``), so tests can point at
    fake distributions. Policy overrides are not applied here: see :func:`check_licences`.
    """
    distribution = _find_distribution(package, paths)
    if distribution is None:
        return InstalledLicence(None, SOURCE_NOT_INSTALLED, None, f"{package} is not installed")
    metadata = distribution.metadata
    version = distribution.version
    notes: list[str] = []

    expression = metadata.get("License-Expression")
    if expression:
        parsed, problem = _parse(expression)
        if parsed is None:
            # PEP 639 makes an invalid expression an error: do not fall back to weaker sources.
            return InstalledLicence(None, SOURCE_EXPRESSION, version, f"License-Expression: {problem}")
        return InstalledLicence(parsed.render(), SOURCE_EXPRESSION, version)

    classifiers = [c.strip() for c in metadata.get_all("Classifier") or [] if c.startswith("License ::")]
    specific = [c for c in classifiers if c not in _NON_SPECIFIC_CLASSIFIERS]
    if specific:
        unmapped = [c for c in specific if c not in CLASSIFIER_LICENCES]
        if unmapped:
            return InstalledLicence(
                None, SOURCE_CLASSIFIER, version, f"classifier not mapped to SPDX: {'; '.join(unmapped)}"
            )
        # Several licence classifiers do not say whether they are a choice or a combination: read them
        # as a combination (AND), the reading that needs every one of them to pass.
        ids = sorted({CLASSIFIER_LICENCES[c] for c in specific})
        parsed, problem = _parse(" AND ".join(ids))
        if parsed is None:  # pragma: no cover - the table holds valid ids only
            return InstalledLicence(None, SOURCE_CLASSIFIER, version, problem)
        return InstalledLicence(parsed.render(), SOURCE_CLASSIFIER, version)
    if classifiers:
        notes.append(f"classifier names no licence ({'; '.join(classifiers)})")

    text = (metadata.get("License") or "").strip()
    if text:
        if len(text) > _MAX_LICENSE_FIELD or "\n" in text:
            notes.append(f"License field is a licence text ({len(text)} characters), not an SPDX expression")
        else:
            parsed, problem = _parse(text)
            if parsed is not None:
                return InstalledLicence(parsed.render(), SOURCE_LICENSE_FIELD, version, "; ".join(notes))
            notes.append(f"License field {text!r}: {problem}")
    if not notes:
        notes.append("no License-Expression, licence classifier or License field")
    return InstalledLicence(None, SOURCE_NO_METADATA, version, "; ".join(notes))


def _find_distribution(package: str, paths: Sequence[str] | None) -> Distribution | None:
    wanted = normalise_name(package)
    kwargs = {} if paths is None else {"path": list(paths)}
    try:
        # discover() matches the normalised name; the first match is the one ``import`` would use.
        return next(iter(Distribution.discover(name=wanted, **kwargs)), None)
    except PackageNotFoundError:  # pragma: no cover - discover() yields nothing instead
        return None


def _parse(expression: str) -> tuple[Expression | None, str]:
    """A parsed SPDX expression, or None and why not. ``LicenseRef-*`` ids are valid SPDX."""
    try:
        parsed = _SPDX.parse(expression, validate=False, strict=True)
    except ExpressionError as error:
        return None, f"not a valid SPDX expression ({error})"
    if parsed is None:
        return None, "empty expression"
    unknown = [key for key in _SPDX.unknown_license_keys(parsed) if not key.startswith("LicenseRef-")]
    if unknown:
        return None, f"unknown SPDX id(s): {', '.join(unknown)}"
    return parsed, ""


# --- policy -------------------------------------------------------------------------------------------


def _matches(licence_id: str, pattern: str) -> bool:
    licence_id, pattern = licence_id.lower(), pattern.lower()
    if not pattern.endswith("*"):
        return licence_id == pattern
    prefix = pattern[:-1]
    if licence_id.startswith(prefix):
        return True
    stem = prefix[:-1] if prefix.endswith("-") else None
    return stem is not None and stem != "" and licence_id in (stem, stem + "+")


def _judge_id(candidates: Sequence[str], policy: LicencePolicy) -> str:
    if any(_matches(c, p) for c in candidates for p in policy.deny):
        return DENIED
    if any(_matches(c, p) for c in candidates for p in policy.allow):
        return ALLOWED
    return NOT_ALLOWED


def _judge(expression: Expression, policy: LicencePolicy, offending: list[str]) -> str:
    """The verdict on a parsed expression; ``offending`` collects the ids that did not pass."""
    if isinstance(expression, LicenseWithExceptionSymbol):
        whole = f"{expression.license_symbol.key} WITH {expression.exception_symbol.key}"
        verdict = _judge_id((whole, expression.license_symbol.key), policy)
        if verdict != ALLOWED:
            offending.append(f"{whole} ({verdict})")
        return verdict
    if isinstance(expression, LicenseSymbol):
        verdict = _judge_id((expression.key,), policy)
        if verdict != ALLOWED:
            offending.append(f"{expression.key} ({verdict})")
        return verdict
    if isinstance(expression, AND):
        verdicts = [_judge(arg, policy, offending) for arg in expression.args]
        if DENIED in verdicts:
            return DENIED
        return ALLOWED if all(v == ALLOWED for v in verdicts) else NOT_ALLOWED
    if isinstance(expression, OR):
        options: list[str] = []
        verdicts = [_judge(arg, policy, options) for arg in expression.args]
        if ALLOWED in verdicts:
            return ALLOWED  # one allowed option suffices: the others are not what we use
        offending.extend(options)
        # Nothing passes: "not allowed" if some option could still be allowed by a policy change.
        return NOT_ALLOWED if NOT_ALLOWED in verdicts else DENIED
    raise TypeError(f"unexpected licence expression node {expression!r}")  # pragma: no cover


def judge_expression(expression: str, policy: LicencePolicy) -> tuple[str, str]:
    """``(verdict, why)`` for an SPDX expression under ``policy``."""
    parsed, problem = _parse(expression)
    if parsed is None:
        return UNKNOWN, problem
    offending: list[str] = []
    verdict = _judge(parsed, policy, offending)
    return verdict, ", ".join(offending)


DEFAULT_POLICY: Final = LicencePolicy(
    allow=(
        "MIT",
        "MIT-0",
        "BSD-2-Clause",
        "BSD-3-Clause",
        "0BSD",
        # "License :: OSI Approved :: BSD License" (scipy, pandas): every BSD variant is permissive.
        "LicenseRef-BSD",
        "Apache-2.0",
        # "License :: OSI Approved :: Apache Software License" (mlflow): Apache 1.1 and 2.0 are both
        # permissive.
        "LicenseRef-Apache-family",
        "PSF-2.0",
        "Python-2.0",
        "ISC",
        "Zlib",
        "CC0-1.0",
        "Unlicense",
        "BSL-1.0",
        "HPND",
        # File-level copyleft: obligations only for modified MPL files, which serving a model does not do.
        "MPL-2.0",
    ),
    deny=(
        "AGPL-*",
        "GPL-*",
        "SSPL-*",
        "BUSL-*",
        "CC-BY-NC-*",
        "LicenseRef-Proprietary",
    ),
    reviewed={
        # skops 0.16.0 declares only "License :: OSI Approved"; its dist-info/licenses/LICENSE is the MIT
        # licence text ("MIT License (MIT) Copyright (C) 2021 Hugging Face Inc."). Reviewed 2026.
        "skops": "MIT",
    },
)
"""A permissive default: the six packages of a scikit-learn model (mlflow, scikit-learn, skops, numpy,
scipy, pandas) pass it as installed in this project."""


# --- check --------------------------------------------------------------------------------------------


def check_licences(
    requirements: list[str], policy: LicencePolicy, *, paths: Sequence[str] | None = None
) -> list[LicenceFinding]:
    """One finding per requirement line (from :func:`read_requirements`), in order.

    Only ``allowed`` passes. The licence consulted is the installed version's: when it does not satisfy
    the requirement's version specifier, the detail says so (licences do change between versions).
    """
    return [_check_one(line, policy, paths) for line in requirements]


def _check_one(line: str, policy: LicencePolicy, paths: Sequence[str] | None) -> LicenceFinding:
    if _is_pypi_index(line):
        return LicenceFinding(
            line, None, None, None, SOURCE_REQUIREMENTS, ALLOWED, "the index is PyPI itself"
        )
    outside = _outside_pypi(line)
    if outside is not None:
        return LicenceFinding(line, outside[0], None, None, SOURCE_REQUIREMENTS, NOT_ALLOWED, outside[1])
    try:
        requirement = Requirement(line)
    except InvalidRequirement as error:
        return LicenceFinding(
            line, None, None, None, SOURCE_REQUIREMENTS, UNKNOWN, f"cannot parse requirement: {error}"
        )
    package = normalise_name(requirement.name)
    installed = licence_of(package, paths=paths)
    notes: list[str] = []
    if installed.version is not None and requirement.specifier:
        try:
            satisfied = requirement.specifier.contains(Version(installed.version), prereleases=True)
        except InvalidVersion:
            satisfied = False
        if not satisfied:
            notes.append(
                f"installed {installed.version} does not satisfy {requirement.specifier}: "
                "the licence read is the installed version's"
            )
    if requirement.marker is not None and not requirement.marker.evaluate():
        notes.append(f"marker {requirement.marker} does not apply to this environment")

    licence, source = installed.licence, installed.source
    if package in policy.reviewed:
        licence, source = policy.reviewed[package], SOURCE_OVERRIDE
        notes.append(f"overrides the metadata: {installed.licence or installed.note or installed.source}")
    elif installed.note:
        notes.append(installed.note)

    if licence is None:
        if installed.version is None:
            detail = f"{package} is not installed: its licence cannot be read"
        else:
            detail = f"{package} {installed.version}: licence unknown"
        detail += "; review it and record it in the policy's reviewed licences"
        return LicenceFinding(line, package, installed.version, None, source, UNKNOWN, _join(detail, notes))

    verdict, why = judge_expression(licence, policy)
    if verdict == ALLOWED:
        detail = f"{package}: {licence} is allowed"
    elif verdict == DENIED:
        detail = f"{package}: {licence} is denied by policy: {why}"
    elif verdict == NOT_ALLOWED:
        detail = f"{package}: {licence} is not on the allow list: {why}"
    else:  # pragma: no cover - licences here were parsed already
        detail = f"{package}: {licence}: {why}"
    return LicenceFinding(line, package, installed.version, licence, source, verdict, _join(detail, notes))


def _join(detail: str, notes: list[str]) -> str:
    return detail if not notes else f"{detail} ({'; '.join(notes)})"


def _outside_pypi(line: str) -> tuple[str | None, str] | None:
    """``(package or None, why)`` when the line installs from outside PyPI or from an unread file."""
    if line.startswith("-"):
        parts = re.split(r"[\s=]+", line, maxsplit=1)
        option, value = parts[0], (parts[1].strip() if len(parts) > 1 else "")
        if option in _INCLUDE_OPTIONS:
            return None, f"includes another requirements file ({value}): its requirements are not reviewed"
        return None, f"installs from outside PyPI ({option} {value})"
    try:
        requirement = Requirement(line)
    except InvalidRequirement:
        if _URL.match(line) or line.startswith((".", "/", "~")) or line.startswith("file:"):
            name = re.search(r"[#&]egg=([A-Za-z0-9._-]+)", line)
            package = normalise_name(name.group(1)) if name else None
            return package, f"installs from outside PyPI ({line})"
        return None
    if requirement.url:
        return normalise_name(requirement.name), f"installs from outside PyPI ({requirement.url})"
    return None


def _is_pypi_index(line: str) -> bool:
    parts = re.split(r"[\s=]+", line, maxsplit=1)
    if parts[0] not in ("-i", "--index-url", "--extra-index-url") or len(parts) < 2:
        return False
    url = urlparse(parts[1].strip())
    return url.scheme == "https" and (url.hostname or "") in _PYPI_HOSTS
