"""The PII matcher both the data stage (every row of a dataset) and the compliance gate (a model version's
input example and text artifacts) use, so one dataset spec's patterns mean the same thing in both places.

A finding names the pattern, where and how often; the matching value itself is never kept (only a masked
prefix for the data stage's report).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from modelops.settings import PiiPattern

TEXT_FILE_LIMIT = 20_000_000
"""Text artifacts larger than this are not read line by line: the gate reports them as unscanned."""


def mask(value: str) -> str:
    """What of a PII value may be quoted: its first two characters."""
    return value[:2] + "***" if len(value) > 2 else "***"


class PiiMatcher:
    """A dataset spec's PII patterns, compiled once."""

    def __init__(self, patterns: Sequence[PiiPattern]) -> None:
        self.patterns = [(pattern.name, re.compile(pattern.regex)) for pattern in patterns]

    def matches(self, values: pd.Series) -> dict[str, tuple[int, str]]:
        """``{pattern name: (matching values, a masked example)}`` of string ``values``."""
        found: dict[str, tuple[int, str]] = {}
        for name, regex in self.patterns:
            hits = values[values.str.contains(regex, regex=True)]
            if len(hits):
                found[name] = (len(hits), mask(str(hits.iloc[0])))
        return found


@dataclass(frozen=True)
class TextPiiHit:
    file: str
    pattern: str
    lines: int


def scan_text_files_for_pii(folder: Path, patterns: Sequence[PiiPattern]) -> list[TextPiiHit]:
    """Every UTF-8 text file under ``folder`` (binary files are the file scanner's), line by line.

    A text file too large to read is a finding of its own (pattern ``unscanned``), never a silent pass.
    """
    import pandas as pd

    matcher = PiiMatcher(patterns)
    hits: list[TextPiiHit] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        relative = path.relative_to(folder).as_posix()
        if path.stat().st_size > TEXT_FILE_LIMIT:
            with path.open("rb") as handle:
                head = handle.read(4096)
            if _is_text(head):
                hits.append(TextPiiHit(relative, "unscanned (text file over the size limit)", 0))
            continue
        data = path.read_bytes()
        if not _is_text(data):
            continue
        lines = pd.Series(data.decode("utf-8").splitlines(), dtype="object")
        for name, (count, _example) in matcher.matches(lines).items():
            hits.append(TextPiiHit(relative, name, count))
    return hits


def _is_text(data: bytes) -> bool:
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A truncated head may end mid-character.
        return exc.start >= len(data) - 3
    return True
