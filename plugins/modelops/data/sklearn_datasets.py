"""Datasets this project did not generate: the ones scikit-learn ships inside its package, as CSV files.

The diabetes data (Efron et al., 2004, "Least Angle Regression") lies in ``sklearn/datasets/data/`` as
two gzipped files without a header: ten raw (unscaled) baseline measurements per patient, and disease
progression one year later. They are read from the installed package, never downloaded, and written as
one CSV with a header, the shape a team would drop into a dataset's incoming folder.

``python -m modelops.data.sklearn_datasets diabetes OUT.csv``
"""

from __future__ import annotations

import argparse
import csv
import gzip
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

DIABETES_COLUMNS = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")
DIABETES_TARGET = "progression"


def _rows(package_file: str) -> list[list[str]]:
    with resources.files("sklearn.datasets").joinpath("data", package_file).open("rb") as raw:
        with gzip.open(raw, "rt") as text:
            return [line.split() for line in text if line.strip()]


def _number(text: str) -> str:
    value = float(text)
    return str(int(value)) if value.is_integer() else repr(value)


def write_diabetes_csv(target: Path) -> int:
    """Write the diabetes data as ``target`` (header + 442 rows); returns the number of rows."""
    features = _rows("diabetes_data_raw.csv.gz")
    progression = _rows("diabetes_target.csv.gz")
    if len(features) != len(progression) or any(len(row) != len(DIABETES_COLUMNS) for row in features):
        raise ValueError(
            "scikit-learn's diabetes files do not have the expected shape (10 columns, one target per row); "
            "check the installed scikit-learn"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    with partial.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow([*DIABETES_COLUMNS, DIABETES_TARGET])
        for row, (value,) in zip(features, progression, strict=True):
            writer.writerow([_number(cell) for cell in row] + [_number(value)])
    # Renamed into place: a poller watching the folder never sees a half-written file.
    partial.rename(target)
    return len(features)


WRITERS = {"diabetes": write_diabetes_csv}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modelops.data.sklearn_datasets", description=__doc__.splitlines()[0]
    )
    parser.add_argument("dataset", choices=sorted(WRITERS))
    parser.add_argument("out", type=Path, help="CSV file to write")
    args = parser.parse_args(argv)
    rows = WRITERS[args.dataset](args.out)
    print(f"wrote {rows} rows of {args.dataset} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
