"""The numeric ranges a version was trained on, and which inputs fall outside them.

Training writes ``training_ranges.json`` (``{feature: [min, max]}`` over the training rows) into the logged
model's folder, so the file is one of the version's files: the gate approves its hash, the gateway loads it
only from a download whose files match the record, and no tag or later upload can widen a range. A value a
column's type allows but the version never saw (an age of -10^18 in a ``long`` column) is then refused, or
scored and flagged, as the model's ``serving.screening.out_of_range`` says. Imports nothing of Airflow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelops.errors import ModelOpsError

TRAINING_RANGES_FILE = "training_ranges.json"


class RangesUnreadable(ModelOpsError):
    """A version's ``training_ranges.json`` is not a ``{feature: [min, max]}`` object."""


def write_ranges(folder: Path, ranges: Mapping[str, list[float | None]]) -> Path:
    """Write ``ranges`` into a model folder (sorted keys: the same ranges always hash the same)."""
    target = folder / TRAINING_RANGES_FILE
    target.write_text(json.dumps(dict(ranges), sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    return target


def read_ranges(model_dir: Path) -> dict[str, tuple[float, float]] | None:
    """The ranges in a downloaded version's folder; None for a version logged without them."""
    path = model_dir / TRAINING_RANGES_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RangesUnreadable(f"{TRAINING_RANGES_FILE} is not JSON ({type(exc).__name__})") from exc
    if not isinstance(raw, dict):
        raise RangesUnreadable(f"{TRAINING_RANGES_FILE} is not an object of feature -> [min, max]")
    ranges: dict[str, tuple[float, float]] = {}
    for column, bounds in raw.items():
        if not (isinstance(bounds, list) and len(bounds) == 2):
            raise RangesUnreadable(f"{TRAINING_RANGES_FILE}: {column!r} is not [min, max]")
        low, high = bounds
        if low is None or high is None:
            continue  # the column had no value in training: nothing to compare with
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in (low, high)) or low > high:
            raise RangesUnreadable(f"{TRAINING_RANGES_FILE}: {column!r} holds no finite [min, max]")
        ranges[str(column)] = (float(low), float(high))
    return ranges


def outside_ranges(frame: Any, ranges: Mapping[str, tuple[float, float]]) -> dict[str, int]:
    """``{column: rows outside its training range}`` for the numeric columns of ``frame`` that have one.

    Counts only, never values. Vectorised on the column arrays: a few microseconds per column.
    """
    import numpy as np

    counts: dict[str, int] = {}
    for column, (low, high) in ranges.items():
        if column not in frame.columns:
            continue
        try:
            values = np.asarray(frame[column], dtype="float64")
        except (TypeError, ValueError):
            continue  # not numeric: the signature check answers that
        outside = int(np.count_nonzero((values < low) | (values > high)))
        if outside:
            counts[column] = outside
    return counts
