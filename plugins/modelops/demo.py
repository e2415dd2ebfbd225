"""``python -m modelops.demo up|down|status``: the embedded local stack behind ``make demo``.

``up`` builds a project-local runtime folder ``.demo/`` (git-ignored), migrates Airflow's SQLite metadata
DB, loads ``airflow_settings.yaml``, starts each Airflow component, the MLflow server and the scoring
gateway as separate process groups (never ``airflow standalone``, whose children outlive it), then runs
the six-stage lifecycle through Airflow's REST API and prints a summary. The services keep running
until ``down``. Facts are extracted by functions that return data; printing is kept apart.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from modelops import localstack
from modelops.errors import ConfigurationError, ModelOpsError
from modelops.localstack import Service
from modelops.settings import PROJECT_ROOT

ADMIN_USER = "admin"
DATASET_ROWS = 20_000
DATASET_SEED = 7
TRAFFIC_REQUESTS = 240  # one hour of the demo's traffic: 4 requests a minute, 5 rows each
STAGE_TIMEOUT_SECONDS = 6 * 60
HEALTH_TIMEOUT_SECONDS = 180
DAG_PARSE_TIMEOUT_SECONDS = 180

# Stage order; the middle three start on Airflow Asset events, not from this script.
VALIDATION_DAG = "modelops_data_validation"
TRAINING_DAG = "modelops_training"
GATE_DAG = "modelops_compliance_gate"
DEPLOYMENT_DAG = "modelops_deployment"
DRIFT_DAG = "modelops_drift_monitoring"
RETIREMENT_DAG = "modelops_retirement"
DAG_IDS = (VALIDATION_DAG, TRAINING_DAG, GATE_DAG, DEPLOYMENT_DAG, DRIFT_DAG, RETIREMENT_DAG)

# Started in this order, stopped in reverse.
SERVICE_NAMES = (
    "mlflow",
    "airflow-api-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "gateway",
)

TERMINAL_RUN_STATES = {"success", "failed"}


# --- layout and environment ----------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    airflow: int = 8080
    mlflow: int = 5000
    gateway: int = 8008

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Ports:
        def port(name: str, default: int) -> int:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise ConfigurationError(
                    f"{name}={raw!r} is not a TCP port; set it to a number like {default}"
                )
            return int(raw)

        return cls(
            airflow=port("MODELOPS_AIRFLOW_PORT", 8080),
            mlflow=port("MODELOPS_MLFLOW_PORT", 5000),
            gateway=port("MODELOPS_GATEWAY_PORT", 8008),
        )

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.airflow}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway}"


@dataclass(frozen=True)
class Layout:
    """The ``.demo/`` runtime folder."""

    root: Path

    @property
    def airflow_home(self) -> Path:
        return self.root / "airflow"

    @property
    def modelops_home(self) -> Path:
        return self.root / "modelops"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def passwords_file(self) -> Path:
        return self.airflow_home / "simple_auth_manager_passwords.json"

    @property
    def dataset_csv(self) -> Path:
        return self.modelops_home / "incoming" / "ctr_clicks.csv"

    def create(self) -> None:
        for folder in (
            self.airflow_home,
            self.modelops_home / "incoming",
            self.mlflow_dir / "artifacts",
            self.logs,
            self.run,
        ):
            folder.mkdir(parents=True, exist_ok=True)


def ensure_admin_password(passwords_file: Path) -> str:
    """The ``admin`` password of Airflow's SimpleAuthManager, created once per ``.demo/``.

    The auth manager only generates passwords for users missing from this file, so writing it first
    gives a password the summary can print.
    """
    passwords: dict[str, str] = {}
    if passwords_file.is_file() and passwords_file.read_text().strip():
        passwords = json.loads(passwords_file.read_text())
    if not passwords.get(ADMIN_USER):
        passwords[ADMIN_USER] = secrets.token_urlsafe(12)
        passwords_file.parent.mkdir(parents=True, exist_ok=True)
        passwords_file.write_text(json.dumps(passwords) + "\n")
        # A file that already existed keeps its mode on write; it holds a password, so narrow it.
        passwords_file.chmod(0o600)
    return passwords[ADMIN_USER]


def ensure_gateway_token(token_file: Path) -> str:
    """The scoring gateway's admin token, created once per ``.demo/`` (owner-only file).

    Even on loopback, staging and promoting a model version takes the token: the deployment DAG sends
    it as the ``modelops_gateway`` connection's password.
    """
    if token_file.is_file() and token_file.read_text().strip():
        return token_file.read_text().strip()
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    return token


def stack_env(layout: Layout, ports: Ports, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of every process of the stack (Airflow's settings as ``AIRFLOW__`` variables)."""
    env = dict(base)
    # A developer's own Airflow settings must not leak into the demo's.
    for name in [n for n in env if n.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_"))]:
        del env[name]
    env.pop("AIRFLOW_CONFIG", None)
    env.update(
        {
            "AIRFLOW_HOME": str(layout.airflow_home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{layout.airflow_home / 'airflow.db'}",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
            "AIRFLOW__CORE__PARALLELISM": "4",  # 2 cores
            "AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL": "5",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{ports.airflow_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(layout.passwords_file),
            # New DAG files listed every 5 s, each file re-parsed at most every 10 s, one parser (2 cores).
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            # The scheduler looks for queued Asset events and new runs every loop; keep the loop short.
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "1",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(ports.airflow),
            "AIRFLOW__API__BASE_URL": ports.airflow_url,
            "AIRFLOW__API__WORKERS": "1",
            "MODELOPS_HOME": str(layout.modelops_home),
            "MODELOPS_MLFLOW_PORT": str(ports.mlflow),
            "MODELOPS_GATEWAY_PORT": str(ports.gateway),
            "MODELOPS_AIRFLOW_PORT": str(ports.airflow),
            "MODELOPS_GATEWAY_ADMIN_TOKEN": ensure_gateway_token(
                layout.modelops_home / "gateway_admin_token"
            ),
            "MLFLOW_TRACKING_URI": ports.mlflow_url,
            "GIT_PYTHON_REFRESH": "quiet",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "PYTHONUNBUFFERED": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    return env


def predictions_url(layout: Layout) -> str:
    return f"sqlite:///{layout.modelops_home / 'predictions.db'}"


def audit_url(layout: Layout) -> str:
    return f"sqlite:///{layout.modelops_home / 'audit.db'}"


def services(
    layout: Layout, ports: Ports, env: Mapping[str, str], conn_env: Mapping[str, str]
) -> list[Service]:
    """The six processes of the stack, in start order. ``conn_env``: connections for non-Airflow ones."""
    bin_dir = Path(sys.executable).parent
    airflow = str(bin_dir / "airflow")
    log = layout.logs

    def airflow_component(name: str, *args: str, **extra: Any) -> Service:
        fields: dict[str, Any] = {"health_url": None, "cwd": layout.root, **extra}
        return Service(
            name=f"airflow-{name}",
            argv=[airflow, *args],
            env=env,
            log_file=log / f"airflow-{name}.log",
            **fields,
        )

    other_env = {**env, **conn_env}
    return [
        Service(
            name="mlflow",
            argv=[
                str(bin_dir / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{layout.mlflow_dir / 'mlflow.db'}",
                "--artifacts-destination",
                str(layout.mlflow_dir / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(ports.mlflow),
                "--workers",
                "1",
            ],
            env=other_env,
            health_url=f"{ports.mlflow_url}/health",
            log_file=log / "mlflow.log",
            port=ports.mlflow,
            port_env="MODELOPS_MLFLOW_PORT",
            cwd=layout.mlflow_dir,
            url=ports.mlflow_url,
        ),
        airflow_component(
            "api-server",
            "api-server",
            "--host",
            "127.0.0.1",
            "--port",
            str(ports.airflow),
            "--workers",
            "1",
            health_url=f"{ports.airflow_url}/api/v2/monitor/health",
            port=ports.airflow,
            port_env="MODELOPS_AIRFLOW_PORT",
            url=ports.airflow_url,
        ),
        airflow_component("scheduler", "scheduler"),
        airflow_component("dag-processor", "dag-processor"),
        airflow_component("triggerer", "triggerer"),
        Service(
            name="gateway",
            argv=[
                sys.executable,
                "-m",
                "modelops.serving",
                "--host",
                "127.0.0.1",
                "--port",
                str(ports.gateway),
            ],
            env={**other_env, "MODELOPS_PREDICTIONS_URL": predictions_url(layout)},
            health_url=f"{ports.gateway_url}/health",
            log_file=log / "gateway.log",
            port=ports.gateway,
            port_env="MODELOPS_GATEWAY_PORT",
            any_http_answer_is_up=True,  # 503 until a champion is deployed
            cwd=layout.root,
            url=f"{ports.gateway_url}/invocations",
        ),
    ]


# --- facts (pure functions over API answers) -----------------------------------------------------


def unwrap_xcom(value: Any, *, top_level: bool = True) -> Any:
    """An XCom value as the REST API returns it, decoded to plain JSON data.

    The API returns the stored serialized form: plain JSON for simple values, sometimes a JSON string,
    and Airflow's serde envelopes for typed ones. Only the stored value itself may be a JSON string:
    strings inside it are data (a summary reading "1.50" stays a string).
    """
    if isinstance(value, str) and top_level:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, dict):
        if "__data__" in value and "__classname__" in value:
            return unwrap_xcom(value["__data__"], top_level=False)
        if "__var" in value and "__type" in value:
            return unwrap_xcom(value["__var"], top_level=False)
        return {key: unwrap_xcom(item, top_level=False) for key, item in value.items()}
    if isinstance(value, list):
        return [unwrap_xcom(item, top_level=False) for item in value]
    return value


def find_summary(return_values: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``(task_id, return value)`` of the first task whose return value is a dict with a "summary"."""
    for task_id, raw in return_values.items():
        value = unwrap_xcom(raw)
        if isinstance(value, dict) and "summary" in value:
            return task_id, value
    return None


def log_excerpt(log_answer: Any, lines: int = 40) -> str:
    """The last ``lines`` lines of a task log from ``GET .../logs/{try_number}`` (JSON answer)."""
    content = log_answer.get("content", log_answer) if isinstance(log_answer, dict) else log_answer
    if isinstance(content, str):
        text_lines = content.splitlines()
    else:
        text_lines = []
        for entry in content or []:
            if isinstance(entry, dict):
                event = str(entry.get("event", ""))
                level = entry.get("level")
                stamp = entry.get("timestamp")
                prefix = " ".join(str(part) for part in (stamp, level and str(level).upper()) if part)
                text_lines.extend(f"{prefix} {line}".strip() for line in event.splitlines() or [""])
                if entry.get("error_detail"):
                    text_lines.append(json.dumps(entry["error_detail"])[:2000])
            else:
                text_lines.extend(str(entry).splitlines())
    return "\n".join(text_lines[-lines:])


@dataclass(frozen=True)
class RegisteredModelFacts:
    name: str
    latest_version: str | None
    aliases: dict[str, str]  # alias -> version

    def version_for(self, alias: str) -> str | None:
        return self.aliases.get(alias)


def registered_model_facts(answer: Mapping[str, Any]) -> RegisteredModelFacts:
    """From MLflow's ``GET /api/2.0/mlflow/registered-models/get`` answer."""
    model = answer["registered_model"]
    versions = [str(v["version"]) for v in model.get("latest_versions", [])]
    latest = max(versions, key=int) if versions else None
    aliases = {a["alias"]: str(a["version"]) for a in model.get("aliases", [])}
    return RegisteredModelFacts(name=model["name"], latest_version=latest, aliases=aliases)


@dataclass
class StageResult:
    stage: str
    dag_id: str
    run_id: str
    state: str
    seconds: float
    task_id: str | None = None
    value: dict[str, Any] = field(default_factory=dict)

    @property
    def fact(self) -> str:
        return str(self.value.get("summary", "(no summary returned)"))


def stage_line(result: StageResult) -> str:
    return f"  {result.stage:<12} {result.state:<8} {result.seconds:6.1f} s  {result.fact}"


# --- Airflow REST API ----------------------------------------------------------------------------


class AirflowApi:
    """The few REST API v2 calls the demo needs, authenticated as ``admin`` with a JWT."""

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, timeout=30, trust_env=False)
        answer = self._http.post("/auth/token", json={"username": username, "password": password})
        if answer.status_code not in (200, 201):
            raise ConfigurationError(
                f"Airflow refused the login of {username!r} ({answer.status_code}: {answer.text[:200]}); "
                "run `make down`, delete .demo/airflow/simple_auth_manager_passwords.json and retry"
            )
        self._http.headers["Authorization"] = f"Bearer {answer.json()['access_token']}"

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        answer = self._http.request(method, f"/api/v2{path}", **kwargs)
        if answer.status_code >= 400 and answer.status_code != 404:
            raise ConfigurationError(
                f"Airflow API {method} {path} answered {answer.status_code}: {answer.text[:500]}"
            )
        return answer

    def dag_exists(self, dag_id: str) -> bool:
        return self._call("GET", f"/dags/{dag_id}").status_code == 200

    def unpause(self, dag_id: str) -> None:
        answer = self._call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
        if answer.status_code == 404:
            raise ConfigurationError(
                f"DAG {dag_id} is not known to Airflow; check `airflow dags list-import-errors`"
            )

    def import_errors(self) -> list[str]:
        answer = self._call("GET", "/importErrors")
        return [
            f"{e['filename']}: {e['stack_trace'].strip().splitlines()[-1]}"
            for e in answer.json()["import_errors"]
        ]

    def trigger(self, dag_id: str, conf: Mapping[str, Any]) -> str:
        answer = self._call(
            "POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": dict(conf)}
        )
        if answer.status_code == 404:
            raise ConfigurationError(f"cannot trigger {dag_id}: Airflow does not know the DAG")
        return str(answer.json()["dag_run_id"])

    def _found(self, path: str, what: str, **kwargs: Any) -> dict[str, Any]:
        answer = self._call("GET", path, **kwargs)
        if answer.status_code == 404:
            raise ConfigurationError(f"Airflow does not know {what}; check the Airflow UI and `make status`")
        return answer.json()

    def latest_run_since(self, dag_id: str, since: datetime) -> dict[str, Any] | None:
        params = {"run_after_gte": since.isoformat(), "order_by": "-run_after", "limit": 1}
        runs = self._found(f"/dags/{dag_id}/dagRuns", f"DAG {dag_id}", params=params)["dag_runs"]
        return runs[0] if runs else None

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self._found(f"/dags/{dag_id}/dagRuns/{run_id}", f"run {run_id} of {dag_id}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
        return self._found(path, f"run {run_id} of {dag_id}")["task_instances"]

    def return_values(self, dag_id: str, run_id: str) -> dict[str, Any]:
        values = {}
        for ti in self.task_instances(dag_id, run_id):
            if ti.get("map_index", -1) != -1:
                continue
            path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{ti['task_id']}/xcomEntries/return_value"
            answer = self._call("GET", path)
            if answer.status_code == 200:
                values[ti["task_id"]] = answer.json().get("value")
        return values

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> Any:
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}"
        answer = self._call(
            "GET",
            path,
            params={"full_content": "true", "map_index": map_index},
            headers={"Accept": "application/json"},
        )
        return answer.json() if answer.status_code == 200 else {"content": [f"(no log: {answer.text[:200]})"]}

    def failure_excerpt(self, dag_id: str, run_id: str) -> str:
        failed = [ti for ti in self.task_instances(dag_id, run_id) if ti.get("state") == "failed"]
        if not failed:
            return "(no failed task instance: the run itself failed, e.g. a timeout or a removed task)"
        ti = failed[0]
        log = self.task_log(
            dag_id, run_id, ti["task_id"], max(1, int(ti.get("try_number") or 1)), ti.get("map_index", -1)
        )
        return f"task {ti['task_id']} failed; last lines of its log:\n{log_excerpt(log)}"


class StageFailed(ModelOpsError):
    """A lifecycle stage failed or timed out during ``make demo``."""


def wait_for_run(
    api: AirflowApi,
    stage: str,
    dag_id: str,
    *,
    run_id: str | None = None,
    since: datetime | None = None,
    timeout: float = STAGE_TIMEOUT_SECONDS,
    poll_seconds: float = 2.0,
) -> StageResult:
    """Wait for a run (``run_id``, or the newest run created after ``since``) to finish; fail loudly."""
    started = time.monotonic()
    run: dict[str, Any] | None = None
    while True:
        if run_id is None and since is not None:
            run = api.latest_run_since(dag_id, since)
            run_id = run["dag_run_id"] if run else None
        elif run_id is not None:
            run = api.run(dag_id, run_id)
        if run is not None and run["state"] in TERMINAL_RUN_STATES:
            break
        if time.monotonic() - started > timeout:
            where = (
                f"run {run_id} is {run['state']}" if run else "no run was started (Asset event not received?)"
            )
            raise StageFailed(
                f"stage {stage} ({dag_id}) did not finish within {timeout:.0f} s: {where}; see the Airflow UI "
                f"and .demo/logs/airflow-scheduler.log, then `make down`"
            )
        time.sleep(poll_seconds)
    assert run_id is not None
    seconds = time.monotonic() - started
    if run.get("start_date") and run.get("end_date"):
        seconds = (
            datetime.fromisoformat(run["end_date"]) - datetime.fromisoformat(run["start_date"])
        ).total_seconds()
    if run["state"] != "success":
        raise StageFailed(
            f"stage {stage} ({dag_id}) run {run_id} failed.\n{api.failure_excerpt(dag_id, run_id)}"
        )
    found = find_summary(api.return_values(dag_id, run_id))
    task_id, value = found if found else (None, {})
    return StageResult(
        stage=stage,
        dag_id=dag_id,
        run_id=run_id,
        state=run["state"],
        seconds=seconds,
        task_id=task_id,
        value=value,
    )


# --- up / down / status --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {message}", flush=True)


def _run_cli(argv: Sequence[str], env: Mapping[str, str], log_file: Path, what: str) -> None:
    with log_file.open("ab") as log:
        result = subprocess.run(list(argv), env=dict(env), stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise ConfigurationError(
            f"{what} failed (exit {result.returncode}); last lines of {log_file}:\n{localstack.log_tail(log_file)}"
        )


def running_services(run_dir: Path) -> list[str]:
    return [state.name for state in localstack.status(run_dir) if state.running]


def start_stack(layout: Layout, stack: Sequence[Service], say: Callable[[str], None]) -> dict[str, float]:
    """Start every service, then wait for all in parallel; returns each one's start-up seconds."""
    for service in stack:
        localstack.check_port(service)
    started_at = time.monotonic()
    for service in stack:
        localstack.start(service, layout.run)
    timings: dict[str, float] = {}

    def wait(service: Service) -> None:
        localstack.wait_healthy(service, HEALTH_TIMEOUT_SECONDS, layout.run)
        timings[service.name] = time.monotonic() - started_at
        say(f"{service.name} up after {timings[service.name]:.1f} s")

    with ThreadPoolExecutor(max_workers=len(stack)) as pool:
        futures = [pool.submit(wait, service) for service in stack]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]
    return timings


def wait_for_dags(
    api: AirflowApi, dag_ids: Sequence[str], timeout: float = DAG_PARSE_TIMEOUT_SECONDS
) -> None:
    deadline = time.monotonic() + timeout
    missing = list(dag_ids)
    while missing:
        missing = [dag_id for dag_id in missing if not api.dag_exists(dag_id)]
        if not missing:
            return
        if time.monotonic() > deadline:
            problems = api.import_errors()
            detail = ("; import errors: " + " | ".join(problems)) if problems else ""
            raise StageFailed(
                f"the dag-processor has not parsed {', '.join(missing)} within {timeout:.0f} s{detail}; "
                "see .demo/logs/airflow-dag-processor.log"
            )
        time.sleep(2)


def make_prediction(gateway_url: str) -> tuple[dict[str, Any], Any]:
    """One real scoring request through the gateway: (the row sent, the answer)."""
    from modelops.data.synthetic import generate_clicks
    from modelops.data.traffic import FEATURE_COLUMNS

    frame = generate_clicks(1, seed=2024)
    row = {column: frame[column].tolist()[0] for column in FEATURE_COLUMNS}
    payload = {"dataframe_split": {"columns": list(FEATURE_COLUMNS), "data": [list(row.values())]}}
    answer = httpx.post(f"{gateway_url}/invocations", json=payload, timeout=30, trust_env=False)
    answer.raise_for_status()
    return row, answer.json()


def up() -> int:
    say = Clock()
    layout = Layout(localstack.demo_dir())
    still_running = running_services(layout.run)
    if still_running:
        print(
            f"services from a previous `make demo` still run ({', '.join(still_running)}); "
            "run `make down` first",
            file=sys.stderr,
        )
        return 1
    ports = Ports.from_env(os.environ)
    layout.create()
    password = ensure_admin_password(layout.passwords_file)
    env = stack_env(layout, ports, os.environ)
    # This process reads the same settings files (MODELOPS_HOME expansion, the dataset folder).
    os.environ.update(
        {k: v for k, v in env.items() if k.startswith("MODELOPS_") or k == "MLFLOW_TRACKING_URI"}
    )

    from modelops import airflow_settings

    settings = airflow_settings.load_settings_file()
    stack = services(layout, ports, env, airflow_settings.as_env(settings))
    for service in stack:
        localstack.check_port(service)
    say(f"runtime folder {layout.root}")

    t0 = time.monotonic()
    _run_cli(
        [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
        env,
        layout.logs / "airflow-db-migrate.log",
        "airflow db migrate",
    )
    say(f"airflow db migrate done ({time.monotonic() - t0:.1f} s)")
    t0 = time.monotonic()
    airflow_settings.apply(settings, env)
    say(
        f"airflow_settings.yaml loaded: {len(settings.connections)} connections, {len(settings.pools)} pools, {len(settings.variables)} variables ({time.monotonic() - t0:.1f} s)"
    )

    say("starting " + ", ".join(s.name for s in stack))
    try:
        start_stack(layout, stack, say)
    except ModelOpsError:
        print("start-up failed; stopping what was started", file=sys.stderr)
        down(quiet=True)
        raise

    from modelops.data.synthetic import generate_clicks, write_csv

    write_csv(generate_clicks(DATASET_ROWS, seed=DATASET_SEED), layout.dataset_csv)
    from modelops.storage import as_storage_path, sha256_of

    dataset_hash, _ = sha256_of(as_storage_path(layout.dataset_csv))
    say(f"dataset {layout.dataset_csv} ({DATASET_ROWS} rows, sha256 {dataset_hash[:12]})")

    api = AirflowApi(ports.airflow_url, ADMIN_USER, password)
    wait_for_dags(api, DAG_IDS)
    for dag_id in DAG_IDS:
        api.unpause(dag_id)
    say(f"{len(DAG_IDS)} DAGs parsed and unpaused")

    results: dict[str, StageResult] = {}

    def record(result: StageResult) -> None:
        results[result.stage] = result
        print(stage_line(result), flush=True)

    since = datetime.now(UTC)
    run_id = api.trigger(VALIDATION_DAG, {"dataset_uri": str(layout.dataset_csv.resolve())})
    record(wait_for_run(api, "validation", VALIDATION_DAG, run_id=run_id))
    record(wait_for_run(api, "training", TRAINING_DAG, since=since))
    record(wait_for_run(api, "gate", GATE_DAG, since=since))
    record(wait_for_run(api, "deployment", DEPLOYMENT_DAG, since=since))

    from modelops.data.traffic import simulate_traffic

    window_start = datetime.now(UTC)
    traffic = simulate_traffic(ports.gateway_url, requests=TRAFFIC_REQUESTS)
    window_end = datetime.now(UTC)
    say(f"traffic: {traffic.ok} ok, {traffic.failed} failed, {traffic.rows_scored} rows scored")
    conf = {"window_start": window_start.isoformat(), "window_end": window_end.isoformat()}
    record(wait_for_run(api, "monitoring", DRIFT_DAG, run_id=api.trigger(DRIFT_DAG, conf)))
    record(wait_for_run(api, "retirement", RETIREMENT_DAG, run_id=api.trigger(RETIREMENT_DAG, {})))

    from modelops.audit import AuditStore
    from modelops.settings import platform_settings

    model_name = platform_settings().served_model
    answer = httpx.get(
        f"{ports.mlflow_url}/api/2.0/mlflow/registered-models/get",
        params={"name": model_name},
        trust_env=False,
    )
    answer.raise_for_status()
    model = registered_model_facts(answer.json())
    row, prediction = make_prediction(ports.gateway_url)
    audit = AuditStore(audit_url(layout)).verify()

    print()
    print("ModelOps demo: summary")
    print(f"  dataset         {layout.dataset_csv} sha256 {dataset_hash}")
    aliases = ", ".join(f"{alias}=v{version}" for alias, version in sorted(model.aliases.items())) or "none"
    print(f"  model           {model.name} latest v{model.latest_version}; aliases {aliases}")
    print(f"  gate            {results['gate'].fact}")
    print(f"  serving         POST {ports.gateway_url}/invocations")
    print(f"    one row       {json.dumps(row, default=str)}")
    print(f"    answer        {json.dumps(prediction, default=str)}")
    print(f"  drift           {results['monitoring'].fact}")
    chain = (
        f"verified, {audit.count} records"
        if audit.ok
        else f"BROKEN after {audit.count} records: {audit.problem}"
    )
    print(f"  audit chain     {chain}")
    print(f"  Airflow UI      {ports.airflow_url}  (login {ADMIN_USER} / {password})")
    print(f"  MLflow UI       {ports.mlflow_url}")
    print(f"  logs            {layout.logs}/ (one file per service)")
    print(f"  wall time       {time.monotonic() - say.start:.0f} s")
    print("  services keep running until `make down`")
    return 0 if audit.ok else 1


def down(quiet: bool = False) -> int:
    run_dir = Layout(localstack.demo_dir()).run
    known = [name for name in SERVICE_NAMES if localstack.pid_file(name, run_dir).exists()]
    others = (
        sorted(p.stem for p in run_dir.glob("*.pid") if p.stem not in SERVICE_NAMES)
        if run_dir.is_dir()
        else []
    )
    stopped = 0
    for name in [*others, *reversed(known)]:
        outcome = localstack.stop(name, run_dir)
        if outcome in ("stopped", "killed"):
            stopped += 1
            if not quiet:
                print(f"stopped {name}" + (" (had to SIGKILL)" if outcome == "killed" else ""))
    if not quiet and stopped == 0:
        print("nothing was running")
    return 0


def status() -> int:
    layout = Layout(localstack.demo_dir())
    ports = Ports.from_env(os.environ)
    urls = {
        "mlflow": ports.mlflow_url,
        "airflow-api-server": ports.airflow_url,
        "gateway": f"{ports.gateway_url}/invocations",
    }
    states = {state.name: state for state in localstack.status(layout.run)}
    if not any(state.running for state in states.values()):
        print("nothing is running (start it with `make demo`)")
        return 0
    for name in SERVICE_NAMES:
        state = states.get(name)
        running = state is not None and state.running
        detail = f"pid {state.pid}, {state.processes} processes" if running and state else "not running"
        url = f"  {urls[name]}" if name in urls and running else ""
        print(f"  {name:<22} {detail}{url}")
    if layout.passwords_file.is_file():
        print(f"  Airflow login: {ADMIN_USER} / {ensure_admin_password(layout.passwords_file)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelops.demo", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    try:
        return {"up": up, "down": down, "status": status}[args.command]()
    except ModelOpsError as exc:
        print(f"\nmake demo: {exc}", file=sys.stderr)
        if args.command == "up":
            print(
                "services that started keep running for inspection; `make down` stops them", file=sys.stderr
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())
