"""Drift monitoring at scale: one window of N prediction rows against an N-row reference.

Two cases: the demo's 7 features (``ctr_recommender``, ``generate_clicks``) and 50 numeric features
(seeded numpy, 5 columns shifted). Every measurement runs in a fresh interpreter (a subprocess of this
script with ``--child``), so the wall time and peak RSS (``ru_maxrss`` at its end) of one step never mix
with another's; the figures exclude the interpreter start and imports but include the frames in memory.

Per case, interleaved ``peer, ours, fast`` repetitions:

* **peer**: plain Evidently ``Report([DataDriftPreset()]).run(current, reference)`` on the full frames,
  default method selection (frames read from parquet first, not timed);
* **ours**: what the monitoring task does: ``PredictionLog.window(..., features=...)`` on a SQLite log
  holding the window (written beforehand, not timed), the reference read from parquet, then
  ``assess_drift`` (which samples the reference to ``reference_sample_rows``);
* **fast**: a prototype (this file only): the feature columns read with SQLite's ``json_each`` in C, a
  reference profile built once per model version and loaded from a cache file, and the per-feature
  statistics computed with scipy (normed Wasserstein, Jensen-Shannon) on 2 threads.

Once per case: plain Evidently with the same methods and thresholds as the policy, on the full frames,
to compare per-feature verdicts; and the scipy statistics against ``assess_drift``'s on the same data.

    .venv/bin/python benchmarks/bench_monitoring.py                    # make bench: 50,000 rows
    .venv/bin/python benchmarks/bench_monitoring.py --rows 1000000     # the issue's figures (~15+ min)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _common import header  # benchmarks/ is on sys.path when a script runs

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "plugins"))

MODEL = "ctr_recommender"
ROWS_PER_REQUEST = 100
WIDE_FEATURES = 50
WIDE_SHIFTED = 5  # the first 5 wide columns drift
START = datetime(2026, 1, 1, tzinfo=UTC)
END = START + timedelta(hours=1)
CASES = ("demo", "wide")
TIMEOUT_SECONDS = 3600


# --- the data ---------------------------------------------------------------------------------------------


def spec_and_policy(case: str) -> tuple[Any, Any]:
    from modelops.settings import load_catalog

    catalog = load_catalog()
    spec = catalog.model(MODEL)
    policy = catalog.policies_for(spec).monitoring
    if case == "wide":
        names = [f"f{index:02d}" for index in range(WIDE_FEATURES)]
        spec = spec.model_copy(update={"numeric_features": names, "categorical_features": []})
    return spec, policy


def frames(case: str, rows: int) -> tuple[Any, Any]:
    """(current, reference): the current window drifts on a few features."""
    import numpy as np
    import pandas as pd

    if case == "demo":
        from modelops.data.synthetic import DriftShift, generate_clicks

        spec, _ = spec_and_policy(case)
        reference = generate_clicks(rows, seed=11)[spec.features]
        shift = DriftShift(age_shift=8.0, category_weights={"electronics": 3.0, "books": 1.0, "fashion": 1.0})
        current = generate_clicks(rows, seed=12, shift=shift)[spec.features]
        return current, reference
    names = [f"f{index:02d}" for index in range(WIDE_FEATURES)]
    rng = np.random.default_rng(5)
    reference = pd.DataFrame(rng.normal(0.0, 1.0, size=(rows, WIDE_FEATURES)), columns=names)
    values = rng.normal(0.0, 1.0, size=(rows, WIDE_FEATURES))
    values[:, :WIDE_SHIFTED] += np.linspace(0.1, 0.5, WIDE_SHIFTED)  # mean shifts of 0.1..0.5 std
    current = pd.DataFrame(values, columns=names)
    return current, reference


def setup(case: str, rows: int, folder: Path) -> dict[str, Any]:
    """Parquet files of both frames, and a SQLite prediction log holding the current window."""
    from modelops.serving.prediction_log import PredictionLog, predictions_table

    current, reference = frames(case, rows)
    current.to_parquet(folder / "current.parquet")
    reference.to_parquet(folder / "reference.parquet")
    log = PredictionLog(f"sqlite:///{folder / 'predictions.db'}")
    t0 = time.perf_counter()
    records = current.to_dict("records")
    step = (END - START) / (len(records) // ROWS_PER_REQUEST + 1)
    # Bulk insert, same columns and JSON as PredictionLog.record() writes (values are finite).
    with log.engine.begin() as conn:
        batch = []
        for number, first in enumerate(range(0, len(records), ROWS_PER_REQUEST)):
            inputs = records[first : first + ROWS_PER_REQUEST]
            batch.append(
                {
                    "request_id": f"{number:032x}",
                    "received_at": START + number * step,
                    "caller_id": f"caller-{number % 3}",
                    "model_name": MODEL,
                    "model_version": "1",
                    "status_code": 200,
                    "latency_ms": 5.0,
                    "n_rows": len(inputs),
                    "inputs": json.dumps(inputs),
                    "outputs": json.dumps([[0.9, 0.1]] * len(inputs)),
                    "error": None,
                }
            )
            if len(batch) == 1000:
                conn.execute(predictions_table.insert(), batch)
                batch = []
        if batch:
            conn.execute(predictions_table.insert(), batch)
    log.dispose()
    return {
        "log_write_s": time.perf_counter() - t0,
        "db_mb": (folder / "predictions.db").stat().st_size / 1e6,
    }


# --- what each child measures ------------------------------------------------------------------------------


def _scores(snapshot: Any) -> dict[str, dict[str, Any]]:
    """Per-feature method, value and verdict from an Evidently snapshot (as assess_drift reads them)."""
    from modelops.stages.monitoring import _drifted

    scores = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric.get("config", {})
        column = config.get("column")
        if column and config.get("method") is not None and isinstance(metric.get("value"), int | float):
            value, threshold = float(metric["value"]), float(config.get("threshold"))
            scores[column] = {
                "method": config["method"],
                "value": value,
                "drifted": _drifted(config["method"], value, threshold),
            }
    return scores


def peer(case: str, folder: Path, same_methods: bool) -> dict[str, Any]:
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    current = pd.read_parquet(folder / "current.parquet")
    reference = pd.read_parquet(folder / "reference.parquet")
    t0 = time.perf_counter()
    if same_methods:
        spec, policy = spec_and_policy(case)
        definition = DataDefinition(
            numerical_columns=spec.numeric_features, categorical_columns=spec.categorical_features
        )
        preset = DataDriftPreset(
            num_method=policy.numerical_method,
            num_threshold=policy.numerical_threshold,
            cat_method=policy.categorical_method,
            cat_threshold=policy.categorical_threshold,
        )
        snapshot = Report([preset]).run(
            current_data=Dataset.from_pandas(current, data_definition=definition),
            reference_data=Dataset.from_pandas(reference, data_definition=definition),
        )
    else:
        snapshot = Report([DataDriftPreset()]).run(current, reference)
    seconds = time.perf_counter() - t0
    return {"total_s": seconds, "scores": _scores(snapshot)}


def ours(case: str, folder: Path) -> dict[str, Any]:
    import evidently.presets  # noqa: F401  imported before timing, as in peer()
    import pandas as pd

    from modelops.serving.prediction_log import PredictionLog
    from modelops.stages.monitoring import assess_drift

    spec, policy = spec_and_policy(case)
    log = PredictionLog(f"sqlite:///{folder / 'predictions.db'}")
    t0 = time.perf_counter()
    window = log.window(MODEL, START, END, features=spec.features)
    t1 = time.perf_counter()
    rss_after_window = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reference = pd.read_parquet(folder / "reference.parquet", columns=spec.features)
    t2 = time.perf_counter()
    assessment = assess_drift(current=window[spec.features], reference=reference, spec=spec, policy=policy)
    t3 = time.perf_counter()
    return {
        "window_s": t1 - t0,
        "reference_s": t2 - t1,
        "drift_s": t3 - t2,
        "total_s": t3 - t0,
        "rows": len(window),
        "rss_after_window_kb": rss_after_window,
        "verdict": assessment.verdict,
        "out_of_range_share": assessment.out_of_range_share,
        "scores": {
            column: {"method": s["method"], "value": s["value"], "drifted": s["drifted"]}
            for column, s in assessment.feature_scores.items()
        },
    }


def build_profile(case: str, folder: Path) -> dict[str, Any]:
    """Once per model version: the reference sample assess_drift uses, pre-digested, in a small file."""
    import pickle

    import numpy as np
    import pandas as pd

    spec, policy = spec_and_policy(case)
    t0 = time.perf_counter()
    reference = pd.read_parquet(folder / "reference.parquet", columns=spec.features)
    if len(reference) > policy.reference_sample_rows:  # the same sample as assess_drift
        reference = reference.sample(policy.reference_sample_rows, random_state=0).sort_index()
    profile = {
        "rows": len(reference),
        "numeric": {
            column: {
                "values": np.sort(reference[column].to_numpy(dtype="float64")),
                "std": float(np.std(reference[column])),
                "min": float(reference[column].min()),
                "max": float(reference[column].max()),
            }
            for column in spec.numeric_features
        },
        "categorical": {
            column: reference[column].value_counts(dropna=True).to_dict()
            for column in spec.categorical_features
        },
    }
    (folder / "profile.pkl").write_bytes(pickle.dumps(profile))
    return {"total_s": time.perf_counter() - t0, "profile_kb": (folder / "profile.pkl").stat().st_size / 1024}


def read_features(
    db: Path, numeric: list[str], categorical: list[str], batch: int = 100_000
) -> dict[str, Any]:
    """The window's feature columns (and caller_id) as numpy arrays, never a Python object per value.

    SQLite's json_each splits each call's JSON array into row objects (in C); pyarrow parses them as
    newline-delimited JSON into columns (C++, multithreaded), ``batch`` rows at a time.
    """
    import io
    import sqlite3

    import numpy as np
    import pyarrow as pa
    import pyarrow.json as pj

    query = (
        "SELECT p.caller_id, j.value FROM modelops_predictions p, json_each(p.inputs) j "
        "WHERE p.model_name = ? AND p.received_at >= ? AND p.received_at < ? "
        "AND p.status_code >= 200 AND p.status_code < 300 ORDER BY p.received_at, p.request_id, j.key"
    )
    fmt = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy stores UTCDateTime on SQLite
    # Only the features; a numeric feature is float64 whatever JSON holds (int or float).
    columns = [*numeric, *categorical]
    schema = [(column, pa.float64()) for column in numeric] + [
        (column, pa.string()) for column in categorical
    ]
    parse = pj.ParseOptions(
        explicit_schema=pa.schema(schema),
        unexpected_field_behavior="ignore",
    )
    tables, callers = [], []
    with sqlite3.connect(db) as conn:
        cursor = conn.execute(
            query, (MODEL, START.replace(tzinfo=None).strftime(fmt), END.replace(tzinfo=None).strftime(fmt))
        )
        while rows := cursor.fetchmany(batch):
            caller, text = zip(*rows, strict=True)
            callers.append(np.array(caller, dtype=object))
            data = "\n".join(text).encode()
            tables.append(pj.read_json(io.BytesIO(data), parse_options=parse))
    out: dict[str, Any] = {"caller_id": np.concatenate(callers) if callers else np.array([], dtype=object)}
    table = pa.concat_tables(tables) if tables else None
    for column in columns:
        out[column] = table[column].to_numpy(zero_copy_only=False) if table is not None else np.array([])
    return out


def feature_statistic(profile: dict[str, Any], column: str, values: Any, policy: Any) -> dict[str, Any]:
    """Evidently's statistic for one column, with scipy (see evidently/legacy/calculations/stattests)."""
    import numpy as np
    import pandas as pd
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import wasserstein_distance

    if column in profile["numeric"]:
        ref = profile["numeric"][column]
        value = wasserstein_distance(ref["values"], values) / max(ref["std"], 0.001)
        return {
            "method": "Wasserstein distance (normed)",
            "value": float(value),
            "drifted": bool(value >= policy.numerical_threshold),
        }
    ref_counts = profile["categorical"][column]
    cur_counts = pd.Series(values).value_counts(dropna=True).to_dict()
    keys = sorted(set(ref_counts) | set(cur_counts), key=str)
    ref_pct = np.array([ref_counts.get(key, 0) / profile["rows"] for key in keys])
    cur_pct = np.array([cur_counts.get(key, 0) / len(values) for key in keys])
    value = float(jensenshannon(ref_pct, cur_pct))
    return {
        "method": "Jensen-Shannon distance",
        "value": value,
        "drifted": bool(value >= policy.categorical_threshold),
    }


def fast(case: str, folder: Path, workers: int = 2) -> dict[str, Any]:
    import pickle

    import pyarrow.json  # noqa: F401  imported before timing, as in peer()
    import scipy.spatial.distance  # noqa: F401
    import scipy.stats  # noqa: F401

    spec, policy = spec_and_policy(case)
    t0 = time.perf_counter()
    columns = read_features(folder / "predictions.db", spec.numeric_features, spec.categorical_features)
    t1 = time.perf_counter()
    profile = pickle.loads((folder / "profile.pkl").read_bytes())
    t2 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            column: pool.submit(feature_statistic, profile, column, columns[column], policy)
            for column in spec.features
        }
        scores = {column: future.result() for column, future in futures.items()}
    t3 = time.perf_counter()
    return {
        "window_s": t1 - t0,
        "reference_s": t2 - t1,
        "drift_s": t3 - t2,
        "total_s": t3 - t0,
        "rows": len(columns["caller_id"]),
        "scores": scores,
    }


def child(kind: str, case: str, folder: Path, rows: int) -> None:
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    if kind == "setup":
        result = setup(case, rows, folder)
    elif kind == "peer":
        result = peer(case, folder, same_methods=False)
    elif kind == "peer_same":
        result = peer(case, folder, same_methods=True)
    elif kind == "ours":
        result = ours(case, folder)
    elif kind == "profile":
        result = build_profile(case, folder)
    elif kind == "fast":
        result = fast(case, folder)
    elif kind == "fast1":
        result = fast(case, folder, workers=1)
    else:
        raise SystemExit(f"unknown child kind {kind!r}")
    result["peak_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(result, default=str))


# --- the parent --------------------------------------------------------------------------------------------


def run_child(kind: str, case: str, folder: Path, rows: int) -> dict[str, Any]:
    env = {**os.environ, "MODELOPS_HOME": str(folder / "home"), "PYTHONPATH": str(PROJECT_ROOT / "plugins")}
    result = subprocess.run(
        [sys.executable, __file__, "--child", kind, case, str(folder), "--rows", str(rows)],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"{kind} ({case}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def gib(kb: float) -> str:
    return f"{kb / 1024 / 1024:.2f}"


def med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(run[key]) for run in runs)


def bench_case(case: str, rows: int, reps: int, folder: Path) -> None:
    print(f"\n## case {case}: {rows:,} current rows vs {rows:,} reference rows")
    info = run_child("setup", case, folder, rows)
    print(
        f"# setup (not timed): log written in {info['log_write_s']:.1f} s, SQLite file {info['db_mb']:.0f} MB"
    )
    profile = run_child("profile", case, folder, rows)
    runs: dict[str, list[dict[str, Any]]] = {"peer": [], "ours": [], "fast": [], "fast1": []}
    load = []
    for _ in range(reps):  # interleaved: the machine's load drifts during the run
        for kind in runs:
            load.append(os.getloadavg()[0])
            runs[kind].append(run_child(kind, case, folder, rows))
    same = run_child("peer_same", case, folder, rows)
    print(
        f"# {reps} interleaved repetitions (peer, ours, fast, fast 1 thread); 1-min load before each run: "
        + " ".join(f"{value:.1f}" for value in load)
    )
    peer_s = med(runs["peer"], "total_s")
    print(f"{'step':<44} {'median s':>9} {'min s':>7} {'max s':>7} {'peak GiB':>9} {'x peer':>7}")

    def line(label: str, items: list[dict[str, Any]], key: str = "total_s", peak: bool = True) -> None:
        values = [float(item[key]) for item in items]
        peak_text = gib(max(item["peak_kb"] for item in items)) if peak else ""
        print(
            f"{label:<44} {statistics.median(values):>9.2f} {min(values):>7.2f} {max(values):>7.2f} "
            f"{peak_text:>9} {statistics.median(values) / peer_s:>7.3f}"
        )

    line("peer: Report([DataDriftPreset()]) full", runs["peer"])
    line("peer, policy methods (1 run)", [same])
    line("ours total: window + reference + drift", runs["ours"])
    line("  (a) PredictionLog.window", runs["ours"], "window_s", peak=False)
    print(
        f"{'      peak RSS after the window read':<44} {'':>9} {'':>7} {'':>7} "
        f"{gib(max(r['rss_after_window_kb'] for r in runs['ours'])):>9}"
    )
    line("  reference read (parquet)", runs["ours"], "reference_s", peak=False)
    line("  (b) assess_drift", runs["ours"], "drift_s", peak=False)
    line("fast total (prototype, 2 threads)", runs["fast"])
    line("  json_each window read", runs["fast"], "window_s", peak=False)
    line("  cached profile load", runs["fast"], "reference_s", peak=False)
    line("  scipy statistics, 2 threads", runs["fast"], "drift_s", peak=False)
    line("  scipy statistics, 1 thread", runs["fast1"], "drift_s", peak=False)
    print(
        f"{'profile build (once per version, 1 run)':<44} {profile['total_s']:>9.2f} {'':>7} {'':>7} "
        f"{gib(profile['peak_kb']):>9}   ({profile['profile_kb']:.0f} KiB file)"
    )

    reference_scores = same["scores"]
    ours_scores = runs["ours"][0]["scores"]
    fast_scores = runs["fast"][0]["scores"]
    features = list(reference_scores)
    agree = sum(reference_scores[f]["drifted"] == ours_scores[f]["drifted"] for f in features)
    agree_fast = sum(ours_scores[f]["drifted"] == fast_scores[f]["drifted"] for f in features)
    drifted = sorted(f for f in features if reference_scores[f]["drifted"])
    print(
        f"# verdicts: full-data Evidently (policy methods) vs assess_drift: {agree}/{len(features)} agree; "
        f"fast vs assess_drift: {agree_fast}/{len(features)}; drifted: {drifted}"
    )
    diff_scipy = max(abs(ours_scores[f]["value"] - fast_scores[f]["value"]) for f in features)
    diff_sample = max(abs(reference_scores[f]["value"] - ours_scores[f]["value"]) for f in features)
    margin = min(
        abs(ours_scores[f]["value"] - (0.25 if "Wasserstein" in ours_scores[f]["method"] else 0.1))
        for f in features
    )
    print(
        f"# statistics: max |assess_drift - scipy| on the same data {diff_scipy:.2e} (assess_drift rounds to "
        f"1e-6); max |full reference - 5k sample| {diff_sample:.4f}; closest value to its threshold {margin:.4f}"
    )
    methods = sorted({score["method"] for score in runs["peer"][0]["scores"].values()})
    print(
        f"# peer's default methods: {methods}; windows read {runs['ours'][0]['rows']:,} / "
        f"{runs['fast'][0]['rows']:,} rows"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=50_000, help="current and reference rows (issue: 1000000)"
    )
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions per step")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: demo,wide")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "CASE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, case, folder = args.child
        child(kind, case, Path(folder), args.rows)
        return 0
    header(f"drift monitoring at scale: {args.rows:,} rows per window and reference")
    print(
        "# wall seconds and peak RSS of each step in its own fresh interpreter (imports excluded from the "
        "seconds, included in the RSS)"
    )
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-monitoring-{case}-") as tmp:
            bench_case(case, args.rows, args.reps, Path(tmp))
    print("\n# load average (1/5/15 min) at end: " + " / ".join(f"{v:.2f}" for v in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
