"""Parse time of each DAG file, in a fresh interpreter that has already imported ``airflow.sdk``.

What the DAG processor pays per file on every re-parse: the file's own imports and DAG construction,
not Airflow's start-up. Each file is parsed in 3 separate subprocesses (nothing cached between runs
but the OS page cache); the table shows the median, min and max, and how many DAGs the file defined.

    .venv/bin/python benchmarks/bench_dag_parse.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import header  # benchmarks/ is on sys.path when a script runs

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DAGS_DIR = PROJECT_ROOT / "dags"
RUNS = 3
TIMEOUT_SECONDS = 120

# Runs in the child: import the SDK first (not timed), then time exec of the DAG file.
_CHILD = r"""
import importlib.util, json, sys, time
t0 = time.perf_counter()
import airflow.sdk
from airflow.sdk import DAG
from airflow.sdk.definitions._internal.contextmanager import DagContext
sdk_seconds = time.perf_counter() - t0
before = set(sys.modules)
t0 = time.perf_counter()
# As the DAG processor loads a file: a named module, with DAG auto-registration on (so DAGs built by
# calling a @dag function, never assigned to a name, are found too).
name = "unusual_prefix_bench_dag_file"
spec = importlib.util.spec_from_file_location(name, sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
DagContext.current_autoregister_module_name = name
spec.loader.exec_module(module)
parse_seconds = time.perf_counter() - t0
dags = {d.dag_id for d, _ in DagContext.autoregistered_dags}
dags |= {v.dag_id for v in vars(module).values() if isinstance(v, DAG)}
tops = {m.split(".")[0] for m in set(sys.modules) - before} - {name}
heavy = sorted(tops & {"pandas", "numpy", "mlflow", "sklearn", "evidently", "great_expectations", "scipy"})
print(json.dumps({"sdk": sdk_seconds, "parse": parse_seconds, "dags": sorted(dags),
                  "modules": len(set(sys.modules) - before), "heavy": heavy}))
"""


def child_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_"))}
    env.update(
        {
            "AIRFLOW_HOME": str(tmp / "airflow"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
            "MODELOPS_HOME": str(tmp / "modelops"),
            # The DAG processor puts the plugins folder on sys.path; so does this.
            "PYTHONPATH": str(PROJECT_ROOT / "plugins"),
            "GIT_PYTHON_REFRESH": "quiet",
        }
    )
    return env


def parse_once(dag_file: Path, env: dict[str, str]) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(dag_file)],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"{dag_file.name} failed to parse:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    header("DAG file parse time (fresh interpreter, airflow.sdk already imported)")
    dag_files = sorted(DAGS_DIR.glob("*.py"))
    with tempfile.TemporaryDirectory(prefix="bench-dag-parse-") as tmp:
        env = child_env(Path(tmp))
        rows = []
        sdk_times = []
        for dag_file in dag_files:
            runs = [parse_once(dag_file, env) for _ in range(RUNS)]
            parse_ms = [float(r["parse"]) * 1000 for r in runs]
            sdk_times.extend(float(r["sdk"]) for r in runs)
            rows.append((dag_file.name, parse_ms, runs[0]))
    print(
        f"# {RUNS} subprocess runs per file; import of airflow.sdk itself (not in the table): "
        f"median {statistics.median(sdk_times) * 1000:.0f} ms"
    )
    print()
    print(
        f"{'DAG file':<34} {'median ms':>9} {'min ms':>8} {'max ms':>8} {'new modules':>11}  DAGs / heavy imports"
    )
    for name, parse_ms, first in rows:
        heavy = ", ".join(first["heavy"]) or "none"
        print(
            f"{name:<34} {statistics.median(parse_ms):>9.1f} {min(parse_ms):>8.1f} {max(parse_ms):>8.1f} "
            f"{first['modules']:>11}  {', '.join(first['dags'])} / heavy: {heavy}"
        )
    total = sum(statistics.median(parse_ms) for _, parse_ms, _ in rows)
    print(f"{'total (sum of medians)':<34} {total:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
