"""The reference a monitoring window is compared with, profiled once per model version and reused.

A :class:`ReferenceProfile` holds what every window's assessment needs of the reference, and nothing more:

* the fixed-seed sample of ``reference_sample_rows`` rows the drift statistics compare with;
* each numeric feature's range and each categorical feature's categories over the *whole* reference (the
  out-of-range and unseen-category counts);
* the model's predictions on the sample (prediction drift), when they could be computed.

Building it reads the whole reference (a training set of a million rows takes seconds); reading it back
takes milliseconds. It is written once per version and source as canonical JSON, so building it again
from the same reference gives the same bytes and the same sha256, which the audit log records
(``monitoring.reference_set``): a profile whose bytes differ from its record is not used.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from modelops.settings import ModelSpec

PROFILE_FORMAT = 1
SAMPLE_SEED = 0
"""Fixed seed: the same reference always gives the same sample, so a backfill reproduces its verdict."""


@dataclass(frozen=True)
class ReferenceProfile:
    """See the module docstring. ``source`` is ``training_data`` or ``production_window``."""

    source: str
    source_sha256: str
    rows: int
    sample: dict[str, list[Any]]
    ranges: dict[str, list[float | None]]
    categories: dict[str, list[str]]
    predictions: list[float] | None = None
    predictions_note: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    format: int = PROFILE_FORMAT

    @property
    def sample_rows(self) -> int:
        return len(next(iter(self.sample.values()), []))

    def to_json(self) -> bytes:
        # Canonical: sorted keys, no whitespace, NaN as null; floats print as their shortest repr, which
        # reads back to the same float64.
        return json.dumps(
            _finite(asdict(self)), sort_keys=True, separators=(",", ":"), allow_nan=False
        ).encode()

    @property
    def sha256(self) -> str:
        # Cached: a profile is immutable, and its canonical JSON of a 5,000-row sample takes ~0.1 s.
        cached = self.__dict__.get("_sha256")
        if cached is None:
            cached = hashlib.sha256(self.to_json()).hexdigest()
            object.__setattr__(self, "_sha256", cached)
        return cached

    @classmethod
    def from_json(cls, data: bytes) -> ReferenceProfile:
        payload = json.loads(data)
        if not isinstance(payload, dict) or payload.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a reference profile of format {PROFILE_FORMAT}")
        return cls(**payload)

    def sample_frame(self, spec: ModelSpec) -> pd.DataFrame:
        """The sample as a DataFrame of the spec's features (numeric ones float64, nulls as NaN)."""
        import pandas as pd

        data: dict[str, Any] = {}
        for column in spec.features:
            values = self.sample.get(column, [])
            if column in spec.numeric_features:
                numbers = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce")
                data[column] = numbers.astype("float64").to_numpy()
            else:
                data[column] = pd.Series(values, dtype=object)
        return pd.DataFrame(data)

    def prediction_array(self) -> np.ndarray | None:
        import numpy as np

        if self.predictions is None:
            return None
        return np.array([np.nan if v is None else v for v in self.predictions], dtype="float64")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _scalar(value: Any) -> Any:
    """A JSON scalar for a sample value: numpy scalars unwrapped, NaN as None (as JSON will hold it), anything
    else that is not one as text."""
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def sample_of(reference: pd.DataFrame, rows: int) -> pd.DataFrame:
    """The fixed-seed sample of at most ``rows`` rows, in the reference's own row order."""
    if len(reference) > rows:
        return reference.sample(rows, random_state=SAMPLE_SEED).sort_index()
    return reference


def numeric_ranges(reference: pd.DataFrame, numeric: list[str]) -> dict[str, list[float | None]]:
    """``[min, max]`` of each numeric feature over the whole reference (None when it has no value)."""
    import pandas as pd

    ranges: dict[str, list[float | None]] = {}
    for column in numeric:
        values = pd.to_numeric(reference[column], errors="coerce")
        low, high = values.min(), values.max()
        ranges[column] = [None if pd.isna(low) else float(low), None if pd.isna(high) else float(high)]
    return ranges


def build_profile(
    reference: pd.DataFrame,
    spec: ModelSpec,
    *,
    sample_rows: int,
    source: str,
    source_sha256: str,
    predictions: list[float] | None = None,
    predictions_note: str = "",
    details: dict[str, Any] | None = None,
) -> ReferenceProfile:
    """Profile ``reference`` (its spec features); ``predictions``, if given, are the model's outputs on the
    rows of :func:`sample_of` ``(reference, sample_rows)``, in that order."""
    sample = sample_of(reference[spec.features], sample_rows)
    if predictions is not None and len(predictions) != len(sample):
        raise ValueError(f"{len(predictions)} predictions for a sample of {len(sample)} rows")
    categories = {
        column: sorted(set(reference[column].dropna().astype(str))) for column in spec.categorical_features
    }
    return ReferenceProfile(
        source=source,
        source_sha256=source_sha256,
        rows=len(reference),
        sample={column: [_scalar(v) for v in sample[column].tolist()] for column in spec.features},
        ranges=numeric_ranges(reference, spec.numeric_features),
        categories=categories,
        predictions=None if predictions is None else [_scalar(float(v)) for v in predictions],
        predictions_note=predictions_note,
        details=dict(details or {}),
    )


def frame_sha256(frame: pd.DataFrame) -> str:
    """A sha256 of a frame's columns and values (names, dtypes, then each column's bytes), deterministic
    across runs: what a production-window reference was built from, so a rebuild can be compared."""
    import numpy as np

    digest = hashlib.sha256()
    for column in frame.columns:
        values = frame[column]
        digest.update(f"{column}\x1f{values.dtype}\x1e".encode())
        if values.dtype.kind in "biuf":
            digest.update(np.ascontiguousarray(values.to_numpy(dtype="float64")).tobytes())
        elif values.dtype.kind == "M":
            digest.update(np.ascontiguousarray(values.to_numpy().astype("int64")).tobytes())
        else:
            digest.update("\x1f".join("\x00" if v is None else str(v) for v in values.tolist()).encode())
    return digest.hexdigest()
