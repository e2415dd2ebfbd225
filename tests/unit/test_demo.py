"""``make demo``'s driver without a real Airflow: pure fact functions, the environment and argv of every
service, the REST client against a stand-in of Airflow's API v2, and ``down``/``status``/``up`` guards."""

from __future__ import annotations

import json
import os
import stat
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from modelops import demo, localstack
from modelops.demo import (
    AirflowApi,
    Layout,
    Ports,
    StageFailed,
    StageResult,
    ensure_admin_password,
    find_summary,
    log_excerpt,
    registered_model_facts,
    services,
    stack_env,
    stage_line,
    unwrap_xcom,
    wait_for_run,
)
from modelops.errors import ConfigurationError
from modelops.settings import PROJECT_ROOT
from tests.support import serve_in_thread

# --- pure functions ------------------------------------------------------------------------------


def _serde(value: Any) -> Any:
    """What the Task SDK stores for a return value (Airflow's serde envelopes for typed values)."""
    from airflow.sdk.serde import serialize

    return serialize(value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"summary": "ok", "rows": 3}, {"summary": "ok", "rows": 3}),
        ('{"summary": "ok", "rows": 3}', {"summary": "ok", "rows": 3}),
        ("not json at all", "not json at all"),
        (7, 7),
        (None, None),
        # Only the stored value itself may be a JSON string; strings inside it are data.
        ([1, '{"a": 1}'], [1, '{"a": 1}']),
        ('{"summary": "1.50", "note": "null"}', {"summary": "1.50", "note": "null"}),
        # BaseSerialization's envelope
        ({"__var": {"summary": "ok"}, "__type": "dict"}, {"summary": "ok"}),
    ],
)
def test_unwrap_xcom_plain_and_json_string_values(raw: Any, expected: Any) -> None:
    assert unwrap_xcom(raw) == expected


def test_unwrap_xcom_real_serde_envelopes() -> None:
    stored = _serde({"summary": "auc 0.81", "pair": (1, 2), "nested": {"t": (3,)}})
    assert stored["pair"]["__classname__"] == "builtins.tuple"  # the shape this test relies on
    expected = {"summary": "auc 0.81", "pair": [1, 2], "nested": {"t": [3]}}
    assert unwrap_xcom(stored) == expected
    assert unwrap_xcom(json.dumps(stored)) == expected  # the same, stored as a JSON string


def test_find_summary_picks_the_task_with_a_summary() -> None:
    values = {
        "load": '"a string"',
        "split": {"rows": 10},
        "train": json.dumps(_serde({"summary": "auc 0.81", "metrics": (0.81, 0.7)})),
        "later": {"summary": "not the first"},
    }
    assert find_summary(values) == ("train", {"summary": "auc 0.81", "metrics": [0.81, 0.7]})
    assert find_summary({"load": {"rows": 1}, "x": "summary", "y": None}) is None
    assert find_summary({}) is None


def _real_log_answer(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A JSON answer of ``GET .../logs/{try_number}`` built with Airflow's own response model."""
    from airflow.api_fastapi.core_api.datamodels.log import StructuredLogMessage, TaskInstancesLogResponse

    answer = TaskInstancesLogResponse.model_construct(
        continuation_token=None, content=[StructuredLogMessage.model_validate(e) for e in entries]
    )
    return json.loads(answer.model_dump_json())


FAILED_TASK_LOG = [
    {"event": "::group::Log message source details", "sources": ["/logs/dag_id=x/attempt=2.log"]},
    {"event": "::endgroup::"},
    {"timestamp": "2026-05-09T07:35:25.123456Z", "level": "info", "event": "training on 20000 rows"},
    {
        "timestamp": "2026-05-09T07:35:26Z",
        "level": "error",
        "event": "Task failed with exception",
        "logger": "task",
        "error_detail": [{"exc_type": "ValueError", "exc_value": "boom: AUC below floor", "frames": []}],
    },
]


def test_log_excerpt_of_structured_json_answer() -> None:
    answer = _real_log_answer(FAILED_TASK_LOG)
    assert set(answer) == {"content", "continuation_token"}
    excerpt = log_excerpt(answer)
    lines = excerpt.splitlines()
    assert lines[0] == "::group::Log message source details"
    assert "2026-05-09T07:35:25.123456Z INFO training on 20000 rows" in lines
    assert "2026-05-09T07:35:26Z ERROR Task failed with exception" in lines
    assert "boom: AUC below floor" in lines[-1] and "ValueError" in lines[-1]


def test_log_excerpt_keeps_the_last_lines_of_every_shape() -> None:
    text = "\n".join(f"line {i}" for i in range(100))
    for answer in (text, {"content": text, "continuation_token": None}, {"content": text.splitlines()}):
        excerpt = log_excerpt(answer)
        assert excerpt.splitlines()[0] == "line 60" and excerpt.splitlines()[-1] == "line 99"
    multi = _real_log_answer([{"event": "first\nsecond", "level": "warning"}])
    assert log_excerpt(multi).splitlines() == ["WARNING first", "WARNING second"]
    assert log_excerpt({"content": [], "continuation_token": None}) == ""
    assert log_excerpt(text, lines=2) == "line 98\nline 99"


def _mlflow_answer(versions: list[str], aliases: dict[str, str]) -> dict[str, Any]:
    """``GET /api/2.0/mlflow/registered-models/get`` as MLflow's server serializes it (its protos)."""
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel, RegisteredModelAlias
    from mlflow.protos.model_registry_pb2 import GetRegisteredModel
    from mlflow.utils.proto_json_utils import message_to_json

    model = RegisteredModel(
        name="ctr_model",
        creation_timestamp=1,
        last_updated_timestamp=2,
        latest_versions=[
            ModelVersion("ctr_model", v, 1, 1, run_id="r", status="READY", source="s") for v in versions
        ],
        aliases=[RegisteredModelAlias(alias, version) for alias, version in aliases.items()],
    )
    return json.loads(message_to_json(GetRegisteredModel.Response(registered_model=model.to_proto())))


def test_registered_model_facts_from_mlflow_rest_shape() -> None:
    answer = _mlflow_answer(["9", "10"], {"champion": "10", "previous": "9"})
    assert answer["registered_model"]["aliases"] == [
        {"alias": "champion", "version": "10"},
        {"alias": "previous", "version": "9"},
    ]
    facts = registered_model_facts(answer)
    assert facts.name == "ctr_model"
    assert facts.latest_version == "10"  # numeric order, not string order ("9" > "10")
    assert facts.aliases == {"champion": "10", "previous": "9"}
    assert facts.version_for("champion") == "10" and facts.version_for("challenger") is None

    bare = _mlflow_answer([], {})
    assert "latest_versions" not in bare["registered_model"]  # proto JSON omits empty lists
    facts = registered_model_facts(bare)
    assert (facts.latest_version, facts.aliases) == (None, {})


def test_stage_line() -> None:
    result = StageResult(
        "training", "modelops_training", "r1", "success", 12.345, "train", {"summary": "auc"}
    )
    assert stage_line(result) == "  training     success    12.3 s  auc"
    bare = StageResult("gate", "modelops_compliance_gate", "r2", "success", 1.0)
    assert stage_line(bare).endswith("1.0 s  (no summary returned)")


# --- layout, environment, services ---------------------------------------------------------------


def test_ports_from_env_defaults_and_overrides() -> None:
    assert Ports.from_env({}) == Ports(8080, 5000, 8008)
    assert Ports.from_env({"MODELOPS_AIRFLOW_PORT": "", "MODELOPS_MLFLOW_PORT": "  "}) == Ports()
    ports = Ports.from_env(
        {
            "MODELOPS_AIRFLOW_PORT": "18080",
            "MODELOPS_MLFLOW_PORT": " 15000 ",
            "MODELOPS_GATEWAY_PORT": "18008",
        }
    )
    assert ports == Ports(18080, 15000, 18008)
    assert ports.airflow_url == "http://127.0.0.1:18080"
    assert ports.mlflow_url == "http://127.0.0.1:15000"
    assert ports.gateway_url == "http://127.0.0.1:18008"


@pytest.mark.parametrize("raw", ["abc", "80a", "-1", "0", "65536", "8080.0"])
def test_ports_from_env_rejects_a_non_port(raw: str) -> None:
    with pytest.raises(ConfigurationError, match=r"MODELOPS_GATEWAY_PORT=.* is not a TCP port.*like 8008"):
        Ports.from_env({"MODELOPS_GATEWAY_PORT": raw})


def test_ensure_admin_password_is_created_once(tmp_path: Path) -> None:
    passwords_file = tmp_path / "airflow" / "simple_auth_manager_passwords.json"
    password = ensure_admin_password(passwords_file)
    assert len(password) >= 12
    assert json.loads(passwords_file.read_text()) == {"admin": password}
    assert stat.S_IMODE(passwords_file.stat().st_mode) == 0o600
    assert ensure_admin_password(passwords_file) == password
    assert json.loads(passwords_file.read_text()) == {"admin": password}


def test_ensure_admin_password_keeps_other_users(tmp_path: Path) -> None:
    passwords_file = tmp_path / "passwords.json"
    passwords_file.write_text(json.dumps({"viewer": "v-pass"}))
    password = ensure_admin_password(passwords_file)
    assert json.loads(passwords_file.read_text()) == {"viewer": "v-pass", "admin": password}
    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert ensure_admin_password(empty) == json.loads(empty.read_text())["admin"]


def test_stack_env(tmp_path: Path) -> None:
    layout = Layout(tmp_path / ".demo")
    ports = Ports(18080, 15000, 18008)
    base = {
        "PATH": "/usr/bin",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "True",
        "AIRFLOW__WEBSERVER__SECRET_KEY": "developer's",
        "AIRFLOW_CONN_MY_DB": "postgresql://x",
        "AIRFLOW_VAR_FOO": "bar",
        "AIRFLOW_CONFIG": "/home/dev/airflow.cfg",
    }
    env = stack_env(layout, ports, base)
    assert base["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"  # the caller's mapping is not changed
    assert env["PATH"] == "/usr/bin"
    for leaked in (
        "AIRFLOW__WEBSERVER__SECRET_KEY",
        "AIRFLOW_CONN_MY_DB",
        "AIRFLOW_VAR_FOO",
        "AIRFLOW_CONFIG",
    ):
        assert leaked not in env
    assert env["AIRFLOW_HOME"] == str(tmp_path / ".demo" / "airflow")
    assert (
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        == f"sqlite:///{tmp_path / '.demo' / 'airflow' / 'airflow.db'}"
    )
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(PROJECT_ROOT / "dags")
    assert env["AIRFLOW__CORE__PLUGINS_FOLDER"] == str(PROJECT_ROOT / "plugins")
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18080/execution/"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] == str(layout.passwords_file)
    assert env["AIRFLOW__API__PORT"] == "18080"
    assert env["AIRFLOW__API__BASE_URL"] == "http://127.0.0.1:18080"
    assert env["MODELOPS_HOME"] == str(tmp_path / ".demo" / "modelops")
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:15000"
    assert (env["MODELOPS_AIRFLOW_PORT"], env["MODELOPS_MLFLOW_PORT"], env["MODELOPS_GATEWAY_PORT"]) == (
        "18080",
        "15000",
        "18008",
    )
    # The processes read their ports back the same way.
    assert Ports.from_env(env) == ports


def test_services_argv_and_env(tmp_path: Path) -> None:
    layout = Layout(tmp_path / ".demo")
    ports = Ports(18080, 15000, 18008)
    env = stack_env(layout, ports, {"PATH": "/usr/bin"})
    conn_env = {"AIRFLOW_CONN_MODELOPS_AUDIT": '{"conn_type": "sqlite"}'}
    stack = services(layout, ports, env, conn_env)
    by_name = {service.name: service for service in stack}
    assert tuple(by_name) == demo.SERVICE_NAMES
    bin_dir = Path(sys.executable).parent

    mlflow = by_name["mlflow"]
    argv = list(mlflow.argv)
    assert argv[:2] == [str(bin_dir / "mlflow"), "server"]
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{layout.mlflow_dir / 'mlflow.db'}"
    assert argv[argv.index("--artifacts-destination") + 1] == str(layout.mlflow_dir / "artifacts")
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "15000"
    assert mlflow.health_url == "http://127.0.0.1:15000/health"
    assert (mlflow.port, mlflow.port_env) == (15000, "MODELOPS_MLFLOW_PORT")
    assert mlflow.env["AIRFLOW_CONN_MODELOPS_AUDIT"] == conn_env["AIRFLOW_CONN_MODELOPS_AUDIT"]

    airflow = str(bin_dir / "airflow")
    assert list(by_name["airflow-api-server"].argv) == [
        airflow,
        "api-server",
        "--host",
        "127.0.0.1",
        "--port",
        "18080",
        "--workers",
        "1",
    ]
    assert by_name["airflow-api-server"].health_url == "http://127.0.0.1:18080/api/v2/monitor/health"
    assert by_name["airflow-api-server"].port_env == "MODELOPS_AIRFLOW_PORT"
    for component in ("scheduler", "dag-processor", "triggerer"):
        service = by_name[f"airflow-{component}"]
        assert list(service.argv) == [airflow, component]
        assert service.health_url is None and service.port is None
        assert service.log_file == layout.logs / f"airflow-{component}.log"
        assert service.env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"

    gateway = by_name["gateway"]
    assert list(gateway.argv) == [
        sys.executable,
        "-m",
        "modelops.serving",
        "--host",
        "127.0.0.1",
        "--port",
        "18008",
    ]
    assert gateway.env["MODELOPS_PREDICTIONS_URL"] == f"sqlite:///{layout.modelops_home / 'predictions.db'}"
    assert gateway.env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:15000"
    assert gateway.env["AIRFLOW_CONN_MODELOPS_AUDIT"] == conn_env["AIRFLOW_CONN_MODELOPS_AUDIT"]
    assert gateway.any_http_answer_is_up and gateway.url == "http://127.0.0.1:18008/invocations"
    assert all(service.log_file.parent == layout.logs for service in stack)


# --- a stand-in of Airflow's REST API v2 ---------------------------------------------------------

TOKEN = "jwt-of-admin"
PASSWORD = "s3cret-pass"
T0 = datetime(2026, 5, 9, 7, 0, tzinfo=UTC)


def _iso(moment: datetime | None) -> str | None:
    # Airflow's pydantic models write UTC as "Z".
    return moment.isoformat().replace("+00:00", "Z") if moment else None


@dataclass
class FakeTask:
    task_id: str
    state: str = "success"
    try_number: int = 1
    map_index: int = -1
    return_value: Any = None  # None: no XCom (404)
    log: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class FakeRun:
    dag_id: str
    run_id: str
    run_after: datetime
    states: list[str]  # the state on each read; the last one repeats
    run_type: str = "manual"
    hidden_list_reads: int = 0  # the list endpoint does not show the run for this many reads
    tasks: list[FakeTask] = field(default_factory=list)
    conf: dict[str, Any] = field(default_factory=dict)
    reads: int = 0

    def read(self) -> dict[str, Any]:
        state = self.states[min(self.reads, len(self.states) - 1)]
        self.reads += 1
        started = self.run_after + timedelta(seconds=1) if state != "queued" else None
        ended = self.run_after + timedelta(seconds=13.5) if state in ("success", "failed") else None
        # The fields of airflow.api_fastapi.core_api.datamodels.dag_run.DAGRunResponse.
        return {
            "dag_run_id": self.run_id,
            "dag_id": self.dag_id,
            "logical_date": None,
            "queued_at": _iso(self.run_after),
            "start_date": _iso(started),
            "end_date": _iso(ended),
            "duration": (ended - started).total_seconds() if started and ended else None,
            "data_interval_start": None,
            "data_interval_end": None,
            "run_after": _iso(self.run_after),
            "last_scheduling_decision": None,
            "run_type": self.run_type,
            "state": state,
            "triggered_by": "rest_api" if self.run_type == "manual" else "asset",
            "triggering_user_name": "admin" if self.run_type == "manual" else None,
            "conf": self.conf,
            "note": None,
            "dag_versions": [],
            "bundle_version": None,
            "dag_display_name": self.dag_id,
            "partition_key": None,
            "partition_date": None,
        }


@dataclass
class FakeAirflow:
    runs: list[FakeRun] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    logins: list[dict[str, Any]] = field(default_factory=list)
    list_queries: list[dict[str, str]] = field(default_factory=list)
    log_queries: list[tuple[str, int, dict[str, str], str | None]] = field(default_factory=list)
    new_run_states: list[str] = field(default_factory=lambda: ["queued", "running", "success"])

    def find(self, dag_id: str, run_id: str) -> FakeRun | None:
        return next((r for r in self.runs if r.dag_id == dag_id and r.run_id == run_id), None)


class LoginBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str
    password: str


class TriggerBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    logical_date: datetime | None  # required (may be null) in TriggerDAGRunPostBody
    conf: dict[str, Any] = {}


def _not_found(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=404)


def _airflow_app(fake: FakeAirflow) -> FastAPI:
    app = FastAPI()
    prefix = "/api/v2/dags/{dag_id}/dagRuns"

    @app.middleware("http")
    async def bearer_only(request: Request, call_next: Any) -> Any:
        if request.url.path.startswith("/api/v2/"):
            header = request.headers.get("Authorization")
            fake.auth_headers.append(header)
            if header != f"Bearer {TOKEN}":
                return JSONResponse({"detail": "Not authenticated"}, status_code=401)
        return await call_next(request)

    @app.post("/auth/token", status_code=201)
    def token(body: LoginBody) -> Any:
        fake.logins.append(body.model_dump())
        if (body.username, body.password) != ("admin", PASSWORD):
            return JSONResponse({"detail": "Invalid credentials"}, status_code=401)
        return {"access_token": TOKEN}

    @app.post(prefix)
    def trigger(dag_id: str, body: TriggerBody) -> Any:
        now = datetime.now(UTC)
        run = FakeRun(dag_id, f"manual__{now.isoformat()}", now, list(fake.new_run_states), conf=body.conf)
        run.tasks = [FakeTask("work", return_value={"summary": f"{dag_id} done"})]
        fake.runs.append(run)
        return run.read() | {"state": "queued"}

    @app.get(prefix)
    def list_runs(dag_id: str, request: Request) -> Any:
        query = dict(request.query_params)
        fake.list_queries.append(query)
        gte = datetime.fromisoformat(query["run_after_gte"]) if "run_after_gte" in query else None
        runs = []
        for run in fake.runs:
            if run.dag_id != dag_id or (gte and run.run_after < gte):
                continue
            if run.hidden_list_reads > 0:
                run.hidden_list_reads -= 1
                continue
            runs.append(run)
        assert query.get("order_by") == "-run_after", "the stand-in only sorts by -run_after"
        runs.sort(key=lambda r: r.run_after, reverse=True)
        runs = runs[: int(query.get("limit", 50))]
        return {"dag_runs": [r.read() for r in runs], "total_entries": len(runs)}

    @app.get(prefix + "/{run_id}")
    def get_run(dag_id: str, run_id: str) -> Any:
        run = fake.find(dag_id, run_id)
        if run is None:
            return _not_found(f"The DagRun with dag_id: `{dag_id}` and run_id: `{run_id}` was not found")
        return run.read()

    @app.get(prefix + "/{run_id}/taskInstances")
    def task_instances(dag_id: str, run_id: str) -> Any:
        run = fake.find(dag_id, run_id)
        if run is None:
            return _not_found("DagRun not found")
        items = [
            {
                "id": str(uuid.uuid4()),
                "task_id": t.task_id,
                "dag_id": dag_id,
                "dag_run_id": run_id,
                "map_index": t.map_index,
                "logical_date": None,
                "run_after": _iso(run.run_after),
                "start_date": _iso(run.run_after),
                "end_date": _iso(run.run_after),
                "duration": 0.0,
                "state": t.state,
                "try_number": t.try_number,
                "max_tries": 1,
                "task_display_name": t.task_id,
                "dag_display_name": dag_id,
                "pool": "default_pool",
                "pool_slots": 1,
                "operator": "_PythonDecoratedOperator",
            }
            for t in run.tasks
        ]
        return {"task_instances": items, "total_entries": len(items)}

    @app.get(prefix + "/{run_id}/taskInstances/{task_id}/xcomEntries/{key}")
    def xcom_entry(dag_id: str, run_id: str, task_id: str, key: str, map_index: int = -1) -> Any:
        run = fake.find(dag_id, run_id)
        task = next((t for t in run.tasks if t.task_id == task_id), None) if run else None
        if task is None or key != "return_value" or task.map_index != map_index or task.return_value is None:
            return _not_found(f"XCom entry with key: `{key}` not found")
        return {
            "key": key,
            "timestamp": _iso(run.run_after),  # type: ignore[union-attr]
            "logical_date": None,
            "map_index": map_index,
            "task_id": task_id,
            "dag_id": dag_id,
            "run_id": run_id,
            "dag_display_name": dag_id,
            "task_display_name": task_id,
            "run_after": _iso(run.run_after),  # type: ignore[union-attr]
            "value": task.return_value,
        }

    @app.get(prefix + "/{run_id}/taskInstances/{task_id}/logs/{try_number}")
    def task_log(dag_id: str, run_id: str, task_id: str, try_number: int, request: Request) -> Any:
        fake.log_queries.append(
            (task_id, try_number, dict(request.query_params), request.headers.get("Accept"))
        )
        run = fake.find(dag_id, run_id)
        task = next((t for t in run.tasks if t.task_id == task_id), None) if run else None
        if task is None or task.try_number != try_number:
            return _not_found("TaskInstance not found")
        return _real_log_answer(task.log)

    return app


@pytest.fixture
def airflow() -> Iterator[tuple[FakeAirflow, str]]:
    fake = FakeAirflow()
    with serve_in_thread(_airflow_app(fake)) as url:
        yield fake, url


def test_login_sends_the_bearer_token(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    api = AirflowApi(url, "admin", PASSWORD)
    assert fake.logins == [{"username": "admin", "password": PASSWORD}]
    run_id = api.trigger("modelops_retirement", {})
    assert run_id.startswith("manual__")
    api.run("modelops_retirement", run_id)
    assert fake.auth_headers == [f"Bearer {TOKEN}", f"Bearer {TOKEN}"]

    with pytest.raises(ConfigurationError, match=r"refused the login of 'admin' \(401.*passwords\.json"):
        AirflowApi(url, "admin", "wrong")


def test_triggered_run_queued_running_success(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    api = AirflowApi(url, "admin", PASSWORD)
    run_id = api.trigger(demo.VALIDATION_DAG, {"dataset_uri": "/data/x.csv"})
    run = fake.find(demo.VALIDATION_DAG, run_id)
    assert run is not None and run.conf == {"dataset_uri": "/data/x.csv"}
    run.tasks = [
        FakeTask("load", return_value='"just a path"'),
        FakeTask("no_xcom"),
        FakeTask("mapped", map_index=0, return_value={"summary": "one mapped instance"}),
        FakeTask(
            "validate",
            return_value=json.dumps(_serde({"summary": "20000 rows valid", "checks": (12, 0)})),
        ),
    ]
    result = wait_for_run(
        api, "validation", demo.VALIDATION_DAG, run_id=run_id, timeout=20, poll_seconds=0.02
    )
    assert run.reads >= 3  # queued, running, success
    assert (result.stage, result.dag_id, result.run_id, result.state) == (
        "validation",
        demo.VALIDATION_DAG,
        run_id,
        "success",
    )
    assert result.seconds == pytest.approx(12.5)  # end_date - start_date, not the time spent polling
    assert result.task_id == "validate"
    assert result.value == {"summary": "20000 rows valid", "checks": [12, 0]}
    assert result.fact == "20000 rows valid"
    assert "20000 rows valid" in stage_line(result) and "12.5 s" in stage_line(result)
    assert set(fake.auth_headers) == {f"Bearer {TOKEN}"}


def test_failed_run_raises_with_the_task_log(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    fake.runs.append(
        FakeRun(
            demo.TRAINING_DAG,
            "manual__1",
            T0,
            ["running", "failed"],
            tasks=[
                FakeTask("prepare", return_value={"summary": "prepared"}),
                FakeTask("train", state="failed", try_number=2, log=FAILED_TASK_LOG),
                FakeTask("register", state="upstream_failed"),
            ],
        )
    )
    api = AirflowApi(url, "admin", PASSWORD)
    with pytest.raises(StageFailed) as info:
        wait_for_run(api, "training", demo.TRAINING_DAG, run_id="manual__1", timeout=20, poll_seconds=0.02)
    message = str(info.value)
    assert f"stage training ({demo.TRAINING_DAG}) run manual__1 failed" in message
    assert "task train failed; last lines of its log:" in message
    assert "ERROR Task failed with exception" in message and "boom: AUC below floor" in message
    task_id, try_number, query, accept = fake.log_queries[-1]
    assert (task_id, try_number) == ("train", 2)
    assert query == {"full_content": "true", "map_index": "-1"}
    assert accept == "application/json"


def test_failed_run_without_a_failed_task(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    fake.runs.append(FakeRun(demo.GATE_DAG, "r", T0, ["failed"], tasks=[FakeTask("check")]))
    api = AirflowApi(url, "admin", PASSWORD)
    with pytest.raises(StageFailed, match="no failed task instance"):
        wait_for_run(api, "gate", demo.GATE_DAG, run_id="r", timeout=20, poll_seconds=0.02)


def test_a_run_that_never_finishes_times_out(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    fake.runs.append(FakeRun(demo.DRIFT_DAG, "stuck", T0, ["queued", "running"]))
    api = AirflowApi(url, "admin", PASSWORD)
    with pytest.raises(StageFailed) as info:
        wait_for_run(api, "monitoring", demo.DRIFT_DAG, run_id="stuck", timeout=1, poll_seconds=0.05)
    message = str(info.value)
    assert f"stage monitoring ({demo.DRIFT_DAG}) did not finish within 1 s" in message
    assert "run stuck is running" in message and "make down" in message


def test_no_asset_triggered_run_times_out(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    since = datetime.now(UTC)
    fake.runs.append(FakeRun(demo.DEPLOYMENT_DAG, "old", since - timedelta(hours=1), ["success"]))
    api = AirflowApi(url, "admin", PASSWORD)
    with pytest.raises(StageFailed, match=r"within 1 s: no run was started \(Asset event not received\?\)"):
        wait_for_run(api, "deployment", demo.DEPLOYMENT_DAG, since=since, timeout=1, poll_seconds=0.05)


def test_since_finds_the_asset_triggered_run(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    since = datetime.now(UTC)
    summary = {"summary": "model v3 registered, auc 0.81"}
    fake.runs += [
        FakeRun(demo.TRAINING_DAG, "old_run", since - timedelta(minutes=5), ["success"]),
        FakeRun(
            demo.TRAINING_DAG,
            "asset_triggered__new",
            since + timedelta(seconds=3),
            ["queued", "running", "running", "success"],
            run_type="asset_triggered",
            hidden_list_reads=3,  # the scheduler creates it a little later
            tasks=[FakeTask("train", return_value=summary)],
        ),
        FakeRun(demo.GATE_DAG, "other_dag", since + timedelta(seconds=4), ["success"]),
    ]
    api = AirflowApi(url, "admin", PASSWORD)
    result = wait_for_run(api, "training", demo.TRAINING_DAG, since=since, timeout=20, poll_seconds=0.02)
    assert (result.run_id, result.state, result.fact) == (
        "asset_triggered__new",
        "success",
        "model v3 registered, auc 0.81",
    )
    assert result.seconds == pytest.approx(12.5)
    assert len(fake.list_queries) == 4  # three empty answers, then the run; then it is read by id
    assert datetime.fromisoformat(fake.list_queries[0]["run_after_gte"]) == since
    assert fake.list_queries[0]["limit"] == "1"


# --- main: down / status / up --------------------------------------------------------------------


@pytest.fixture
def demo_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / ".demo"
    monkeypatch.setenv("MODELOPS_DEMO_DIR", str(folder))
    for name in ("MODELOPS_AIRFLOW_PORT", "MODELOPS_MLFLOW_PORT", "MODELOPS_GATEWAY_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert localstack.demo_dir() == folder
    return folder


def test_down_and_status_with_nothing_running(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["down"]) == 0
    assert capsys.readouterr().out == "nothing was running\n"
    assert demo.main(["status"]) == 0
    assert "nothing is running (start it with `make demo`)" in capsys.readouterr().out
    # A stale pid file (its process is gone) does not count and is cleaned up by `down`.
    (demo_dir / "run").mkdir(parents=True)
    (demo_dir / "run" / "airflow-scheduler.pid").write_text("4194000\n")
    assert demo.main(["status"]) == 0
    assert "nothing is running" in capsys.readouterr().out
    assert demo.main(["down"]) == 0
    assert capsys.readouterr().out == "nothing was running\n"
    assert not (demo_dir / "run" / "airflow-scheduler.pid").exists()


def test_status_with_a_bad_port_says_what_to_fix(
    demo_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODELOPS_AIRFLOW_PORT", "eighty")
    assert demo.main(["status"]) == 1
    assert "MODELOPS_AIRFLOW_PORT='eighty' is not a TCP port" in capsys.readouterr().err


def test_up_refuses_while_a_previous_stack_runs(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = demo_dir / "run"
    sleeper = localstack.Service(
        name="airflow-scheduler",
        argv=[sys.executable, "-c", "import time; time.sleep(60)"],
        env=dict(os.environ),
        health_url=None,
        log_file=demo_dir / "logs" / "airflow-scheduler.log",
    )
    pid = localstack.start(sleeper, run_dir)
    try:
        assert demo.running_services(run_dir) == ["airflow-scheduler"]
        assert demo.main(["up"]) == 1
        captured = capsys.readouterr()
        assert "still run (airflow-scheduler)" in captured.err and "run `make down` first" in captured.err
        assert not (demo_dir / "airflow").exists()  # refused before building anything

        assert demo.main(["status"]) == 0
        out = capsys.readouterr().out
        assert f"airflow-scheduler      pid {pid}, 1 processes" in out
        assert "mlflow                 not running" in out

        assert demo.main(["down"]) == 0
        assert capsys.readouterr().out == "stopped airflow-scheduler\n"
        assert demo.running_services(run_dir) == []
    finally:
        localstack.stop("airflow-scheduler", run_dir, grace_seconds=5)  # no-op unless an assert failed
