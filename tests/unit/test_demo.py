"""``make demo``'s stack (``modelops_dev``) without a real Airflow: pure fact functions, the ports,
environment and argv of every service, the REST clients against stand-ins of Airflow's API v2, MLflow
and the gateway, the whole lifecycle of two models against those stand-ins, ``down``/``status``/``up``
guards, and that the runtime package, the wheel and the image leave the dev package out."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from modelops.audit import ChainVerification
from modelops.errors import ConfigurationError, UnknownModel
from modelops.settings import PROJECT_ROOT, load_catalog
from modelops.vocabulary import Tag
from modelops_dev import approvals, driver, processes, stack
from modelops_dev.airflow_api import (
    AirflowApi,
    StageFailed,
    StageResult,
    TaskOutcome,
    log_excerpt,
    outcomes_of,
    stage_lines,
    task_label,
    unwrap_xcom,
    wait_for_run,
)
from modelops_dev.mlflow_api import MlflowApi, is_newer, registered_model_facts
from modelops_dev.stack import (
    Layout,
    Ports,
    ensure_admin_password,
    ensure_passwords,
    known_passwords,
    services,
    stack_env,
)
from modelops_dev.workload import (
    DATASET_WRITERS,
    DatasetDrop,
    describe_prediction,
    drop_dataset,
    drop_file_name,
    send_rows,
)
from tests.support import serve_in_thread

DEMO_MODELS = ("ctr_recommender", "diabetes_progression")

# --- pure functions ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _answer_approvals_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fakes have no scheduler to race: the demo's settle time before answering would only slow them.
    monkeypatch.setattr(driver, "APPROVAL_SETTLE_SECONDS", 0.0)


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


def test_task_label_prefers_the_rendered_map_index() -> None:
    mapped = {"task_id": "train_and_register", "map_index": 1, "rendered_map_index": "diabetes_progression"}
    assert task_label(mapped, {"model_name": "other"}) == "diabetes_progression"
    bare = {"task_id": "train_and_register", "map_index": 1, "rendered_map_index": None}
    assert task_label(bare, {"model_name": "ctr_recommender"}) == "ctr_recommender"
    assert task_label(bare) == "train_and_register[1]"
    assert task_label({"task_id": "check", "map_index": -1}) == "check"


def test_outcomes_keep_only_values_with_a_summary() -> None:
    entries = [
        ({"task_id": "load", "map_index": -1}, '"a string"'),
        ({"task_id": "split", "map_index": -1}, {"rows": 10}),
        (
            {"task_id": "train", "map_index": 0, "rendered_map_index": "ctr_recommender"},
            json.dumps(_serde({"summary": "auc 0.81", "metrics": (0.81, 0.7)})),
        ),
        ({"task_id": "later", "map_index": -1}, {"summary": "unmapped"}),
    ]
    assert outcomes_of(entries) == [
        TaskOutcome("train", 0, "ctr_recommender", {"summary": "auc 0.81", "metrics": [0.81, 0.7]}),
        TaskOutcome("later", -1, "later", {"summary": "unmapped"}),
    ]
    assert outcomes_of([]) == []


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


def _mlflow_answer(versions: list[str], aliases: dict[str, str], name: str = "ctr_model") -> dict[str, Any]:
    """``GET /api/2.0/mlflow/registered-models/get`` as MLflow's server serializes it (its protos)."""
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel, RegisteredModelAlias
    from mlflow.protos.model_registry_pb2 import GetRegisteredModel
    from mlflow.utils.proto_json_utils import message_to_json

    model = RegisteredModel(
        name=name,
        creation_timestamp=1,
        last_updated_timestamp=2,
        latest_versions=[
            ModelVersion(name, v, 1, 1, run_id="r", status="READY", source="s") for v in versions
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
    assert facts.champion == "10"

    bare = _mlflow_answer([], {})
    assert "latest_versions" not in bare["registered_model"]  # proto JSON omits empty lists
    facts = registered_model_facts(bare)
    assert (facts.latest_version, facts.aliases, facts.champion) == (None, {}, None)


def test_is_newer_compares_version_numbers() -> None:
    assert is_newer("1", None) and is_newer("10", "9")
    assert not is_newer(None, None) and not is_newer(None, "3") and not is_newer("3", "3")
    assert not is_newer("9", "10")


def test_stage_lines() -> None:
    unmapped = StageResult(
        "retirement",
        "modelops_retirement",
        "r1",
        "success",
        12.345,
        [TaskOutcome("x", -1, "x", {"summary": "s"})],
    )
    assert stage_lines(unmapped) == ["  retirement   success    12.3 s  s"]
    mapped = StageResult(
        "training",
        "modelops_training",
        "r2",
        "success",
        3.0,
        [
            TaskOutcome("train", 0, "ctr_recommender", {"summary": "v3, AUC 0.81"}),
            TaskOutcome("train", 1, "diabetes_progression", {"summary": "v1, RMSE 55"}),
        ],
    )
    assert stage_lines(mapped) == [
        "  training     success     3.0 s  ctr_recommender: v3, AUC 0.81",
        "  training     success     3.0 s  diabetes_progression: v1, RMSE 55",
    ]
    assert mapped.for_model("diabetes_progression") == mapped.outcomes[1]
    assert mapped.for_model("unknown") is None
    bare = StageResult("gate", "modelops_compliance_gate", "r3", "success", 1.0)
    assert stage_lines(bare) == ["  gate         success     1.0 s  (no summary returned)"]


@pytest.mark.parametrize(
    ("task", "prediction", "expected"),
    [
        ("binary_classification", [0.896054141652812, 0.103945858347188], "probability of a click 0.104"),
        ("binary_classification", 0.25, "probability of a click 0.250"),
        ("binary_classification", 1, "1"),  # a class, not a probability
        ("regression", 152.3456, "152.3"),
        ("regression", [98.76], "98.8"),
        ("regression", {"prediction": 77.0}, "77.0"),
        ("regression", "odd", '"odd"'),
    ],
)
def test_describe_prediction(task: str, prediction: Any, expected: str) -> None:
    assert describe_prediction(task, prediction) == expected


# --- ports, layout, environment, services ---------------------------------------------------------


PORT_SET_A = Ports(18080, 15000, 18008, 18793, 18794)
PORT_SET_B = Ports(28080, 25000, 28008, 28793, 28794)


def test_ports_from_env_defaults_and_overrides() -> None:
    assert Ports.from_env({}) == Ports(8080, 5000, 8008, 8793, 8794)
    assert Ports.from_env({"MODELOPS_AIRFLOW_PORT": "", "MODELOPS_MLFLOW_PORT": "  "}) == Ports()
    ports = Ports.from_env(
        {
            "MODELOPS_AIRFLOW_PORT": "18080",
            "MODELOPS_MLFLOW_PORT": " 15000 ",
            "MODELOPS_GATEWAY_PORT": "18008",
            "MODELOPS_WORKER_LOG_PORT": "18793",
            "MODELOPS_TRIGGERER_LOG_PORT": "18794",
        }
    )
    assert ports == PORT_SET_A
    assert ports.airflow_url == "http://127.0.0.1:18080"
    assert ports.mlflow_url == "http://127.0.0.1:15000"
    assert ports.gateway_url == "http://127.0.0.1:18008"
    assert ports.by_variable() == {
        "MODELOPS_AIRFLOW_PORT": 18080,
        "MODELOPS_MLFLOW_PORT": 15000,
        "MODELOPS_GATEWAY_PORT": 18008,
        "MODELOPS_WORKER_LOG_PORT": 18793,
        "MODELOPS_TRIGGERER_LOG_PORT": 18794,
    }


@pytest.mark.parametrize("raw", ["abc", "80a", "-1", "0", "65536", "8080.0"])
def test_ports_from_env_rejects_a_non_port(raw: str) -> None:
    with pytest.raises(ConfigurationError, match=r"MODELOPS_GATEWAY_PORT=.* is not a TCP port.*like 8008"):
        Ports.from_env({"MODELOPS_GATEWAY_PORT": raw})
    with pytest.raises(ConfigurationError, match=r"MODELOPS_TRIGGERER_LOG_PORT=.*like 8794"):
        Ports.from_env({"MODELOPS_TRIGGERER_LOG_PORT": raw})


def test_ports_from_env_rejects_one_port_for_two_services() -> None:
    with pytest.raises(
        ConfigurationError, match=r"MODELOPS_GATEWAY_PORT and MODELOPS_WORKER_LOG_PORT are both 8793"
    ):
        Ports.from_env({"MODELOPS_GATEWAY_PORT": "8793"})


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


def test_every_demo_user_gets_a_generated_password_kept_with_the_admins(tmp_path: Path) -> None:
    assert stack.AIRFLOW_USERS == {"admin": "admin", "risk_officer": "user"}
    passwords_file = tmp_path / "airflow" / "simple_auth_manager_passwords.json"
    assert known_passwords(passwords_file) == {}  # reading creates nothing
    assert not passwords_file.exists()
    # A .demo/ from before the approver existed: the admin keeps its password, risk_officer gets one.
    admin = ensure_admin_password(passwords_file)
    passwords = ensure_passwords(passwords_file)
    assert passwords["admin"] == admin and set(passwords) == {"admin", "risk_officer"}
    assert len(passwords["risk_officer"]) >= 12 and passwords["risk_officer"] != admin
    assert json.loads(passwords_file.read_text()) == passwords  # the file Airflow reads them from
    assert stat.S_IMODE(passwords_file.stat().st_mode) == 0o600
    assert ensure_passwords(passwords_file) == passwords == known_passwords(passwords_file)
    assert ensure_passwords(passwords_file, ["risk_officer"]) == {"risk_officer": passwords["risk_officer"]}
    # Another user's entry is kept; a fresh .demo/ gets fresh passwords (none is fixed).
    passwords_file.write_text(json.dumps({**passwords, "viewer": "v"}))
    assert ensure_passwords(passwords_file) == passwords
    assert json.loads(passwords_file.read_text())["viewer"] == "v"
    other = ensure_passwords(tmp_path / "other.json")
    assert other["risk_officer"] != passwords["risk_officer"] and other["admin"] != admin


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_the_real_auth_manager_lets_only_the_assigned_approver_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the demo relies on, checked with Airflow's SimpleAuthManager and the demo's own settings:
    risk_officer (role user) may answer a form assigned to it; the admin may not (403), nor a viewer."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    env = stack_env(Layout(tmp_path / ".demo"), PORT_SET_A, {})
    for name in ("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"):
        monkeypatch.setenv(name, env[name])
    users = {user.username: user for user in SimpleAuthManager.get_users()}
    assert {name: user.role for name, user in users.items()} == {"admin": "admin", "risk_officer": "user"}
    manager = SimpleAuthManager()
    for name, user in users.items():
        # Both may write a DAG's HITL details (the PATCH's first check) ...
        assert manager.is_authorized_dag(method="PUT", access_entity=DagAccessEntity.HITL_DETAIL, user=user)
        # ... but only an assigned user may answer the form, an admin neither.
        assert manager.is_authorized_hitl_task(assigned_users={"risk_officer"}, user=user) is (
            name == "risk_officer"
        ), name
    viewer = type(users["admin"])(username="viewer", role="viewer")
    assert not manager.is_authorized_dag(method="PUT", access_entity=DagAccessEntity.HITL_DETAIL, user=viewer)


def test_gateway_token_is_created_once_and_owner_only(tmp_path: Path) -> None:
    layout = Layout(tmp_path / ".demo")
    env = stack_env(layout, PORT_SET_A, {})
    token = env["MODELOPS_GATEWAY_ADMIN_TOKEN"]
    assert len(token) >= 24 and layout.gateway_token_file.read_text().strip() == token
    assert stat.S_IMODE(layout.gateway_token_file.stat().st_mode) == 0o600
    assert stack_env(layout, PORT_SET_B, {})["MODELOPS_GATEWAY_ADMIN_TOKEN"] == token


def test_stack_env(tmp_path: Path) -> None:
    layout = Layout(tmp_path / ".demo")
    ports = PORT_SET_A
    base = {
        "PATH": "/usr/bin",
        "PYTHONPATH": "/somewhere/else",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "True",
        "AIRFLOW__WEBSERVER__SECRET_KEY": "developer's",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": "9999",
        "AIRFLOW_CONN_MY_DB": "postgresql://x",
        "AIRFLOW_VAR_FOO": "bar",
        "AIRFLOW_CONFIG": "/home/dev/airflow.cfg",
        "MODELOPS_INCOMING_ROOT": "s3://someone/else",
        "MODELOPS_COLD_START_DAYS": "7",
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
    assert env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] == "modelops_dev.loopback_hostname"
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert env["AIRFLOW__API__PORT"] == "18080"
    assert env["AIRFLOW__API__BASE_URL"] == "http://127.0.0.1:18080"
    assert env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] == "18793"
    assert env["AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"] == "18794"
    assert env["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "False"
    assert env["MODELOPS_HOME"] == str(tmp_path / ".demo" / "modelops")
    assert env["MODELOPS_INCOMING_ROOT"] == str(layout.incoming)
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:15000"
    # The dev package comes first: every Airflow process imports the hostname callable from it.
    assert env["PYTHONPATH"].split(os.pathsep) == [str(PROJECT_ROOT / "devstack"), "/somewhere/else"]
    # The processes read their ports back the same way.
    assert Ports.from_env(env) == ports
    # Two users: the admin, and the strict policy's approver (role user).
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "admin:admin,risk_officer:user"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "False"
    # The demo's versions are minutes old: no cold start, or the incident's critical alert is only recorded.
    assert env["MODELOPS_COLD_START_DAYS"] == "0"


def test_the_demo_stack_has_no_cold_start_and_reads_the_outbox_its_tasks_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelops.notifications import OUTBOX_FILE, default_outbox_path

    layout = Layout(tmp_path / ".demo")
    env = stack_env(layout, PORT_SET_A, {"MODELOPS_COLD_START_DAYS": "7"})
    monkeypatch.setenv("MODELOPS_COLD_START_DAYS", "7")
    assert load_catalog().policies_for("ctr_recommender").monitoring.cold_start_days == 7
    for name in ("MODELOPS_COLD_START_DAYS", "MODELOPS_HOME"):
        monkeypatch.setenv(name, env[name])
    catalog = load_catalog()
    for model in DEMO_MODELS:
        assert catalog.policies_for(model).monitoring.cold_start_days == 0
    assert layout.outbox_file == layout.modelops_home / OUTBOX_FILE == default_outbox_path()
    # Every process of the stack gets it, Airflow's and the others.
    stack_services = services(layout, PORT_SET_A, env, {"AIRFLOW_CONN_X": "y"})
    assert {service.env["MODELOPS_COLD_START_DAYS"] for service in stack_services} == {"0"}


def _binding_ports(stack_services: list[processes.Service]) -> set[int]:
    return {service.port for service in stack_services if service.port is not None}


def test_two_port_sets_bind_disjoint_ports_and_the_env_carries_each(tmp_path: Path) -> None:
    bound = []
    for name, ports in (("one", PORT_SET_A), ("two", PORT_SET_B)):
        layout = Layout(tmp_path / name / ".demo")
        env = stack_env(layout, ports, {"PATH": "/usr/bin"})
        stack_services = services(layout, ports, env, {})
        ports_bound = _binding_ports(stack_services)
        assert ports_bound == set(ports.by_variable().values())  # five ports, each from its variable
        for variable, number in ports.by_variable().items():
            assert env[variable] == str(number)
        assert env["AIRFLOW__API__PORT"] == str(ports.airflow)
        assert env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] == str(ports.worker_log)
        assert env["AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"] == str(ports.triggerer_log)
        assert env["MLFLOW_TRACKING_URI"].endswith(f":{ports.mlflow}")
        for service in stack_services:
            argv = list(service.argv)
            if service.port is not None:
                # Every server binds loopback, on the port its variable gives.
                assert argv[argv.index("--host") + 1] == "127.0.0.1", service.name
                assert argv[argv.index("--port") + 1] == str(service.port), service.name
                assert service.port_env in ports.by_variable(), service.name
            else:
                # The other processes bind nothing: no log server inside the scheduler or triggerer.
                assert "--port" not in argv, service.name
            assert service.env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] == str(ports.worker_log)
        bound.append(ports_bound)
    assert not bound[0] & bound[1]


def test_services_argv_and_env(tmp_path: Path) -> None:
    layout = Layout(tmp_path / ".demo")
    ports = PORT_SET_A
    env = stack_env(layout, ports, {"PATH": "/usr/bin"})
    conn_env = {"AIRFLOW_CONN_MODELOPS_AUDIT": '{"conn_type": "sqlite"}'}
    stack_services = services(layout, ports, env, conn_env)
    by_name = {service.name: service for service in stack_services}
    assert tuple(by_name) == stack.SERVICE_NAMES
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
    assert list(by_name["airflow-scheduler"].argv) == [airflow, "scheduler", "--skip-serve-logs"]
    assert list(by_name["airflow-dag-processor"].argv) == [airflow, "dag-processor"]
    assert list(by_name["airflow-triggerer"].argv) == [airflow, "triggerer", "--skip-serve-logs"]
    for component in ("scheduler", "dag-processor", "triggerer"):
        service = by_name[f"airflow-{component}"]
        assert service.health_url is None and service.port is None
        assert service.log_file == layout.logs / f"airflow-{component}.log"
        assert service.env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"

    for name, port, variable in (
        ("airflow-worker-log-server", 18793, "MODELOPS_WORKER_LOG_PORT"),
        ("airflow-triggerer-log-server", 18794, "MODELOPS_TRIGGERER_LOG_PORT"),
    ):
        service = by_name[name]
        assert list(service.argv) == [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "airflow.utils.serve_logs.log_server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--no-access-log",
        ]
        assert (service.port, service.port_env) == (port, variable)
        assert service.health_url == f"http://127.0.0.1:{port}/" and service.any_http_answer_is_up
        assert service.env["AIRFLOW_HOME"] == str(layout.airflow_home)

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
    assert all(service.log_file.parent == layout.logs for service in stack_services)


def test_scheduler_and_triggerer_accept_skip_serve_logs() -> None:
    from airflow.cli.cli_config import core_commands

    for command in ("scheduler", "triggerer"):
        (spec,) = [c for c in core_commands if c.name == command]
        flags = {flag for arg in spec.args for flag in arg.flags}
        assert "--skip-serve-logs" in flags, command


def test_every_airflow_process_of_the_stack_calls_itself_127_0_0_1(tmp_path: Path) -> None:
    env = stack_env(Layout(tmp_path / ".demo"), PORT_SET_A, dict(os.environ))
    code = "from airflow.utils.net import get_hostname; print(get_hostname())"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "127.0.0.1"


def _listeners(port: int) -> set[str]:
    """Addresses listening on ``port`` by /proc/net/tcp{,6} (hex, as the kernel writes them)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc")
def test_the_log_server_service_listens_on_loopback_only(tmp_path: Path) -> None:
    from tests.support import free_port

    layout = Layout(tmp_path / ".demo")
    ports = Ports(free_port(), free_port(), free_port(), free_port(), free_port())
    env = stack_env(layout, ports, dict(os.environ))
    (log_server,) = [s for s in services(layout, ports, env, {}) if s.name == "airflow-worker-log-server"]
    processes.start(log_server, layout.run)
    try:
        processes.wait_healthy(log_server, 120, layout.run, poll_seconds=0.2)
        assert _listeners(ports.worker_log) == {"0100007F"}  # 127.0.0.1, and nothing on IPv6
        answer = httpx.get(f"http://127.0.0.1:{ports.worker_log}/log/x.log", trust_env=False)
        assert answer.status_code == 403  # Airflow's log server: a signed token is required
    finally:
        assert processes.stop(log_server.name, layout.run, grace_seconds=10) in ("stopped", "killed")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc")
def test_the_demo_mlflow_gateway_and_airflow_listen_on_loopback_only(tmp_path: Path) -> None:
    """The demo's MLflow has no authentication: it, the gateway and Airflow must not be reachable from
    another machine. MLflow and the gateway are started as `make demo` starts them and their listening
    sockets read; the api-server's address is the one Airflow's own CLI parser reads from its argv."""
    from airflow.cli import cli_parser

    from tests.support import free_port

    layout = Layout(tmp_path / ".demo")
    layout.create()
    ports = Ports(free_port(), free_port(), free_port(), free_port(), free_port())
    env = stack_env(layout, ports, dict(os.environ))
    by_name = {service.name: service for service in services(layout, ports, env, {})}

    api_server = by_name["airflow-api-server"]
    args = cli_parser.get_parser().parse_args(list(api_server.argv[1:]))
    assert (args.host, int(args.port)) == ("127.0.0.1", ports.airflow)
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"

    started: list[processes.Service] = []
    try:
        for name in ("mlflow", "gateway"):
            service = by_name[name]
            processes.start(service, layout.run)
            started.append(service)
            processes.wait_healthy(service, 120, layout.run, poll_seconds=0.2)
            assert service.port is not None
            assert _listeners(service.port) == {"0100007F"}, name  # 127.0.0.1, and nothing on IPv6
    finally:
        for service in reversed(started):
            assert processes.stop(service.name, layout.run, grace_seconds=10) in ("stopped", "killed")


# --- datasets and traffic --------------------------------------------------------------------------


@pytest.fixture
def incoming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "incoming"
    monkeypatch.setenv("MODELOPS_INCOMING_ROOT", str(folder))
    return folder


def test_drop_dataset_writes_a_new_file_per_drop(incoming: Path) -> None:
    catalog = load_catalog()
    stamp = datetime(2026, 5, 9, 7, 0, 1, tzinfo=UTC)
    drop = drop_dataset(catalog.dataset("diabetes"), stamp)
    assert drop.path == incoming / "diabetes" / "diabetes-20260509T070001Z.csv"
    assert drop_file_name("diabetes", stamp) == drop.path.name
    assert drop.rows == 442 and len(drop.path.read_text().splitlines()) == 443
    import hashlib

    assert drop.sha256 == hashlib.sha256(drop.path.read_bytes()).hexdigest()
    assert sorted(p.name for p in drop.path.parent.iterdir()) == [drop.path.name]  # no partial file left

    with pytest.raises(ConfigurationError, match=r"no data for dataset 'diabetes'.*\['ctr_clicks'\]"):
        drop_dataset(catalog.dataset("diabetes"), stamp, {"ctr_clicks": DATASET_WRITERS["ctr_clicks"]})


def test_drop_dataset_refuses_a_remote_incoming_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELOPS_INCOMING_ROOT", "s3://bucket/incoming")
    with pytest.raises(
        ConfigurationError, match=r"not a local folder.*staging folder.*MODELOPS_INCOMING_ROOT"
    ):
        drop_dataset(load_catalog().dataset("ctr_clicks"), datetime.now(UTC))


# --- stand-ins of Airflow's REST API v2, MLflow and the gateway ------------------------------------

TOKEN = "jwt-of-admin"
PASSWORD = "s3cret-pass"
APPROVER = "risk_officer"
APPROVER_PASSWORD = "approver-pass"
USERS = {"admin": PASSWORD, APPROVER: APPROVER_PASSWORD}
T0 = datetime(2026, 5, 9, 7, 0, tzinfo=UTC)


def _iso(moment: datetime | None) -> str | None:
    # Airflow's pydantic models write UTC as "Z".
    return moment.isoformat().replace("+00:00", "Z") if moment else None


@dataclass
class FakeForm:
    """A human-in-the-loop form (the gate's approval form by default). ``resume`` is called with the task
    and the accepted answer, as Airflow resumes the task (``execute_complete``)."""

    subject: str
    assigned: list[str] = field(default_factory=lambda: [APPROVER])
    options: list[str] = field(default_factory=lambda: ["Approve", "Reject"])
    params: dict[str, Any] = field(default_factory=lambda: {"comment": ""})
    created_at: datetime = T0
    response: dict[str, Any] | None = None
    resume: Callable[[FakeTask, dict[str, Any]], None] | None = None


@dataclass
class FakeTask:
    task_id: str
    state: str = "success"
    try_number: int = 1
    map_index: int = -1
    rendered_map_index: str | None = None
    return_value: Any = None  # None: no XCom (404)
    log: list[dict[str, Any]] = field(default_factory=list)
    form: FakeForm | None = None


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
        if any(task.state == "awaiting_input" for task in self.tasks):
            state = "running"  # a task waiting for a person's answer keeps its run running
        else:
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
    # dag_id -> called with each new triggered run (to give it tasks, or to start Asset-triggered runs)
    on_trigger: dict[str, Callable[[FakeRun], None]] = field(default_factory=dict)
    form_queries: list[dict[str, str]] = field(default_factory=list)
    # (user, task_id, map_index, status, request body) of each answer to a form
    answers: list[tuple[str, str, int, int, dict[str, Any]]] = field(default_factory=list)
    all_admins: bool = False  # [core] simple_auth_manager_all_admins: anyone may answer any form

    def find(self, dag_id: str, run_id: str) -> FakeRun | None:
        return next((r for r in self.runs if r.dag_id == dag_id and r.run_id == run_id), None)

    def triggered(self, dag_id: str) -> list[FakeRun]:
        return [r for r in self.runs if r.dag_id == dag_id and r.run_type == "manual"]


class LoginBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str
    password: str


class TriggerBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    logical_date: datetime | None  # required (may be null) in TriggerDAGRunPostBody
    conf: dict[str, Any] = {}


def _page(items: list[Any], query: dict[str, str]) -> list[Any]:
    """One page of a listing as Airflow answers it: ``limit`` defaults to 50 and is capped at its
    ``maximum_page_limit`` (100); ``total_entries`` counts the whole listing."""
    offset = int(query.get("offset", 0))
    return items[offset : offset + min(int(query.get("limit", 50)), 100)]


def _not_found(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=404)


def _ti_answer(run: FakeRun, task: FakeTask) -> dict[str, Any]:
    """A task instance as ``GET .../taskInstances`` answers it (TaskInstanceResponse's fields)."""
    return {
        "id": str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"{run.dag_id}/{run.run_id}/{task.task_id}/{task.map_index}")
        ),
        "task_id": task.task_id,
        "dag_id": run.dag_id,
        "dag_run_id": run.run_id,
        "map_index": task.map_index,
        "rendered_map_index": task.rendered_map_index,
        "logical_date": None,
        "run_after": _iso(run.run_after),
        "start_date": _iso(run.run_after),
        "end_date": _iso(run.run_after),
        "duration": 0.0,
        "state": task.state,
        "try_number": task.try_number,
        "max_tries": 1,
        "task_display_name": task.task_id,
        "dag_display_name": run.dag_id,
        "hostname": "127.0.0.1",
        "unixname": "airflow",
        "pool": "default_pool",
        "pool_slots": 1,
        "queue": "default",
        "priority_weight": 1,
        "operator": "_PythonDecoratedOperator",
        "operator_name": "@task",
        "queued_dttm": None,
        "scheduled_dttm": None,
        "pid": None,
        "executor": None,
        "executor_config": "{}",
        "note": None,
        "trigger": None,
        "queued_by_job": None,
        "dag_version": None,
    }


def _airflow_app(fake: FakeAirflow) -> FastAPI:
    app = FastAPI()
    prefix = "/api/v2/dags/{dag_id}/dagRuns"

    tokens = {f"Bearer jwt-of-{user}": user for user in USERS}

    @app.middleware("http")
    async def bearer_only(request: Request, call_next: Any) -> Any:
        if request.url.path.startswith("/api/v2/"):
            header = request.headers.get("Authorization")
            fake.auth_headers.append(header)
            if header not in tokens:
                return JSONResponse({"detail": "Not authenticated"}, status_code=401)
            request.state.user = tokens[header]
        return await call_next(request)

    @app.post("/auth/token", status_code=201)
    def token(body: LoginBody) -> Any:
        fake.logins.append(body.model_dump())
        if USERS.get(body.username) != body.password:
            return JSONResponse({"detail": "Invalid credentials"}, status_code=401)
        return {"access_token": f"jwt-of-{body.username}"}

    @app.post(prefix)
    def trigger(dag_id: str, body: TriggerBody) -> Any:
        now = datetime.now(UTC)
        run = FakeRun(dag_id, f"manual__{now.isoformat()}", now, list(fake.new_run_states), conf=body.conf)
        run.tasks = [FakeTask("work", return_value={"summary": f"{dag_id} done"})]
        if dag_id in fake.on_trigger:
            fake.on_trigger[dag_id](run)
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
        return {"dag_runs": [r.read() for r in _page(runs, query)], "total_entries": len(runs)}

    @app.get(prefix + "/{run_id}")
    def get_run(dag_id: str, run_id: str) -> Any:
        run = fake.find(dag_id, run_id)
        if run is None:
            return _not_found(f"The DagRun with dag_id: `{dag_id}` and run_id: `{run_id}` was not found")
        return run.read()

    @app.get(prefix + "/{run_id}/taskInstances")
    def task_instances(dag_id: str, run_id: str, request: Request) -> Any:
        query = dict(request.query_params)
        if (dag_id, run_id) == ("~", "~"):  # every DAG's runs, due at or after run_after_gte
            gte = datetime.fromisoformat(query["run_after_gte"])
            runs = [r for r in fake.runs if r.run_after >= gte]
            items = [_ti_answer(r, t) for r in runs for t in r.tasks]
            return {"task_instances": _page(items, query), "total_entries": len(items)}
        run = fake.find(dag_id, run_id)
        if run is None:
            return _not_found("DagRun not found")
        items = [_ti_answer(run, t) for t in run.tasks]
        return {"task_instances": _page(items, query), "total_entries": len(items)}

    @app.get(prefix + "/{run_id}/hitlDetails")
    def forms(dag_id: str, run_id: str, request: Request) -> Any:
        """Airflow's list of human-in-the-loop forms ("~": every DAG or run), built with its own models."""
        from airflow.api_fastapi.core_api.datamodels.hitl import HITLDetail

        query = dict(request.query_params)
        fake.form_queries.append(query)
        states = request.query_params.getlist("state")
        received = query.get("response_received")
        found = []
        for run in fake.runs:
            if dag_id not in ("~", run.dag_id) or run_id not in ("~", run.run_id):
                continue
            for task in run.tasks:
                form = task.form
                if form is None or (states and task.state not in states):
                    continue
                if received is not None and (form.response is not None) != (received == "true"):
                    continue
                detail = HITLDetail.model_validate(
                    {
                        "options": form.options,
                        "subject": form.subject,
                        "body": "Read the model card before you answer.",
                        "params": {
                            key: {"value": value, "description": None, "schema": {"type": "string"}}
                            for key, value in form.params.items()
                        },
                        "assigned_users": [{"id": user, "name": user} for user in form.assigned],
                        "created_at": form.created_at,
                        "response_received": form.response is not None,
                        "task_instance": _ti_answer(run, task),
                    }
                )
                found.append(detail.model_dump(mode="json", by_alias=True))
        return {"hitl_details": _page(found, query), "total_entries": len(found)}

    @app.patch(prefix + "/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails")
    def answer_form(
        dag_id: str, run_id: str, task_id: str, map_index: int, request: Request, body: dict[str, Any]
    ) -> Any:
        """Airflow's checks, in its order: the form exists, is unanswered, the user is assigned, the
        options are offered (``update_hitl_detail``)."""
        from airflow.api_fastapi.core_api.datamodels.hitl import HITLDetailResponse, UpdateHITLDetailPayload

        payload = UpdateHITLDetailPayload.model_validate(body)
        user = request.state.user

        def answered(status: int, detail: Any) -> Any:
            fake.answers.append((user, task_id, map_index, status, body))
            return detail if status == 200 else JSONResponse({"detail": detail}, status_code=status)

        _, task = _task(dag_id, run_id, task_id, map_index)
        if task is None or task.form is None:
            return answered(404, "Human-in-the-loop detail does not exist for Task Instance")
        form = task.form
        if form.response is not None:
            return answered(409, "Human-in-the-loop detail has already been updated")
        if form.assigned and not fake.all_admins and user not in form.assigned:
            return answered(403, f"User={user} (id={user}) is not a respondent for the task.")
        invalid = set(payload.chosen_options) - set(form.options)
        if invalid:
            return answered(400, f"Invalid options {sorted(invalid)}")
        form.response = {
            "responded_by": {"id": user, "name": user},
            "responded_at": datetime.now(UTC),
            "chosen_options": payload.chosen_options,
            "params_input": dict(payload.params_input),
        }
        if form.resume is not None and task.state == "awaiting_input":
            form.resume(task, form.response)
        return answered(200, HITLDetailResponse.model_validate(form.response).model_dump(mode="json"))

    def _task(
        dag_id: str, run_id: str, task_id: str, map_index: int
    ) -> tuple[FakeRun | None, FakeTask | None]:
        run = fake.find(dag_id, run_id)
        tasks = run.tasks if run else []
        return run, next((t for t in tasks if t.task_id == task_id and t.map_index == map_index), None)

    @app.get(prefix + "/{run_id}/taskInstances/{task_id}/xcomEntries/{key}")
    def xcom_entry(dag_id: str, run_id: str, task_id: str, key: str, map_index: int = -1) -> Any:
        run, task = _task(dag_id, run_id, task_id, map_index)
        if run is None or task is None or key != "return_value" or task.return_value is None:
            return _not_found(f"XCom entry with key: `{key}` not found")
        return {
            "key": key,
            "timestamp": _iso(run.run_after),
            "logical_date": None,
            "map_index": map_index,
            "task_id": task_id,
            "dag_id": dag_id,
            "run_id": run_id,
            "dag_display_name": dag_id,
            "task_display_name": task_id,
            "run_after": _iso(run.run_after),
            "value": task.return_value,
        }

    @app.get(prefix + "/{run_id}/taskInstances/{task_id}/logs/{try_number}")
    def task_log(
        dag_id: str, run_id: str, task_id: str, try_number: int, request: Request, map_index: int = -1
    ) -> Any:
        fake.log_queries.append(
            (task_id, try_number, dict(request.query_params), request.headers.get("Accept"))
        )
        _, task = _task(dag_id, run_id, task_id, map_index)
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


def test_triggered_run_with_mapped_and_unmapped_results(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    api = AirflowApi(url, "admin", PASSWORD)
    conf = {"models": [], "versions": [], "reason": None, "dry_run": True}
    run_id = api.trigger(driver.RETIREMENT_DAG, conf)
    run = fake.find(driver.RETIREMENT_DAG, run_id)
    assert run is not None and run.conf == conf  # JSON types arrive as such: a list, null, a bool
    run.tasks = [
        FakeTask("load", return_value='"just a path"'),
        FakeTask("no_xcom"),
        FakeTask(
            "retire_versions",
            map_index=1,
            rendered_map_index="diabetes_progression",
            return_value=json.dumps(
                _serde({"model_name": "diabetes_progression", "summary": "nothing", "v": (1,)})
            ),
        ),
        FakeTask(
            "retire_versions",
            map_index=0,
            rendered_map_index="ctr_recommender",
            return_value={"model_name": "ctr_recommender", "summary": "retired v1"},
        ),
        FakeTask(
            "retire_versions",
            state="failed",
            map_index=2,
            rendered_map_index="x",
            return_value={"summary": "?"},
        ),
        FakeTask("report", return_value={"summary": "2 models"}),
    ]
    result = wait_for_run(api, "retirement", driver.RETIREMENT_DAG, run_id, timeout=20, poll_seconds=0.02)
    assert run.reads >= 3  # queued, running, success
    assert (result.stage, result.dag_id, result.run_id, result.state) == (
        "retirement",
        driver.RETIREMENT_DAG,
        run_id,
        "success",
    )
    assert result.seconds == pytest.approx(12.5)  # end_date - start_date, not the time spent polling
    assert [(o.task_id, o.map_index, o.label) for o in result.outcomes] == [
        ("report", -1, "report"),
        ("retire_versions", 0, "ctr_recommender"),
        ("retire_versions", 1, "diabetes_progression"),
    ]
    assert result.for_model("diabetes_progression").value == {  # type: ignore[union-attr]
        "model_name": "diabetes_progression",
        "summary": "nothing",
        "v": [1],
    }
    assert stage_lines(result)[1].endswith("s  ctr_recommender: retired v1")
    assert set(fake.auth_headers) == {f"Bearer {TOKEN}"}


def test_failed_run_raises_with_the_mapped_task_log(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    fake.runs.append(
        FakeRun(
            driver.TRAINING_DAG,
            "asset_triggered__1",
            T0,
            ["running", "failed"],
            tasks=[
                FakeTask("train_and_register", map_index=0, rendered_map_index="ctr_recommender"),
                FakeTask(
                    "train_and_register",
                    state="failed",
                    map_index=1,
                    rendered_map_index="diabetes_progression",
                    try_number=2,
                    log=FAILED_TASK_LOG,
                ),
            ],
        )
    )
    api = AirflowApi(url, "admin", PASSWORD)
    with pytest.raises(StageFailed) as info:
        wait_for_run(
            api, "training", driver.TRAINING_DAG, "asset_triggered__1", timeout=20, poll_seconds=0.02
        )
    message = str(info.value)
    assert f"stage training ({driver.TRAINING_DAG}) run asset_triggered__1 failed" in message
    assert (
        "task train_and_register[diabetes_progression] (map index 1) failed; last lines of its log:"
        in message
    )
    assert "ERROR Task failed with exception" in message and "boom: AUC below floor" in message
    task_id, try_number, query, accept = fake.log_queries[-1]
    assert (task_id, try_number) == ("train_and_register", 2)
    assert query == {"full_content": "true", "map_index": "1"}
    assert accept == "application/json"


def test_failed_run_of_an_unmapped_task(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    tasks = [FakeTask("check", state="failed", log=FAILED_TASK_LOG)]
    fake.runs.append(FakeRun(driver.GATE_DAG, "r", T0, ["failed"], tasks=tasks))
    api = AirflowApi(url, "admin", PASSWORD)
    with pytest.raises(StageFailed, match=r"task check failed; last lines of its log:"):
        wait_for_run(api, "gate", driver.GATE_DAG, "r", timeout=20, poll_seconds=0.02)
    assert fake.log_queries[-1][2]["map_index"] == "-1"


def test_failed_run_without_a_failed_task(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    fake.runs.append(FakeRun(driver.GATE_DAG, "r", T0, ["failed"], tasks=[FakeTask("check")]))
    api = AirflowApi(url, "admin", PASSWORD)
    with pytest.raises(StageFailed, match="no failed task instance"):
        wait_for_run(api, "gate", driver.GATE_DAG, "r", timeout=20, poll_seconds=0.02)


def test_a_run_that_never_finishes_times_out(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    fake.runs.append(FakeRun(driver.DRIFT_DAG, "stuck", T0, ["queued", "running"]))
    api = AirflowApi(url, "admin", PASSWORD)
    with pytest.raises(StageFailed) as info:
        wait_for_run(api, "monitoring", driver.DRIFT_DAG, "stuck", timeout=1, poll_seconds=0.05)
    message = str(info.value)
    assert f"stage monitoring ({driver.DRIFT_DAG}) did not finish within 1 s" in message
    assert "run stuck is running" in message and "make down" in message


def test_runs_since_lists_asset_triggered_runs_newest_first(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    since = datetime.now(UTC)
    fake.runs += [
        FakeRun(driver.TRAINING_DAG, "old", since - timedelta(minutes=5), ["success"]),
        FakeRun(driver.TRAINING_DAG, "first", since + timedelta(seconds=1), ["success"], "asset_triggered"),
        FakeRun(driver.TRAINING_DAG, "second", since + timedelta(seconds=2), ["running"], "asset_triggered"),
        FakeRun(driver.GATE_DAG, "other_dag", since + timedelta(seconds=3), ["success"]),
    ]
    api = AirflowApi(url, "admin", PASSWORD)
    assert [run["dag_run_id"] for run in api.runs_since(driver.TRAINING_DAG, since)] == ["second", "first"]
    assert datetime.fromisoformat(fake.list_queries[-1]["run_after_gte"]) == since


def test_listings_longer_than_a_page_are_read_whole(airflow: tuple[FakeAirflow, str]) -> None:
    """Airflow answers at most 100 entries per call: monitoring 130 models maps 130 task instances into
    one run, and a busy day has more than 100 runs of a DAG. Every listing is read page by page."""
    fake, url = airflow
    since = datetime.now(UTC)
    tasks = [
        FakeTask("monitor_model", map_index=i, rendered_map_index=f"model_{i:03d}", return_value={"i": i})
        for i in range(130)
    ]
    fake.runs.append(
        FakeRun(driver.DRIFT_DAG, "many", since + timedelta(seconds=1), ["success"], tasks=tasks)
    )
    fake.runs += [
        FakeRun(driver.TRAINING_DAG, f"run_{i:03d}", since + timedelta(seconds=i), ["success"])
        for i in range(120)
    ]
    fake.runs[-1].tasks = [FakeTask("train_and_register")]
    api = AirflowApi(url, "admin", PASSWORD)
    listed = api.task_instances(driver.DRIFT_DAG, "many")
    assert [ti["map_index"] for ti in listed] == list(range(130))
    runs = api.runs_since(driver.TRAINING_DAG, since)
    assert [run["dag_run_id"] for run in runs] == [f"run_{i:03d}" for i in reversed(range(120))]
    assert [q.get("offset") for q in fake.list_queries] == ["0", "100"]
    everything = api.task_instances_since(since)
    assert len(everything) == 131 and {ti["dag_id"] for ti in everything} == {
        driver.DRIFT_DAG,
        driver.TRAINING_DAG,
    }


# --- the gate's human approval, answered through the REST API ----------------------------------------

COMMENT = approvals.DEMO_COMMENT


def _gate_run(*tasks: FakeTask, run_id: str = "gate_1", run_after: datetime = T0) -> FakeRun:
    return FakeRun(
        driver.GATE_DAG, run_id, run_after, ["running", "success"], "asset_triggered", tasks=list(tasks)
    )


def _auto_gate_task(model: str, map_index: int) -> FakeTask:
    return FakeTask(
        "evaluate_policy", map_index=map_index, rendered_map_index=model, return_value=_gate_value(model)
    )


def test_the_approval_form_the_driver_reads_is_the_gate_operators(monkeypatch: pytest.MonkeyPatch) -> None:
    """The form's option, comment field and subject as the real gate operator writes them."""
    from types import SimpleNamespace

    from airflow.providers.standard.operators.hitl import HITLOperator

    from modelops.operators.compliance import COMMENT_PARAM, ComplianceGateOperator
    from modelops.stages.compliance import APPROVAL_OPTIONS, APPROVE

    assert (approvals.APPROVE, approvals.COMMENT_PARAM) == (APPROVE, COMMENT_PARAM)
    seen: dict[str, Any] = {}

    def parked(self: HITLOperator, context: Any) -> None:
        seen.update(subject=self.subject, users=self.assigned_users, options=self.options, params=self.params)

    monkeypatch.setattr(HITLOperator, "execute", parked)
    operator = ComplianceGateOperator(task_id="evaluate_policy", model=HIGH_RISK)
    operator._ask_approvers(SimpleNamespace(details={"version": "7"}), {})  # type: ignore[arg-type]
    assert list(seen["options"]) == list(APPROVAL_OPTIONS) and COMMENT_PARAM in seen["params"]
    ti = {"task_id": "evaluate_policy", "dag_id": driver.GATE_DAG, "dag_run_id": "r", "map_index": 1}
    detail = {
        "subject": seen["subject"],
        "assigned_users": seen["users"],
        "options": seen["options"],
        "created_at": _iso(T0),
        "task_instance": {
            **ti,
            "rendered_map_index": HIGH_RISK,
            "state": "awaiting_input",
            "run_after": _iso(T0),
        },
    }
    pending = approvals.PendingApproval.from_detail(detail)
    assert (pending.model, pending.version, pending.policy, pending.assigned) == (
        HIGH_RISK,
        "7",
        "strict@2",
        ("risk_officer",),
    )
    assert (pending.run_id, pending.map_index, pending.run_after) == ("r", 1, T0)
    assert pending.what == "diabetes_progression v7"


def test_the_form_calls_use_parameters_airflows_api_has() -> None:
    import yaml

    spec_file = (
        Path(sys.modules["airflow"].__file__).parent
        / "api_fastapi/core_api/openapi/v2-rest-api-generated.yaml"
    )
    spec = yaml.safe_load(spec_file.read_text())
    listing = spec["paths"]["/api/v2/dags/{dag_id}/dagRuns/{dag_run_id}/hitlDetails"]["get"]
    assert {"response_received", "state", "limit"} <= {param["name"] for param in listing["parameters"]}
    form = "/api/v2/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances/{task_id}/{map_index}/hitlDetails"
    assert {"403", "409", "404"} <= set(spec["paths"][form]["patch"]["responses"])
    payload = spec["components"]["schemas"]["UpdateHITLDetailPayload"]
    assert set(payload["properties"]) == {"chosen_options", "params_input"}


def test_answering_a_form_through_the_rest_api(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    fake.runs.append(_gate_run(_auto_gate_task("ctr_recommender", 0), _awaiting_gate_task(HIGH_RISK, 1)))
    admin = AirflowApi(url, "admin", PASSWORD)
    officer = AirflowApi(url, APPROVER, APPROVER_PASSWORD)
    assert (admin.username, officer.username) == ("admin", "risk_officer")
    (detail,) = admin.awaiting_input(driver.GATE_DAG)
    assert detail["task_instance"]["rendered_map_index"] == HIGH_RISK
    assert detail["assigned_users"] == [{"id": "risk_officer", "name": "risk_officer"}]
    assert fake.form_queries[-1] == {
        "response_received": "false",
        "state": "awaiting_input",
        "limit": "100",
        "offset": "0",
    }

    def answer(api: AirflowApi, options: list[str], map_index: int = 1) -> Any:
        return api.respond(
            driver.GATE_DAG, "gate_1", "evaluate_policy", map_index, options, {"comment": "ok"}
        )

    refused = answer(admin, ["Approve"])  # returned, not raised: the caller shows it
    assert (refused.status, refused.accepted) == (403, False)
    assert refused.detail == "User=admin (id=admin) is not a respondent for the task."
    assert answer(officer, ["Maybe"]).status == 400
    accepted = answer(officer, ["Approve"])
    assert accepted.accepted and accepted.body["responded_by"] == {
        "id": "risk_officer",
        "name": "risk_officer",
    }
    assert accepted.body["chosen_options"] == ["Approve"] and accepted.body["params_input"] == {
        "comment": "ok"
    }
    assert answer(officer, ["Approve"]).status == 409
    assert answer(officer, ["Approve"], map_index=0).status == 404  # the automatic one has no form
    assert admin.awaiting_input(driver.GATE_DAG) == []


def test_wait_for_run_approves_a_gate_task_awaiting_input_as_the_approver(
    airflow: tuple[FakeAirflow, str],
) -> None:
    fake, url = airflow
    fake.runs.append(_gate_run(_auto_gate_task("ctr_recommender", 0), _awaiting_gate_task(HIGH_RISK, 1)))
    api = AirflowApi(url, "admin", PASSWORD)
    lines: list[str] = []
    approver = approvals.Approver(
        api, {APPROVER: APPROVER_PASSWORD}, dag_id=driver.GATE_DAG, out=lines.append
    )
    result = wait_for_run(
        api, "gate", driver.GATE_DAG, "gate_1", timeout=20, poll_seconds=0.02, on_poll=approver
    )
    assert result.state == "success"
    approval = result.for_model(HIGH_RISK).value["approval"]  # type: ignore[union-attr]
    assert (approval["mode"], approval["by"], approval["comment"]) == ("human", "risk_officer", COMMENT)
    assert [line.split(" s  ", 1)[1] for line in stage_lines(result)] == [
        "ctr_recommender v3 approved automatically: 12/12 checks passed (standard@3)",
        f"diabetes_progression v1 approved by risk_officer (risk_officer): {COMMENT}",
    ]
    assert [(a.pending.model, a.by, a.comment, a.refusal.status) for a in approver.answered] == [  # type: ignore[union-attr]
        (HIGH_RISK, "risk_officer", COMMENT, 403)
    ]
    assert [(user, status) for user, _, _, status, _ in fake.answers] == [
        ("admin", 403),
        ("risk_officer", 200),
    ]
    assert len(lines) == 3 and "admin tried first: HTTP 403" in lines[1]
    assert approver() == 0 and len(fake.answers) == 2  # nothing left to answer


def test_a_run_whose_approval_nobody_gives_times_out_naming_the_waiting_task(
    airflow: tuple[FakeAirflow, str],
) -> None:
    fake, url = airflow
    fake.runs.append(_gate_run(_auto_gate_task("ctr_recommender", 0), _awaiting_gate_task(HIGH_RISK, 1)))
    api = AirflowApi(url, "admin", PASSWORD)
    with pytest.raises(StageFailed) as info:
        wait_for_run(api, "gate", driver.GATE_DAG, "gate_1", timeout=0.3, poll_seconds=0.05)
    message = str(info.value)
    assert (
        "did not finish within 0 s: run gate_1 is running, with diabetes_progression awaiting input"
        in message
    )
    assert "Required Actions" in message and fake.answers == []


def test_an_answer_starts_the_stage_timeout_again(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    fake.runs.append(FakeRun(driver.GATE_DAG, "slow", T0, ["running"] * 12 + ["success"]))
    api = AirflowApi(url, "admin", PASSWORD)
    calls: list[int] = []

    def answering() -> int:  # answers something on each of its first 11 polls
        calls.append(1)
        return 1 if len(calls) <= 11 else 0

    # 12 polls of 0.1 s outlast the 0.5 s timeout; each answer starts it again.
    result = wait_for_run(
        api, "gate", driver.GATE_DAG, "slow", timeout=0.5, poll_seconds=0.1, on_poll=answering
    )
    assert result.state == "success" and len(calls) == 12


def test_approver_shows_the_refusal_once_and_leaves_older_runs_alone(
    airflow: tuple[FakeAirflow, str],
) -> None:
    fake, url = airflow
    since = datetime.now(UTC)
    fake.runs += [
        _gate_run(
            _awaiting_gate_task(HIGH_RISK, 0),
            run_id="left_by_an_earlier_demo",
            run_after=since - timedelta(hours=1),
        ),
        _gate_run(_awaiting_gate_task(HIGH_RISK, 0), _awaiting_gate_task(HIGH_RISK, 1), run_after=since),
    ]
    api = AirflowApi(url, "admin", PASSWORD)
    lines: list[str] = []
    approver = approvals.Approver(
        api, {APPROVER: APPROVER_PASSWORD}, dag_id=driver.GATE_DAG, since=since, out=lines.append
    )
    assert [(p.run_id, p.map_index) for p in approver.pending()] == [("gate_1", 0), ("gate_1", 1)]
    assert approver() == 2
    assert [(user, index, status) for user, _, index, status, _ in fake.answers] == [
        ("admin", 0, 403),
        ("risk_officer", 0, 200),
        ("risk_officer", 1, 200),
    ]
    assert sum("tried first" in line for line in lines) == 1
    assert fake.logins.count({"username": "risk_officer", "password": APPROVER_PASSWORD}) == 1  # one login
    (old,) = api.awaiting_input(driver.GATE_DAG)
    assert old["task_instance"]["dag_run_id"] == "left_by_an_earlier_demo"


def test_approver_when_someone_answered_in_the_ui_first(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    task = _awaiting_gate_task(HIGH_RISK, 0)
    fake.runs.append(_gate_run(task))
    lines: list[str] = []
    approver = approvals.Approver(
        AirflowApi(url, "admin", PASSWORD),
        {APPROVER: APPROVER_PASSWORD},
        dag_id=driver.GATE_DAG,
        out=lines.append,
    )
    (pending,) = approver.pending()
    assert task.form is not None
    task.form.response = {"chosen_options": ["Reject"]}  # answered under Required Actions meanwhile
    assert approver.answer(pending) == 0
    assert (
        lines[-1]
        == "  approval     diabetes_progression v1 was answered already (HTTP 409); the gate records that answer"
    )
    assert approver.pending() == [] and approver.answered == []


def test_approver_fails_clearly_without_a_login_for_the_named_approver(
    airflow: tuple[FakeAirflow, str],
) -> None:
    fake, url = airflow
    fake.runs.append(_gate_run(_awaiting_gate_task(HIGH_RISK, 0, assigned=["chief_risk_officer"])))
    approver = approvals.Approver(
        AirflowApi(url, "admin", PASSWORD), {APPROVER: APPROVER_PASSWORD}, dag_id=driver.GATE_DAG, out=print
    )
    with pytest.raises(
        StageFailed, match=r"awaits approval by chief_risk_officer; the demo logs in only as risk_officer"
    ):
        approver()
    assert fake.answers == []


def test_approver_stops_when_airflow_takes_the_admins_answer(airflow: tuple[FakeAirflow, str]) -> None:
    fake, url = airflow
    fake.all_admins = True  # [core] simple_auth_manager_all_admins: anyone may answer
    fake.runs.append(_gate_run(_awaiting_gate_task(HIGH_RISK, 0)))
    approver = approvals.Approver(
        AirflowApi(url, "admin", PASSWORD), {APPROVER: APPROVER_PASSWORD}, dag_id=driver.GATE_DAG, out=print
    )
    with pytest.raises(StageFailed, match=r"Airflow took admin's answer.*simple_auth_manager_all_admins"):
        approver()


def test_approval_text() -> None:
    assert approvals.approval_text(AUTO_APPROVAL) == "approved automatically (policy standard@3)"
    assert approvals.approval_text({"mode": "automatic"}) == "approved automatically"
    human = {"mode": "human", "by": "risk_officer", "by_name": "risk_officer", "comment": " Looks fine. "}
    assert approvals.approval_text(human) == "approved by risk_officer: Looks fine."
    assert approvals.approval_text({**human, "by_name": "Rita Officer"}) == (
        "approved by risk_officer (Rita Officer): Looks fine."
    )
    assert approvals.approval_text({**human, "comment": ""}) == "approved by risk_officer"
    assert approvals.approval_text({"mode": "human"}) is None
    assert approvals.approval_text({"mode": "other"}) is None
    report = driver.ModelReport(load_catalog().model(HIGH_RISK), champion_before=None)
    assert report.approval() == "(no result for this model)"
    report.results["gate"] = TaskOutcome("evaluate_policy", 0, HIGH_RISK, {"summary": "v1 rejected: stale"})
    assert report.approval() == "v1 rejected: stale"  # no approval: the gate's own summary


@dataclass
class FakeMlflow:
    """Each read of a model answers the next of its champion versions; None: the model does not exist."""

    champions: dict[str, list[str | None]] = field(default_factory=dict)
    reads: dict[str, int] = field(default_factory=dict)
    # name -> true while the alias may not move yet (the version awaits its approval)
    held: dict[str, Callable[[], bool]] = field(default_factory=dict)

    def read(self, name: str) -> str | None:
        versions = self.champions.get(name, [None])
        if name in self.held and self.held[name]():
            return versions[0]
        index = self.reads.get(name, 0)
        self.reads[name] = index + 1
        return versions[min(index, len(versions) - 1)]


def _mlflow_app(fake: FakeMlflow) -> FastAPI:
    app = FastAPI()

    @app.get("/api/2.0/mlflow/registered-models/get")
    def get_model(name: str) -> Any:
        champion = fake.read(name)
        if champion is None:
            return JSONResponse(
                {
                    "error_code": "RESOURCE_DOES_NOT_EXIST",
                    "message": f"Registered Model with name={name} not found",
                },
                status_code=404,
            )
        versions = [str(v) for v in range(1, int(champion) + 1)]
        aliases = {"champion": champion}
        if int(champion) > 1:
            aliases["previous_champion"] = str(int(champion) - 1)
        return _mlflow_answer(versions, aliases, name=name)

    return app


PREDICTIONS = {"ctr_recommender": [0.9, 0.1], "diabetes_progression": 152.34}


@dataclass
class FakeGateway:
    calls: list[tuple[str, str | None, list[str], int]] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    labels: list[tuple[str, list[int]]] = field(default_factory=list)  # POST /labels: (request id, labels)

    def rows(self, model: str) -> int:
        return sum(rows for name, _, _, rows in self.calls if name == model)


def _gateway_app(fake: FakeGateway) -> FastAPI:
    app = FastAPI()

    @app.post("/models/{name}/invocations")
    async def invocations(name: str, request: Request) -> Any:
        split = (await request.json())["dataframe_split"]
        fake.calls.append((name, request.headers.get("X-Caller-Id"), split["columns"], len(split["data"])))
        if name not in PREDICTIONS:
            return JSONResponse({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": name}, status_code=404)
        request_id = uuid.uuid4().hex
        fake.request_ids.append(request_id)
        return JSONResponse(
            {"predictions": [PREDICTIONS[name]] * len(split["data"])}, headers={"X-Request-Id": request_id}
        )

    @app.post("/labels")
    async def labels(request: Request) -> Any:
        body = await request.json()
        if body["request_id"] not in fake.request_ids:
            return JSONResponse({"error_code": "RESOURCE_DOES_NOT_EXIST"}, status_code=404)
        fake.labels.append((body["request_id"], body["labels"]))
        return {"request_id": body["request_id"], "accepted": len(body["labels"])}

    return app


def test_mlflow_api_reads_the_champion(airflow: tuple[FakeAirflow, str]) -> None:
    fake = FakeMlflow(champions={"ctr_recommender": ["4"]})
    with serve_in_thread(_mlflow_app(fake)) as url:
        mlflow = MlflowApi(url)
        assert mlflow.champion("ctr_recommender") == "4"
        facts = mlflow.model("ctr_recommender")
        assert facts is not None and facts.aliases == {"champion": "4", "previous_champion": "3"}
        assert facts.latest_version == "4"
        assert mlflow.model("never_trained") is None and mlflow.champion("never_trained") is None


def test_send_rows_counts_answers_per_request() -> None:
    fake = FakeGateway()
    with serve_in_thread(_gateway_app(fake)) as url, httpx.Client(trust_env=False) as client:
        rows = [[1, 2.5]] * 12
        count = send_rows(url, "diabetes_progression", ["age", "bmi"], rows, client)
        assert (count.requests, count.ok, count.failed, count.rows_scored) == (3, 3, 0, 12)
        assert [call[1] for call in fake.calls] == ["web-shop", "mobile-app", "email-campaign"]
        assert [call[3] for call in fake.calls] == [5, 5, 2]
        unknown = send_rows(url, "nobody", ["age"], [[1]], client)
        assert (unknown.ok, unknown.failed) == (0, 1) and "HTTP 404" in unknown.errors[0]
        assert "0 ok, 1 failed" in unknown.line() and "first error: request 0: HTTP 404" in unknown.line()


# --- the lifecycle of two models against the stand-ins ----------------------------------------------

TRAINED = {
    "ctr_recommender": {"version": "3", "metrics": {"holdout_roc_auc": 0.8123, "holdout_log_loss": 0.41}},
    "diabetes_progression": {"version": "1", "metrics": {"holdout_rmse": 54.87, "holdout_r2": 0.45}},
}
ASSET_TASKS = (
    (driver.TRAINING_DAG, "train_and_register", "registered"),
    (driver.GATE_DAG, "evaluate_policy", "approved"),
    (driver.DEPLOYMENT_DAG, "deploy_to_gateway", "is champion"),
)


def _mapped(task_id: str, models: tuple[str, ...], value: Callable[[str], dict[str, Any]]) -> list[FakeTask]:
    return [
        FakeTask(task_id, map_index=index, rendered_map_index=model, return_value=value(model))
        for index, model in enumerate(models)
    ]


AUTO_APPROVAL = {
    "mode": "automatic",
    "by": "policy standard@3",
    "reason": "policy standard requires no human approval for risk tier medium",
    "approved_at": "2026-05-09T07:00:09+00:00",
    "valid_until": "2026-05-16T07:00:09+00:00",
}
HIGH_RISK = "diabetes_progression"  # policy strict: a person approves


def _human_approval(task: FakeTask, response: dict[str, Any]) -> None:
    """What the gate task returns once resumed with an approval (``decide_approval``)."""
    model = task.rendered_map_index or ""
    version = TRAINED[model]["version"]
    user = response["responded_by"]["id"]
    comment = response["params_input"].get("comment", "")
    approval = {
        "mode": "human",
        "answer": response["chosen_options"][0],
        "by": user,
        "by_name": response["responded_by"]["name"],
        "comment": comment,
        "approvers": [APPROVER],
        "valid_until": "2026-05-11T07:00:20+00:00",
    }
    task.state = "success"
    task.return_value = {
        "model_name": model,
        "version": version,
        "verdict": "approved",
        "approval": approval,
        "summary": f"{model} v{version} approved by {user} ({user}): {comment}",
    }


def _awaiting_gate_task(model: str, map_index: int, **form: Any) -> FakeTask:
    """The gate's task of a model whose policy needs a person's approval, parked in awaiting_input."""
    version = TRAINED[model]["version"]
    return FakeTask(
        "evaluate_policy",
        state="awaiting_input",
        map_index=map_index,
        rendered_map_index=model,
        form=FakeForm(
            f"Approve {model} v{version} for release? (policy strict@2)", resume=_human_approval, **form
        ),
    )


def _gate_value(model: str) -> dict[str, Any]:
    version = TRAINED[model]["version"]
    return {
        "model_name": model,
        "version": version,
        "verdict": "approved",
        "approval": AUTO_APPROVAL,
        "summary": f"{model} v{version} approved automatically: 12/12 checks passed (standard@3)",
    }


def _asset_runs(start: datetime, *, coalesced: bool) -> list[FakeRun]:
    """Training, gate and deployment runs as the scheduler starts them from Asset events; the high-risk
    model's gate task awaits its approval."""
    groups = [DEMO_MODELS] if coalesced else [(model,) for model in DEMO_MODELS]
    runs = []
    for step, (dag_id, task_id, verb) in enumerate(ASSET_TASKS):

        def value(model: str, dag_id: str = dag_id, verb: str = verb) -> dict[str, Any]:
            version = TRAINED[model]["version"]
            result = {"model_name": model, "version": version, "summary": f"{model} v{version} {verb}"}
            if dag_id == driver.TRAINING_DAG:
                result["metrics"] = TRAINED[model]["metrics"]
            if dag_id == driver.GATE_DAG:
                result = _gate_value(model)
            return result

        for index, group in enumerate(groups):
            tasks = _mapped(task_id, group, value)
            if dag_id == driver.GATE_DAG:
                tasks = [
                    _awaiting_gate_task(t.rendered_map_index, t.map_index)
                    if t.rendered_map_index == HIGH_RISK
                    else t
                    for t in tasks
                ]
            runs.append(
                FakeRun(
                    dag_id,
                    f"asset_triggered__{step}_{index}",
                    start + timedelta(seconds=1 + 3 * step + index),
                    ["queued", "running", "success"],
                    run_type="asset_triggered",
                    hidden_list_reads=2 + step,  # the scheduler creates them a little later
                    tasks=tasks,
                )
            )
    return runs


def _approved(fake: FakeAirflow, model: str) -> bool:
    """Whether ``model``'s gate form has an answer (its champion may move only then)."""
    return any(
        task.form is not None and task.form.response is not None
        for run in fake.runs
        if run.dag_id == driver.GATE_DAG
        for task in run.tasks
        if task.rendered_map_index == model
    )


def _scenario(fake: FakeAirflow, gateway: FakeGateway, *, coalesced: bool = True) -> None:
    def validation(run: FakeRun) -> None:
        run.tasks = _mapped(
            "validate_dataset",
            ("ctr_clicks", "diabetes"),
            lambda name: {"summary": f"{name}: new version valid"},
        )
        fake.runs.extend(_asset_runs(run.run_after, coalesced=coalesced))

    def drift(run: FakeRun) -> None:
        run.tasks = _mapped(
            "assess_drift",
            DEMO_MODELS,
            lambda model: {
                "model_name": model,
                "version": TRAINED[model]["version"],
                "verdict": "ok",
                "rows": gateway.rows(model),
                "summary": f"ok: {gateway.rows(model)} rows, 0 drifted features",
            },
        )

    def retirement(run: FakeRun) -> None:
        run.tasks = _mapped(
            "retire_versions",
            DEMO_MODELS,
            lambda model: {"model_name": model, "summary": "retired nothing (dry run)"},
        )

    fake.on_trigger = {
        driver.VALIDATION_DAG: validation,
        driver.DRIFT_DAG: drift,
        driver.RETIREMENT_DAG: retirement,
    }


@dataclass
class Stack:
    airflow: FakeAirflow
    mlflow: FakeMlflow
    gateway: FakeGateway
    api: AirflowApi
    mlflow_api: MlflowApi
    gateway_url: str


@pytest.fixture
def fake_stack(airflow: tuple[FakeAirflow, str], incoming: Path) -> Iterator[Stack]:
    fake, url = airflow
    registry = FakeMlflow(
        champions={
            # Read once before the datasets are dropped, then until the alias moves.
            "ctr_recommender": ["2"] * 8 + ["3"],
            "diabetes_progression": [None] * 10 + ["1"],
        },
        held={HIGH_RISK: lambda: not _approved(fake, HIGH_RISK)},
    )
    gateway = FakeGateway()
    with (
        serve_in_thread(_mlflow_app(registry)) as mlflow_url,
        serve_in_thread(_gateway_app(gateway)) as gateway_url,
    ):
        yield Stack(
            fake, registry, gateway, AirflowApi(url, "admin", PASSWORD), MlflowApi(mlflow_url), gateway_url
        )


def _drive(stack_: Stack, lines: list[str], **overrides: Any) -> driver.LifecycleReport:
    settings: dict[str, Any] = {
        "out": lines.append,
        "champion_timeout": 30,
        "stage_timeout": 30,
        "poll_seconds": 0.02,
        "simulated_requests": 4,
        "sampled_requests": 3,
        "approver_passwords": {APPROVER: APPROVER_PASSWORD},
        "incident_model": None,  # the incident's own tests turn it on
        "canary_rollback_model": None,  # as is the canary that must lose
        **overrides,
    }
    return driver.drive(stack_.api, stack_.mlflow_api, stack_.gateway_url, load_catalog(), **settings)


@pytest.mark.parametrize("coalesced", [True, False], ids=["one-run-for-both", "a-run-per-model"])
def test_drive_runs_both_models_through_the_six_stages(
    fake_stack: Stack, incoming: Path, coalesced: bool
) -> None:
    _scenario(fake_stack.airflow, fake_stack.gateway, coalesced=coalesced)
    lines: list[str] = []
    report = _drive(fake_stack, lines)

    # A new file in each dataset's incoming folder, nothing half-written left beside it.
    assert set(report.drops) == {"ctr_clicks", "diabetes"}
    for name, drop in report.drops.items():
        assert drop.path.parent == incoming / name and drop.path.name.startswith(f"{name}-")
        assert [p.name for p in drop.path.parent.iterdir()] == [drop.path.name]
    assert (report.drops["ctr_clicks"].rows, report.drops["diabetes"].rows) == (20_000, 442)

    # The driver triggers validation, monitoring and retirement only, with typed conf.
    airflow = fake_stack.airflow
    manual = {run.dag_id: run.conf for run in airflow.runs if run.run_type == "manual"}
    assert set(manual) == {driver.VALIDATION_DAG, driver.DRIFT_DAG, driver.RETIREMENT_DAG}
    assert manual[driver.VALIDATION_DAG] == {}
    drift_conf = manual[driver.DRIFT_DAG]
    assert drift_conf["models"] == [] and set(drift_conf) == {"models", "window_start", "window_end"}
    start, end = (datetime.fromisoformat(drift_conf[key]) for key in ("window_start", "window_end"))
    assert start.tzinfo is not None and start < end
    assert manual[driver.RETIREMENT_DAG] == {"models": [], "versions": [], "reason": None, "dry_run": True}

    ctr, diabetes = report.models["ctr_recommender"], report.models["diabetes_progression"]
    assert (ctr.champion_before, ctr.champion, ctr.trained_version) == ("2", "3", "3")
    assert (diabetes.champion_before, diabetes.champion, diabetes.trained_version) == (None, "1", "1")
    for model in (ctr, diabetes):
        assert set(model.results) == {"training", "gate", "deployment", "monitoring", "retirement"}
    assert ctr.fact("gate") == "ctr_recommender v3 approved automatically: 12/12 checks passed (standard@3)"
    assert ctr.approval() == "approved automatically (policy standard@3)"
    comment = "Reviewed the model card and gate report (make demo)"
    assert (
        diabetes.fact("gate") == f"diabetes_progression v1 approved by risk_officer (risk_officer): {comment}"
    )
    assert diabetes.approval() == f"approved by risk_officer: {comment}"

    # The high-risk model's approval: the admin is refused once (403), then risk_officer approves with
    # its own token, through the REST API, with the comment; nobody answers the automatic one.
    answers = [(user, task, index, status) for user, task, index, status, _ in airflow.answers]
    high_risk_index = 1 if coalesced else 0
    assert answers == [
        ("admin", "evaluate_policy", high_risk_index, 403),
        ("risk_officer", "evaluate_policy", high_risk_index, 200),
    ]
    assert airflow.answers[-1][4] == {"chosen_options": ["Approve"], "params_input": {"comment": comment}}
    assert {"username": "risk_officer", "password": APPROVER_PASSWORD} in airflow.logins
    assert airflow.form_queries[0] == {
        "response_received": "false",
        "state": "awaiting_input",
        "limit": "100",
        "offset": "0",
    }
    approval_lines = [line for line in lines if line.startswith("  approval     ")]
    assert approval_lines == [
        "  approval     diabetes_progression v1 awaits approval by risk_officer (policy strict@2); "
        "approving through the REST API as risk_officer",
        "  approval     admin tried first: HTTP 403 User=admin (id=admin) is not a respondent for the task. "
        "(admins are not approvers)",
        f"  approval     risk_officer answered Approve: '{comment}' (HTTP 200); the gate resumes",
    ]
    # The approval came before the high-risk model's champion moved (it waits for it).
    assert lines.index(approval_lines[-1]) < next(
        i for i, line in enumerate(lines) if line.startswith("  champion     diabetes_progression")
    )
    assert (ctr.holdout(), diabetes.holdout()) == ("AUC 0.812", "RMSE 54.9")

    # Traffic went to each model's own path: the simulator's rows, and rows of the diabetes file.
    features = {name: load_catalog().models[name].features for name in DEMO_MODELS}
    for name, rows in (("ctr_recommender", 20), ("diabetes_progression", 15)):
        calls = [call for call in fake_stack.gateway.calls if call[0] == name]
        assert sum(call[3] for call in calls[:-1]) == rows  # the last call is the summary's one row
        assert {tuple(call[2]) for call in calls} == {tuple(features[name])}
        assert {call[1] for call in calls[:-1]} == {"web-shop", "mobile-app", "email-campaign"}
    assert (ctr.traffic.rows_scored, diabetes.traffic.rows_scored) == (20, 15)  # type: ignore[union-attr]
    assert ctr.drift() == "ok: 20 rows, 0 drifted features"
    assert diabetes.drift() == "ok: 15 rows, 0 drifted features"

    # Both scored live through the gateway.
    assert list(ctr.example or {}) == features["ctr_recommender"] and ctr.prediction == [0.9, 0.1]
    assert list(diabetes.example or {}) == features["diabetes_progression"] and diabetes.prediction == 152.34
    assert ctr.facts is not None and ctr.facts.aliases == {"champion": "3", "previous_champion": "2"}

    # Progress lines: one per model of every mapped stage.
    assert any(line.startswith("  champion     ctr_recommender v3 (before: v2)") for line in lines)
    assert any(line.startswith("  champion     diabetes_progression v1 (before: none)") for line in lines)
    for stage in ("validation", "training", "gate", "deployment", "monitoring", "retirement"):
        assert sum(line.startswith(f"  {stage:<12} success") for line in lines) == 2, stage
    assert sum(line.startswith("  traffic      ") for line in lines) == 2

    summary = driver.summary_lines(
        report,
        ports=PORT_SET_A,
        default_model="ctr_recommender",
        password="pw",
        approver_passwords={"risk_officer": "rpw"},
        audit=ChainVerification(ok=True, count=21, anchors_checked=9),
        logs=Path("/x/.demo/logs"),
        wall_seconds=95.2,
    )
    text = "\n".join(summary)
    assert summary[:2] == ["", "ModelOps demo: summary"]
    for expected in (
        "  model           ctr_recommender (binary classification, dataset ctr_clicks)",
        "    version       v3 trained in this run; champion v3 (before: v2)",
        "    aliases       champion=v3, previous_champion=v2",
        "    holdout       AUC 0.812",
        "    serving       POST http://127.0.0.1:18008/models/ctr_recommender/invocations",
        "      answer      probability of a click 0.100",
        "  model           diabetes_progression (regression, dataset diabetes)",
        "    version       v1 trained in this run; champion v1 (before: none)",
        "    holdout       RMSE 54.9",
        "    drift         ok: 15 rows, 0 drifted features",
        "    serving       POST http://127.0.0.1:18008/models/diabetes_progression/invocations",
        "      answer      152.3",
        "  default model   ctr_recommender also answers POST http://127.0.0.1:18008/invocations",
        "  audit chain     verified, 21 records, HMACs and 9 anchors checked",
        "  Airflow UI      http://127.0.0.1:18080  (login admin / pw)",
        "  approver        risk_officer / rpw  (answers the gate's approvals: Browse > Required Actions)",
        "    gate          approved automatically (policy standard@3)",
        f"    gate          approved by risk_officer: {comment}",
        "  wall time       95 s",
    ):
        assert expected in summary, (expected, text)
    assert str(report.drops["diabetes"].path) in text and report.drops["diabetes"].sha256 in text


def test_drive_stops_on_a_failed_training_of_one_model(fake_stack: Stack) -> None:
    _scenario(fake_stack.airflow, fake_stack.gateway, coalesced=False)
    hook = fake_stack.airflow.on_trigger[driver.VALIDATION_DAG]

    def validation_then_a_failed_training(run: FakeRun) -> None:
        hook(run)
        (failed,) = [r for r in fake_stack.airflow.runs if r.run_id == "asset_triggered__0_1"]
        failed.states = ["running", "failed"]
        failed.tasks[0].state = "failed"
        failed.tasks[0].return_value = None
        failed.tasks[0].log = FAILED_TASK_LOG

    fake_stack.airflow.on_trigger[driver.VALIDATION_DAG] = validation_then_a_failed_training
    fake_stack.mlflow.champions["diabetes_progression"] = [None]  # never deployed
    with pytest.raises(StageFailed) as info:
        _drive(fake_stack, [])
    message = str(info.value)
    assert f"stage training ({driver.TRAINING_DAG}) run asset_triggered__0_1 failed" in message
    assert "task train_and_register[diabetes_progression] (map index 0) failed" in message
    assert "boom: AUC below floor" in message
    assert fake_stack.airflow.triggered(driver.DRIFT_DAG) == []  # stopped before monitoring


def test_drive_times_out_naming_each_model_and_the_runs(fake_stack: Stack) -> None:
    def validation_without_events(run: FakeRun) -> None:
        # Only training started, for one model, and its task waits for a retry.
        stuck = FakeTask(
            "train_and_register",
            state="up_for_retry",
            map_index=0,
            rendered_map_index="ctr_recommender",
            log=FAILED_TASK_LOG,
        )
        fake_stack.airflow.runs.append(
            FakeRun(
                driver.TRAINING_DAG,
                "asset_triggered__t",
                run.run_after,
                ["running"],
                "asset_triggered",
                tasks=[stuck],
            )
        )

    fake_stack.airflow.on_trigger = {driver.VALIDATION_DAG: validation_without_events}
    fake_stack.mlflow.champions = {"ctr_recommender": ["2"], "diabetes_progression": [None]}
    with pytest.raises(StageFailed) as info:
        _drive(fake_stack, [], champion_timeout=1)
    message = str(info.value)
    assert "not every model has a new champion after 1 s:" in message
    assert "  ctr_recommender: champion before v2, now v2 (waiting)" in message
    assert "  diabetes_progression: champion before none, now none (waiting)" in message
    assert f"{driver.TRAINING_DAG}: asset_triggered__t running" in message
    assert f"{driver.GATE_DAG}: none (Asset event not received?)" in message
    assert (
        "task train_and_register[ctr_recommender] (map index 0) up_for_retry; last lines of its log:"
        in message
    )
    assert "boom: AUC below floor" in message and "make down" in message


def test_drive_without_an_approver_times_out_naming_the_awaiting_gate_task(fake_stack: Stack) -> None:
    _scenario(fake_stack.airflow, fake_stack.gateway)
    with pytest.raises(StageFailed) as info:
        _drive(fake_stack, [], champion_timeout=1, approver_passwords=None)
    message = str(info.value)
    assert "  diabetes_progression: champion before none, now none (waiting)" in message
    assert (
        f"{driver.GATE_DAG} run asset_triggered__1_0: task evaluate_policy[diabetes_progression] awaits input "
        "(an approval: answer it under Required Actions in the Airflow UI as the user it names)"
    ) in message
    assert fake_stack.airflow.answers == []


# --- the incident: drift with a click drop, caught as critical, rolled back, alerted, retrained -------------

CTR = "ctr_recommender"
OWNER = "ml-platform@example.com"
INCIDENT_VERSIONS = {"second": "4", "retrained": "5"}  # after the lifecycle's v3 (see fake_stack)
INCIDENT_BUSINESS = {
    "metric": "click_through_rate",
    "labelled_rows": 20,
    "label_coverage": 1.0,
    "value": 0.018,
    "baseline": 0.153,
    "drop": 0.882353,
    "z": 9.1,
    "significant": True,
    "status": "measured",
    "by_caller": {
        "web-shop": {"labelled_rows": 10, "value": 0.0, "drop": 1.0, "significant": True},
        "mobile-app": {"labelled_rows": 5, "value": 0.02, "drop": 0.87, "significant": True},
        "email-campaign": {"labelled_rows": 5, "value": 0.15, "drop": 0.02, "significant": False},
    },
}
ASSESS_LOG = [
    {"timestamp": "2026-05-09T07:41:02Z", "level": "info", "event": "assessing 20 rows of ctr_recommender"},
    {"timestamp": "2026-05-09T07:41:09Z", "level": "warning", "event": "cold start: v4 serves since 07:39"},
]


def _set_champions(registry: FakeMlflow, model: str, versions: list[str | None]) -> None:
    """From now on, reads of ``model`` answer ``versions`` in turn (the last one repeats)."""
    registry.champions[model] = versions
    registry.reads[model] = 0


def _chain_runs(version: str, trigger: str, run_after: datetime, *, with_training: bool) -> list[FakeRun]:
    """Training (when Asset-triggered), gate and deployment runs of one new version of the click model."""
    values = {
        driver.TRAINING_DAG: (
            "train_and_register",
            {
                "version": version,
                "metrics": {"holdout_roc_auc": 0.8011},
                "summary": f"{CTR} v{version} (candidate), holdout_roc_auc 0.801, trigger {trigger}",
            },
        ),
        driver.GATE_DAG: (
            "evaluate_policy",
            {
                "version": version,
                "verdict": "approved",
                "approval": AUTO_APPROVAL,
                "summary": f"{CTR} v{version} approved automatically: 12/12 checks passed (standard@3)",
            },
        ),
        driver.DEPLOYMENT_DAG: (
            "deploy_to_gateway",
            {"version": version, "summary": f"{CTR} v{version} is champion (previous: v3)"},
        ),
    }
    return [
        FakeRun(
            dag_id,
            f"asset_triggered__{dag_id}_v{version}",
            run_after,
            ["queued", "running", "success"],
            run_type="asset_triggered",
            hidden_list_reads=1,
            tasks=[
                FakeTask(
                    task_id, map_index=0, rendered_map_index=CTR, return_value={"model_name": CTR, **value}
                )
            ],
        )
        for dag_id, (task_id, value) in values.items()
        if with_training or dag_id != driver.TRAINING_DAG
    ]


def _alert_line(version: str, recorded_at: datetime, *, tier: str = "critical", model: str = CTR) -> str:
    """One outbox line as ``OutboxNotifier`` writes it."""
    return json.dumps(
        {
            "recorded_at": recorded_at.isoformat(),
            "model_name": model,
            "version": version,
            "tier": tier,
            "title": f"{tier.upper()}: 5 drifted features, click_through_rate down 88.2% against its baseline",
            "body": "...",
            "dedup_key": f"{model}.v{version}.{tier}.drift-critical.business-measured",
            "recipients": [OWNER],
            "window_start": "2026-05-09T07:40:00Z",
            "window_end": "2026-05-09T07:40:05Z",
        },
        sort_keys=True,
    )


@dataclass
class Incident:
    """How the stand-ins play the incident; each field changes one step."""

    verdict: str = "critical"
    rollback: str | None = "rolled_back"  # the decision roll_back_on_critical returns; None: it failed
    alert: bool = True
    retrained: bool = True


def _incident_scenario(stack_: Stack, outbox: Path, incident: Incident) -> None:
    """``_scenario``, plus the second champion's training and the incident's monitoring run."""
    fake, gateway, registry = stack_.airflow, stack_.gateway, stack_.mlflow
    _scenario(fake, gateway)
    validation, stationary = fake.on_trigger[driver.VALIDATION_DAG], fake.on_trigger[driver.DRIFT_DAG]
    second, retrained = INCIDENT_VERSIONS["second"], INCIDENT_VERSIONS["retrained"]

    def validation_now(run: FakeRun) -> None:
        validation(run)
        # The lifecycle's runs, due at the trigger (not seconds later): the incident's own come after them.
        for index, asset_run in enumerate(r for r in fake.runs if r.run_type == "asset_triggered"):
            asset_run.run_after = run.run_after + timedelta(microseconds=index)

    def training(run: FakeRun) -> None:
        # The triggered run trains; the gate and deployment follow on Asset events.
        triggered, *followers = _chain_runs(second, "manual", run.run_after, with_training=True)
        run.tasks = triggered.tasks
        fake.runs.extend(followers)
        _set_champions(registry, CTR, ["3", "3", second])

    def drift(run: FakeRun) -> None:
        if run.conf.get("models") != [CTR]:
            return stationary(run)
        rows = sum(len(labels) for _, labels in gateway.labels)
        assess = FakeTask(
            "assess_drift",
            map_index=0,
            rendered_map_index=CTR,
            log=ASSESS_LOG,
            return_value={
                "model_name": CTR,
                "version": second,
                "verdict": incident.verdict,
                "drift_level": "critical",
                "rows": rows,
                "drifted_features": ["item_category", "item_price", "user_age", "user_balance", "device"],
                "business": INCIDENT_BUSINESS,
                "decision": incident.verdict,
                "summary": f"{CTR}: {incident.verdict}: {rows} rows, 5 drifted features, click_through_rate "
                "0.018 (baseline 0.153), window 2026-05-09 07:40-07:40 UTC (policy standard)",
            },
        )
        run.tasks = [FakeTask("find_serving_models", return_value=[{"model": CTR}]), assess]
        if incident.verdict != "critical":
            run.tasks += [
                FakeTask("roll_back_on_critical", state="skipped", map_index=0, rendered_map_index=CTR),
                FakeTask("request_retraining", state="skipped", map_index=0),
            ]
            return None
        if incident.rollback is None:
            run.states = ["running", "failed"]
            run.tasks.append(
                FakeTask(
                    "roll_back_on_critical",
                    state="failed",
                    map_index=0,
                    rendered_map_index=CTR,
                    log=FAILED_TASK_LOG,
                )
            )
            return None
        summary = (
            f"{CTR}: rolled back from v{second} to v3 (critical monitoring verdict for window ...: drift "
            "critical with click_through_rate down 0.882353)"
            if incident.rollback == "rolled_back"
            else f"{CTR}: no rollback: {CTR} has no earlier approved champion to go back to; retraining is the "
            "way out"
        )
        back = {"champion_version": "3"} if incident.rollback == "rolled_back" else {}
        run.tasks += [
            FakeTask(
                "roll_back_on_critical",
                map_index=0,
                rendered_map_index=CTR,
                return_value={
                    "model_name": CTR,
                    "version": second,
                    **back,
                    "decision": incident.rollback,
                    "summary": summary,
                },
            ),
            FakeTask(
                "request_retraining",
                map_index=0,  # no map_index_template: named by the model in its result
                return_value={
                    "model_name": CTR,
                    "version": second,
                    "verdict": "critical",
                    "decision": "requested",
                    "summary": f"retraining of {CTR} requested: drift verdict critical for window ...",
                },
            ),
        ]
        if incident.alert:
            with outbox.open("a") as lines:
                lines.write(_alert_line(second, datetime.now(UTC)) + "\n")
        if incident.retrained:
            fake.runs.extend(_chain_runs(retrained, "retraining_request", run.run_after, with_training=True))
            _set_champions(registry, CTR, ["3", "3", retrained])
        else:
            _set_champions(registry, CTR, ["3"])
        return None

    fake.on_trigger.update(
        {driver.VALIDATION_DAG: validation_now, driver.TRAINING_DAG: training, driver.DRIFT_DAG: drift}
    )


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    """The outbox, holding a critical alert about the same version from an earlier demo on this ``.demo/``."""
    path = tmp_path / "modelops" / "outbox" / "alerts.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(_alert_line(INCIDENT_VERSIONS["second"], T0 - timedelta(days=1)) + "\n")
    return path


def _drive_incident(
    stack_: Stack, outbox: Path, lines: list[str], **overrides: Any
) -> driver.LifecycleReport:
    settings = {"incident_model": CTR, "outbox": outbox, "incident_requests": 4, **overrides}
    return _drive(stack_, lines, **settings)


def test_drive_shows_the_incident_caught_rolled_back_alerted_and_retrained(
    fake_stack: Stack, outbox: Path
) -> None:
    _incident_scenario(fake_stack, outbox, Incident())
    lines: list[str] = []
    report = _drive_incident(fake_stack, outbox, lines)
    airflow, gateway = fake_stack.airflow, fake_stack.gateway

    # The second champion's training starts while the stationary window is assessed; the incident's
    # monitoring run assesses exactly the drifted window, of the click model only.
    manual = [run for run in airflow.runs if run.run_type == "manual"]
    assert [run.dag_id for run in manual] == [
        driver.VALIDATION_DAG,
        driver.DRIFT_DAG,
        driver.TRAINING_DAG,
        driver.RETIREMENT_DAG,
        driver.DRIFT_DAG,
    ]
    assert manual[2].conf == {"model": CTR}
    stationary, incident_conf = manual[1].conf, manual[4].conf
    assert stationary["models"] == [] and incident_conf["models"] == [CTR]
    start, end = (datetime.fromisoformat(incident_conf[key]) for key in ("window_start", "window_end"))
    assert datetime.fromisoformat(stationary["window_end"]) < start < end

    # Drifted click traffic from every caller, then the true labels of each scored request.
    # (Each answered call got a request id, in order: the stand-in refuses no call here.)
    assert len(gateway.request_ids) == len(gateway.calls)
    ctr_calls = [index for index, call in enumerate(gateway.calls) if call[0] == CTR]
    incident_calls = ctr_calls[4:8]  # after the stationary window's 4, before the summary's one row
    assert {gateway.calls[i][1] for i in incident_calls} == {"web-shop", "mobile-app", "email-campaign"}
    assert sum(gateway.calls[i][3] for i in incident_calls) == 20
    assert [request_id for request_id, _ in gateway.labels] == [
        gateway.request_ids[i] for i in incident_calls
    ]
    assert all(len(labels) == 5 and set(labels) <= {0, 1} for _, labels in gateway.labels)

    incident = report.incident
    assert incident is not None and incident.model == CTR and incident.champion_before == "3"
    assert incident.second is not None and incident.retrained is not None
    assert (incident.second.champion, incident.second.trained_version) == ("4", "4")
    assert (incident.retrained.champion_before, incident.retrained.champion) == ("3", "5")
    assert incident.retrained.trained_version == "5"
    assert incident.retrained.fact("training").endswith("trigger retraining_request")
    assert incident.verdict is not None and incident.verdict.value["verdict"] == "critical"
    assert incident.rollback is not None and incident.rollback.value["champion_version"] == "3"
    assert incident.request is not None and incident.request.task_id == "request_retraining"
    # The alert of this run, not the earlier demo's line about the same version.
    assert incident.alert is not None and incident.alert["recorded_at"] > "2026-05-09"
    assert incident.traffic is not None and incident.traffic.labels_delivered == 20
    assert report.models[CTR].facts is not None and report.models[CTR].facts.champion == "5"

    # Progress lines, in the order things happen.
    def at(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    training_line = lines[at("  incident     ctr_recommender: training a second champion")]
    assert training_line.endswith("so that a rollback has a version to go back to")
    assert "after v3 (run manual__" in training_line
    expected = [
        "  incident     ctr_recommender: training a second champion",
        "  monitoring   success",
        "  retirement   success",
        "  champion     ctr_recommender v4 (before: v3)",
        "  training     success    12.5 s  ctr_recommender v4 (candidate), holdout_roc_auc 0.801, trigger manual",
        "  gate         success    12.5 s  ctr_recommender v4 approved automatically",
        "  deployment   success    12.5 s  ctr_recommender v4 is champion",
        "  traffic      ctr_recommender: 4 ok, 0 failed, 20 rows scored, 20 labels delivered; drifted, and its "
        "users click far less",
        "  incident     monitoring success in 12.5 s (run manual__",
        "  verdict      ctr_recommender: critical: 20 rows, 5 drifted features, click_through_rate 0.018",
        "  drop         click_through_rate 0.018 against the serving version's baseline 0.153: down 88.2% "
        "(20 labelled rows, z=9.1); down 5% or more in the rows of 2 callers (mobile-app, web-shop), "
        "critical needs 2",
        "  rollback     ctr_recommender: rolled back from v4 to v3",
        "  alert        critical alert about ctr_recommender v4 to ml-platform@example.com: CRITICAL: 5 drifted "
        f"features, click_through_rate down 88.2% against its baseline (outbox {outbox})",
        "  retraining   retraining of ctr_recommender requested: drift verdict critical",
        "  champion     ctr_recommender v5 (before: v3)",
        "  training     success    12.5 s  ctr_recommender v5 (candidate), holdout_roc_auc 0.801, trigger "
        "retraining_request",
        "  gate         success    12.5 s  ctr_recommender v5 approved automatically",
        "  deployment   success    12.5 s  ctr_recommender v5 is champion",
    ]
    positions = [at(prefix) for prefix in expected]
    assert positions == sorted(positions), [lines[i] for i in positions]
    # The lifecycle's stages keep their results; the incident's are its own.
    assert report.models[CTR].trained_version == "3"
    assert [result.stage for result in incident.stages] == [
        "training",
        "gate",
        "deployment",
        "incident",
        "training",
        "gate",
        "deployment",
    ]

    summary = driver.summary_lines(
        report,
        ports=PORT_SET_A,
        default_model=CTR,
        password="pw",
        audit=ChainVerification(ok=True, count=40, anchors_checked=20),
        logs=Path("/x/.demo/logs"),
        wall_seconds=360.4,
    )
    text = "\n".join(summary)
    for expected_line in (
        "    version       v3 trained in this run, then v4 and v5 in the incident; champion v5 (before: v2)",
        "  incident        ctr_recommender: drifted traffic whose users click far less, with its labels",
        "    before        champion v4 (before: v3), trained first so that there is an earlier champion to go "
        "back to",
        "    traffic       ctr_recommender: 4 ok, 0 failed, 20 rows scored, 20 labels delivered",
        "    retraining    v5 trained on request (AUC 0.801), approved automatically (policy standard@3); "
        "champion v5 (before: v3)",
        f"    outbox        {outbox}",
    ):
        assert expected_line in summary, (expected_line, text)
    assert any(line.startswith("    verdict       ctr_recommender: critical: 20 rows") for line in summary)
    assert any(line.startswith("    drop          click_through_rate 0.018") for line in summary)
    assert any(
        line.startswith("    rollback      ctr_recommender: rolled back from v4 to v3") for line in summary
    )
    assert any(
        line.startswith("    alert         critical alert about ctr_recommender v4") for line in summary
    )
    assert any(line.startswith("    took          ") for line in summary)
    # After the models, before the audit chain.
    incident_at = summary.index(
        "  incident        ctr_recommender: drifted traffic whose users click far less, with its labels"
    )
    assert (
        summary.index("  model           diabetes_progression (regression, dataset diabetes)") < incident_at
    )
    assert incident_at < next(i for i, line in enumerate(summary) if line.startswith("  audit chain"))


@pytest.mark.parametrize(
    ("incident", "expected"),
    [
        pytest.param(
            Incident(verdict="warning"),
            [
                "incident: the drifted window with its click drop was assessed 'warning', not critical: "
                "ctr_recommender: warning: 20 rows",
                "drift critical, click_through_rate 0.018",
                "last lines of task assess_drift[ctr_recommender]'s log:",
                "WARNING cold start: v4 serves since 07:39",
            ],
            id="not-critical",
        ),
        pytest.param(
            Incident(rollback="refused"),
            [
                "incident: no rollback after the critical verdict: ctr_recommender: no rollback: ctr_recommender "
                "has no earlier approved champion to go back to",
                "task roll_back_on_critical[ctr_recommender]'s log:",
            ],
            id="rollback-refused",
        ),
        pytest.param(
            Incident(rollback=None),
            [
                f"stage incident ({driver.DRIFT_DAG}) run manual__",
                "task roll_back_on_critical[ctr_recommender] (map index 0) failed",
                "boom: AUC below floor",
            ],
            id="rollback-failed",
        ),
        pytest.param(
            Incident(alert=False),
            [
                "incident: no critical alert about ctr_recommender v4 in ",
                "MODELOPS_COLD_START_DAYS=0, see devstack/modelops_dev/stack.py",
                "WARNING cold start: v4 serves since 07:39",
            ],
            id="no-alert",
        ),
        pytest.param(
            Incident(retrained=False),
            [
                "not every model has a new champion after 1 s:",
                "  ctr_recommender: champion before v3, now v3 (waiting)",
                "runs since the incident's monitoring run:",
                f"  training    {driver.TRAINING_DAG}: none (Asset event not received?)",
            ],
            id="no-retrained-champion",
        ),
    ],
)
def test_the_incident_stops_the_demo_when_a_step_does_not_happen(
    fake_stack: Stack, outbox: Path, incident: Incident, expected: list[str]
) -> None:
    _incident_scenario(fake_stack, outbox, incident)
    lines: list[str] = []
    with pytest.raises(StageFailed) as info:
        _drive_incident(fake_stack, outbox, lines, champion_timeout=1)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, (fragment, message)
    # Nothing is shown as done that was not.
    if incident.verdict != "critical":
        assert not any(line.startswith("  rollback") for line in lines)
    assert not any(line.startswith("  champion     ctr_recommender v5") for line in lines)


def test_drive_refuses_an_incident_model_it_does_not_run(fake_stack: Stack) -> None:
    with pytest.raises(ConfigurationError, match="the incident's model ctr_recommender is not one of"):
        _drive(fake_stack, [], models=("diabetes_progression",), incident_model=CTR)
    assert fake_stack.airflow.runs == []


def test_drop_text_names_the_callers_who_saw_the_drop() -> None:
    policy = load_catalog().policies_for(CTR).monitoring
    assert (policy.business.drop_critical, policy.min_callers_for_action) == (0.05, 2)
    assert driver.drop_text(INCIDENT_BUSINESS, policy) == (
        "click_through_rate 0.018 against the serving version's baseline 0.153: down 88.2% (20 labelled rows, "
        "z=9.1); down 5% or more in the rows of 2 callers (mobile-app, web-shop), critical needs 2"
    )
    one_caller = {**INCIDENT_BUSINESS, "by_caller": {"web-shop": INCIDENT_BUSINESS["by_caller"]["web-shop"]}}
    assert "in the rows of 1 callers (web-shop), critical needs 2" in driver.drop_text(one_caller, policy)
    better = {**INCIDENT_BUSINESS, "drop": -0.1, "by_caller": {}}
    assert ": up 10.0% (20 labelled rows" in driver.drop_text(better, policy)
    assert "in the rows of 0 callers, critical needs 2" in driver.drop_text(better, policy)
    pending = {"metric": "click_through_rate", "status": "pending_labels", "labelled_rows": 3}
    assert driver.drop_text(pending, policy) == "click_through_rate pending_labels (3 labelled rows)"
    assert driver.drop_text({}, policy) == "business metric not measured (0 labelled rows)"


def test_find_alert_takes_the_newest_matching_line_since_the_run(tmp_path: Path) -> None:
    outbox = tmp_path / "alerts.jsonl"
    since = T0
    assert driver.find_alert(outbox, CTR, "4", since) is None  # no outbox yet
    outbox.write_text(
        "\n".join(
            [
                _alert_line("4", since - timedelta(seconds=1)),  # before the run
                "not json",
                json.dumps({"model_name": CTR, "tier": "critical"}),  # no recorded_at
                _alert_line("4", since + timedelta(seconds=1), tier="warning"),
                _alert_line("4", since + timedelta(seconds=2), model="diabetes_progression"),
                _alert_line("3", since + timedelta(seconds=3)),  # another version
                _alert_line("4", since + timedelta(seconds=4)),
                _alert_line("4", since + timedelta(seconds=5)),
                "",
            ]
        )
    )
    found = driver.find_alert(outbox, CTR, "4", since)
    assert found is not None and found["recorded_at"] == (since + timedelta(seconds=5)).isoformat()
    assert driver.find_alert(outbox, CTR, "3", since)["version"] == "3"  # type: ignore[index]
    assert driver.find_alert(outbox, CTR, None, since)["version"] == "4"  # type: ignore[index]
    assert driver.find_alert(outbox, CTR, "4", since + timedelta(seconds=6)) is None
    assert driver.find_alert(outbox, CTR, "4", since, tier="warning")["tier"] == "warning"  # type: ignore[index]
    assert driver.alert_text(found) == (
        f"critical alert about {CTR} v4 to {OWNER}: CRITICAL: 5 drifted features, click_through_rate down "
        "88.2% against its baseline"
    )


def test_find_alert_reads_what_the_outbox_notifier_writes(tmp_path: Path) -> None:
    from modelops.notifications import Alert, OutboxNotifier

    outbox = tmp_path / "alerts.jsonl"
    since = datetime.now(UTC)
    alert = Alert(
        model_name=CTR,
        version="4",
        window_start=T0,
        window_end=T0 + timedelta(minutes=1),
        tier="critical",
        title="CRITICAL: 5 drifted features",
        dedup_key=f"{CTR}.v4.critical",
        recipients=[OWNER],
    )
    OutboxNotifier(alert, path=outbox).notify({})
    found = driver.find_alert(outbox, CTR, "4", since)
    assert found is not None and found["title"] == "CRITICAL: 5 drifted features"
    assert (
        driver.alert_text(found) == f"critical alert about {CTR} v4 to {OWNER}: CRITICAL: 5 drifted features"
    )


def test_check_catalog_needs_an_incident_model_that_can_show_it(monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = load_catalog()
    driver.check_catalog(catalog, incident_model=CTR)
    driver.check_catalog(catalog, ("diabetes_progression",), incident_model=None)
    with pytest.raises(ConfigurationError, match="the incident's model ctr_recommender is not one of"):
        driver.check_catalog(catalog, ("diabetes_progression",))
    with pytest.raises(
        ConfigurationError, match="diabetes_progression trains on 'diabetes', not 'ctr_clicks'"
    ):
        driver.check_catalog(catalog, incident_model="diabetes_progression")
    monkeypatch.setattr(driver, "INCIDENT_REQUESTS", 30)
    with pytest.raises(
        ConfigurationError, match="the incident sends 150 rows; .* needs 200 rows and 100 labelled"
    ):
        driver.check_catalog(catalog)


def test_check_catalog_needs_every_demo_model_and_data_for_its_dataset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    catalog = load_catalog()
    driver.check_catalog(catalog)
    with pytest.raises(UnknownModel, match="no_such_model"):
        driver.check_catalog(catalog, ("no_such_model",))
    monkeypatch.setattr(driver, "DATASET_WRITERS", {"ctr_clicks": DATASET_WRITERS["ctr_clicks"]})
    with pytest.raises(
        ConfigurationError,
        match=r"diabetes_progression trains on dataset 'diabetes', for which the demo writes no",
    ):
        driver.check_catalog(catalog)


def test_check_catalog_needs_a_demo_user_for_each_approval() -> None:
    catalog = load_catalog()
    assert catalog.policies_for("diabetes_progression").compliance.approval.approvers == ["risk_officer"]
    driver.check_catalog(catalog, approvers=("risk_officer",))
    driver.check_catalog(catalog, ("ctr_recommender",), approvers=())  # automatic: nobody needed
    with pytest.raises(
        ConfigurationError, match=r"diabetes_progression's compliance policy needs an approval by one of"
    ):
        driver.check_catalog(catalog, approvers=("someone_else",))


# --- main: down / status / up ----------------------------------------------------------------------


@pytest.fixture
def demo_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / ".demo"
    monkeypatch.setenv("MODELOPS_DEMO_DIR", str(folder))
    for name, _ in stack.PORT_VARIABLES.values():
        monkeypatch.delenv(name, raising=False)
    assert processes.demo_dir() == folder
    return folder


def test_down_and_status_with_nothing_running(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert driver.main(["down"]) == 0
    assert capsys.readouterr().out == "nothing was running\n"
    assert driver.main(["status"]) == 0
    assert "nothing is running (start it with `make demo`)" in capsys.readouterr().out
    # A stale pid file (its process is gone) does not count and is cleaned up by `down`.
    (demo_dir / "run").mkdir(parents=True)
    (demo_dir / "run" / "airflow-scheduler.pid").write_text("4194000\n")
    assert driver.main(["status"]) == 0
    assert "nothing is running" in capsys.readouterr().out
    assert driver.main(["down"]) == 0
    assert capsys.readouterr().out == "nothing was running\n"
    assert not (demo_dir / "run" / "airflow-scheduler.pid").exists()


def test_status_with_a_bad_port_says_what_to_fix(
    demo_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODELOPS_AIRFLOW_PORT", "eighty")
    assert driver.main(["status"]) == 1
    assert "MODELOPS_AIRFLOW_PORT='eighty' is not a TCP port" in capsys.readouterr().err


def test_up_refuses_while_a_previous_stack_runs(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = demo_dir / "run"
    sleeper = processes.Service(
        name="airflow-scheduler",
        argv=[sys.executable, "-c", "import time; time.sleep(60)"],
        env=dict(os.environ),
        health_url=None,
        log_file=demo_dir / "logs" / "airflow-scheduler.log",
    )
    pid = processes.start(sleeper, run_dir)
    try:
        assert processes.running_services(run_dir) == ["airflow-scheduler"]
        assert driver.main(["up"]) == 1
        captured = capsys.readouterr()
        assert "still run (airflow-scheduler)" in captured.err and "run `make down` first" in captured.err
        assert not (demo_dir / "airflow").exists()  # refused before building anything

        assert driver.main(["status"]) == 0
        out = capsys.readouterr().out
        assert f"airflow-scheduler            pid {pid}, 1 processes" in out
        assert "mlflow                       not running" in out
        assert "airflow-worker-log-server    not running" in out

        assert driver.main(["down"]) == 0
        assert capsys.readouterr().out == "stopped airflow-scheduler\n"
        assert processes.running_services(run_dir) == []
    finally:
        processes.stop("airflow-scheduler", run_dir, grace_seconds=5)  # no-op unless an assert failed


def test_python_dash_m_modelops_dev_as_the_makefile_runs_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELOPS_")}
    env.update(PYTHONPATH=str(PROJECT_ROOT / "devstack"), MODELOPS_DEMO_DIR=str(tmp_path / ".demo"))
    result = subprocess.run(
        [sys.executable, "-m", "modelops_dev", "status"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "nothing is running (start it with `make demo`)\n"), (
        result.stderr
    )
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    for command in ("up", "down", "status"):
        assert f"-m modelops_dev {command}" in makefile
    assert "PYTHONPATH=$(CURDIR)/devstack" in makefile


# --- the product does not ship the dev tool ----------------------------------------------------------


def test_the_runtime_package_does_not_contain_or_import_the_dev_package() -> None:
    import importlib.util

    # modelops.airflow_settings stays: the production image loads airflow_settings.yaml with it.
    for moved in ("modelops.demo", "modelops.localstack"):
        assert importlib.util.find_spec(moved) is None, f"{moved} belongs in devstack/modelops_dev"
    for folder in ("plugins", "dags"):
        for path in (PROJECT_ROOT / folder).rglob("*.py"):
            assert "modelops_dev" not in path.read_text(), f"{path} refers to the dev package"


def test_the_wheel_and_the_image_leave_the_dev_package_out() -> None:
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["plugins/modelops"]
    assert pyproject["tool"]["pytest"]["ini_options"]["pythonpath"] == ["devstack"]
    ignored = {
        line.strip().rstrip("/")
        for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert "devstack" in ignored
    assert "devstack" not in (PROJECT_ROOT / "Dockerfile").read_text()


# --- the canary that must lose -------------------------------------------------------------------------


class VersionsInMlflow:
    """What finish_canary_rollback reads of MLflow: the latest version and its deployment status."""

    def __init__(self, statuses: list[str | None]) -> None:
        self.statuses = statuses

    def model(self, name: str) -> Any:
        return SimpleNamespace(latest_version="2")

    def champion(self, name: str) -> str:
        return "1"

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {} if status is None else {Tag.DEPLOYMENT_STATUS: status}


def _rollback(tmp_path: Path) -> driver.CanaryRollback:
    drop = DatasetDrop("diabetes", tmp_path / "d.csv", 442, "a" * 64)
    return driver.CanaryRollback("diabetes_progression", "1", drop, datetime.now(UTC))


def test_the_unit_bug_canary_is_waited_for_with_traffic_until_rolled_back(tmp_path: Path) -> None:
    polls: list[int] = []
    lines: list[str] = []
    rollback = _rollback(tmp_path)
    driver.finish_canary_rollback(
        VersionsInMlflow([None, "canary", "canary", "rolled_back"]),
        rollback,
        timeout=10,
        poll_seconds=0.01,
        on_poll=lambda: polls.append(1) or 1,
        out=lines.append,
    )
    assert rollback.version == "2" and rollback.status == "rolled_back" and len(polls) == 4
    assert (
        "diabetes_progression v2's canary was rolled back" in lines[-1]
        and "v1 answers every caller" in lines[-1]
    )


def test_a_unit_bug_canary_that_wins_fails_the_demo_naming_the_task(tmp_path: Path) -> None:
    with pytest.raises(StageFailed, match="won its canary"):
        driver.finish_canary_rollback(
            VersionsInMlflow(["live"]), _rollback(tmp_path), timeout=5, poll_seconds=0.01
        )
    with pytest.raises(StageFailed, match="did not finish its canary"):
        driver.finish_canary_rollback(
            VersionsInMlflow(["canary"]), _rollback(tmp_path), timeout=0.05, poll_seconds=0.01
        )


def test_the_summary_shows_each_canary_and_the_shares(tmp_path: Path) -> None:
    report = driver.LifecycleReport(drops={}, models={})
    outcome = TaskOutcome(
        "canary",
        0,
        "diabetes_progression",
        {"decision": "rolled_back", "summary": "diabetes_progression v2 canary rolled back; v1 serves: rmse"},
    )
    report.stages.append(StageResult("deployment", "modelops_deployment", "r", "success", 80.0, [outcome]))
    periods = [
        {
            "version": "1",
            "arm": "champion",
            "share": 1.0,
            "from": "2026-11-27T20:00:00",
            "to": "2026-11-27T20:05:00",
        },
        {
            "version": "1",
            "arm": "champion",
            "share": 0.5,
            "from": "2026-11-27T20:05:00",
            "to": "2026-11-27T20:07:00",
        },
        {
            "version": "2",
            "arm": "challenger",
            "share": 0.5,
            "from": "2026-11-27T20:05:00",
            "to": "2026-11-27T20:07:00",
        },
        {"version": "1", "arm": "champion", "share": 1.0, "from": "2026-11-27T20:07:00", "to": None},
    ]
    lines = driver.canary_lines(report, {"diabetes_progression": periods})
    text = "\n".join(lines)
    assert "rolled_back" in text and "v2 canary rolled back" in text
    assert "v2    challenger  50%  2026-11-27T20:05:00 -> 2026-11-27T20:07:00" in text
    assert "v1    champion   100%  2026-11-27T20:07:00 -> now" in text
