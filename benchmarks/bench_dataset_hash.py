"""Dataset hashing and validation: throughput and memory of stage 1.

1. ``modelops.storage.sha256_of`` on a generated ~200 MB file (local ``file://`` ObjectStoragePath):
   throughput in MB/s and the peak of Python allocations (tracemalloc) for several chunk sizes and two
   file sizes. Peak memory should follow the chunk size, not the file size.
2. ``modelops.stages.validation.validate_dataset`` (hash, Great Expectations suite, PII scan, snapshot
   and data card) on 20,000 and 200,000 rows of ``modelops.data.synthetic.generate_clicks``.

Everything is written under a temporary folder (MODELOPS_HOME too), removed at the end.

    .venv/bin/python benchmarks/bench_dataset_hash.py
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING

from _common import header  # benchmarks/ is on sys.path when a script runs

if TYPE_CHECKING:
    from modelops.settings import DatasetSpec
    from modelops.stages.validation import DatasetValidationReport

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
BIG_FILE_MIB = 200
SMALL_FILE_MIB = 50
CHUNK_SIZES = (64 * 1024, MIB, 8 * MIB)
HASH_RUNS = 3
VALIDATION_ROWS = (20_000, 200_000)


def write_file(path: Path, mib: int) -> None:
    # Random bytes, 1 MiB at a time (varied so no layer can dedupe or compress them away).
    block = os.urandom(MIB)
    with path.open("wb") as out:
        for index in range(mib):
            out.write(block[index % 251 :] + block[: index % 251])


def bench_hash(tmp: Path) -> None:
    from modelops.storage import CHUNK_BYTES, as_storage_path, sha256_of

    files = {}
    for mib in (SMALL_FILE_MIB, BIG_FILE_MIB):
        path = tmp / f"data-{mib}mib.bin"
        write_file(path, mib)
        files[mib] = as_storage_path(path)
    print(
        f"sha256_of (default chunk {CHUNK_BYTES // 1024} KiB); files {SMALL_FILE_MIB} and {BIG_FILE_MIB} MiB"
    )
    print("(throughput: median of 3 untraced runs, file in the page cache; peak: one run under tracemalloc)")
    print(f"{'chunk':>8} {'file MiB':>9} {'MB/s':>8} {'s/run':>7} {'peak Python alloc':>18}")
    for chunk in CHUNK_SIZES:
        for mib, path in files.items():
            seconds = []
            for _ in range(HASH_RUNS):
                t0 = time.perf_counter()
                digest, size = sha256_of(path, chunk_bytes=chunk)
                seconds.append(time.perf_counter() - t0)
            assert size == mib * MIB
            tracemalloc.start()
            sha256_of(path, chunk_bytes=chunk)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            median = statistics.median(seconds)
            label = f"{chunk // 1024} KiB" if chunk < MIB else f"{chunk // MIB} MiB"
            print(f"{label:>8} {mib:>9} {size / 1e6 / median:>8.0f} {median:>7.3f} {peak / MIB:>14.2f} MiB")
    import hashlib

    with open(files[BIG_FILE_MIB].path, "rb") as raw:
        t0 = time.perf_counter()
        hashlib.file_digest(raw, "sha256")
        baseline = time.perf_counter() - t0
    print(
        f"reference: hashlib.file_digest on the {BIG_FILE_MIB} MiB file: {BIG_FILE_MIB * MIB / 1e6 / baseline:.0f} MB/s"
    )


def quiet_validate(uri: str, spec: DatasetSpec) -> DatasetValidationReport:
    """validate_dataset without GX's INFO logs and progress bars ."""
    from modelops.settings import load_catalog
    from modelops.stages.validation import validate_dataset
    from modelops.storage import storage_root

    catalog = load_catalog()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return validate_dataset(uri, spec, catalog.suite_path(spec), storage_root(catalog.platform))


def bench_validation(tmp: Path) -> None:
    # GX logs every decorated function at import, and each validation, at INFO: only figures belong here.
    # (Set after Airflow configured logging, which happened when modelops.storage imported airflow.sdk.)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    t_import = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import great_expectations  # noqa: F401  (imported first so its loggers exist to be quieted)
    t_import = time.perf_counter() - t_import
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("great_expectations"):
            logging.getLogger(name).setLevel(logging.WARNING)

    from modelops.data.synthetic import generate_clicks, write_csv
    from modelops.settings import load_catalog

    spec = load_catalog().dataset("ctr_clicks")
    print()
    print(f"validate_dataset (dataset spec {spec.name!r}; hash + GX suite + PII scan + snapshot + data card)")
    print(f"{'rows':>8} {'CSV MB':>7} {'generate s':>10} {'validate s':>10} {'rows/s':>9}  passed")
    t0 = time.perf_counter() - t_import
    warm = write_csv(generate_clicks(1_000, seed=3), tmp / "incoming" / "warmup.csv")
    quiet_validate(str(warm), spec)
    print(
        f"(first call, 1,000 rows, including the import of Great Expectations: {time.perf_counter() - t0:.1f} s)"
    )
    for rows in VALIDATION_ROWS:
        t0 = time.perf_counter()
        path = write_csv(generate_clicks(rows, seed=7), tmp / "incoming" / f"clicks-{rows}.csv")
        generated = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = quiet_validate(str(path), spec)
        seconds = time.perf_counter() - t0
        print(
            f"{rows:>8,} {path.stat().st_size / 1e6:>7.1f} {generated:>10.2f} {seconds:>10.2f} "
            f"{rows / seconds:>9,.0f}  {report.passed}"
        )
        if not report.passed:
            print("  problems: " + "; ".join(report.problems()))


def main() -> int:
    header("stage 1: dataset hash throughput and memory, validation wall time")
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as tmp_name:
        tmp = Path(tmp_name)
        # Before modelops is imported: settings read these at first use.
        os.environ["MODELOPS_HOME"] = str(tmp / "modelops")
        os.environ["AIRFLOW_HOME"] = str(tmp / "airflow")
        os.environ.pop("MODELOPS_STORAGE_ROOT", None)
        os.environ.pop("MODELOPS_STORAGE_CONN_ID", None)
        os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
        sys.path.insert(0, str(PROJECT_ROOT / "plugins"))
        bench_hash(tmp)
        bench_validation(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
