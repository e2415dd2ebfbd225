"""docker-compose.yaml, its Dockerfile and the postgres init script agree with each other and with the code.

Nothing here needs Docker: the compose file is read with PyYAML (anchors and ``<<`` merges resolved the
way Compose resolves them) and ``${VAR:-default}`` references are replaced by their defaults, and the
required ``${VAR:?message}`` ones (the secrets with no default) by a test value per variable, i.e. the
stack as `docker compose up` starts it with an .env file that sets only the required variables. The
connections are then resolved by the project's own hooks, so a renamed connection, a moved port or a
database nobody creates fails here. One test starts a real ``mlflow server --app-name basic-auth`` with the
compose stack's auth settings and shows who may write.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.conftest import _stop_process_group, _wait_healthy
from tests.support import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yaml"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
INIT_DIR = PROJECT_ROOT / "docker" / "postgres" / "init"
MLFLOW_AUTH_INI = PROJECT_ROOT / "docker" / "mlflow" / "basic_auth.ini"
README = PROJECT_ROOT / "README.md"

# The variables compose requires (``${VAR:?message}``): secrets with no default, set in .env.
REQUIRED_VARIABLES = {
    "MLFLOW_ADMIN_USERNAME",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_GATEWAY_PASSWORD",
    "MLFLOW_FLASK_SECRET_KEY",
    "MODELOPS_AUDIT_KEY",
    "MODELOPS_GATEWAY_KEYS",
}

AIRFLOW_SERVICES = {
    "airflow-init": None,
    "airflow-api-server": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "celery",
}
# The scheduler serves /health on this port when AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK is on.
SCHEDULER_HEALTH_PORT = 8974

_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def required_value(name: str) -> str:
    """The .env value of a required variable in these tests: 40+ characters, distinct per variable, and
    nowhere in docker-compose.yaml (so finding it in a resolved value proves where it came from)."""
    if name == "MODELOPS_GATEWAY_KEYS":  # JSON: one team's key, by its digest
        return json.dumps(
            {"test-key": {"team": "test-team", "sha256": hashlib.sha256(name.encode()).hexdigest()}}
        )
    return f"test-{name.lower().replace('_', '-')}-{hashlib.sha256(name.encode()).hexdigest()[:24]}"


def interpolate(value: Any) -> Any:
    """Compose's variable substitution with an .env holding only the required variables: defaults apply,
    ``${VAR:?message}`` takes :func:`required_value`, ``$$`` is ``$``."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name = match.group(1) or match.group(4)
            operator, default = match.group(2), match.group(3)
            if operator in (":?", "?"):
                assert name in REQUIRED_VARIABLES, f"docker-compose.yaml requires {name}: add it to the tests"
                return required_value(name)
            if operator in (":-", "-"):
                return default
            pytest.fail(f"docker-compose.yaml uses ${{{name}}} without a default")
            return ""  # unreachable

        return _REFERENCE.sub(substitute, value)
    if isinstance(value, list):
        return [interpolate(item) for item in value]
    if isinstance(value, dict):
        return {key: interpolate(item) for key, item in value.items()}
    return value


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any]) -> dict[str, Any]:
    return interpolate(raw_compose)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def one_shot_services(services: dict[str, dict[str, Any]]) -> set[str]:
    """Services something waits on with service_completed_successfully: they run once and exit."""
    return {
        target
        for service in services.values()
        for target, spec in (service.get("depends_on") or {}).items()
        if spec.get("condition") == "service_completed_successfully"
    }


def published_port(service: dict[str, Any], container_port: int) -> int:
    for mapping in service.get("ports") or []:
        host, _, container = str(mapping).rpartition(":")
        if int(container) == container_port:
            return int(host.rpartition(":")[2])
    pytest.fail(f"container port {container_port} is not published: {service.get('ports')}")
    return 0  # unreachable


def init_script_text() -> str:
    return "\n".join(path.read_text() for path in sorted(INIT_DIR.glob("*")) if path.is_file())


def created_databases(services: dict[str, dict[str, Any]]) -> set[str]:
    """The image's POSTGRES_DB plus every CREATE DATABASE of the init scripts."""
    created = set(re.findall(r"CREATE DATABASE\s+\"?([A-Za-z0-9_]+)", init_script_text(), re.IGNORECASE))
    return created | {environment(services["postgres"])["POSTGRES_DB"]}


def created_roles(services: dict[str, dict[str, Any]]) -> set[str]:
    created = set(re.findall(r"CREATE ROLE\s+\"?([A-Za-z0-9_]+)", init_script_text(), re.IGNORECASE))
    return created | {environment(services["postgres"])["POSTGRES_USER"]}


def locked_version(package: str) -> Version:
    text = (PROJECT_ROOT / "uv.lock").read_text()
    match = re.search(rf'^name = "{re.escape(package)}"\nversion = "([^"]+)"', text, re.MULTILINE)
    assert match, f"{package} is not in uv.lock"
    return Version(match.group(1))


def locked_names() -> set[str]:
    return set(re.findall(r'^name = "([^"]+)"', (PROJECT_ROOT / "uv.lock").read_text(), re.MULTILINE))


@pytest.fixture
def compose_connections(monkeypatch: pytest.MonkeyPatch, services: dict[str, dict[str, Any]]) -> None:
    """The Airflow services' AIRFLOW_CONN_* variables in this process, for the hooks to resolve."""
    for name in [n for n in os.environ if n.startswith("AIRFLOW_CONN_")]:
        monkeypatch.delenv(name)
    for key, value in environment(services["airflow-worker"]).items():
        if key.startswith("AIRFLOW_CONN_"):
            monkeypatch.setenv(key, value)


# --- structure -------------------------------------------------------------------------------------


def test_every_service_has_an_image_or_a_buildable_context(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name} has neither image nor build"
        image = service.get("image", "")
        assert not image.endswith(":latest") and ":" in image, f"{name}: pin the image tag, not {image!r}"
        build = service.get("build")
        if build:
            build = {"context": build} if isinstance(build, str) else build
            context = PROJECT_ROOT / build.get("context", ".")
            assert context.is_dir(), f"{name}: build context {context} does not exist"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: no Dockerfile"


def test_the_project_image_is_built_once_and_shared(services: dict[str, dict[str, Any]]) -> None:
    built = {name: s["image"] for name, s in services.items() if s.get("build")}
    assert set(built) >= {*AIRFLOW_SERVICES, "mlflow", "gateway"}
    assert len(set(built.values())) == 1, f"one tag for the project image, got {built}"


def test_depends_on_targets_exist_and_their_conditions_can_be_met(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on {target}, which is not a service"
            assert target != name
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy"
            if spec["condition"] == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} is a one-shot: restart: 'no'"


def test_dependencies_have_no_cycle(services: dict[str, dict[str, Any]]) -> None:
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "visiting", f"depends_on cycle: {' -> '.join([*path, name])}"
        state[name] = "visiting"
        for target in services[name].get("depends_on") or {}:
            visit(target, [*path, name])
        state[name] = "done"

    for name in services:
        visit(name, [])


def test_long_running_services_have_healthchecks_and_restart(services: dict[str, dict[str, Any]]) -> None:
    one_shots = one_shot_services(services)
    assert one_shots == {"airflow-init", "minio-init", "mlflow-init"}
    # Every long-running service, the gateway first, is restarted by the stack when it crashes, as
    # `make demo`'s supervisor restarts its own (devstack/modelops_dev/supervision.py).
    assert {"gateway", "mlflow", *AIRFLOW_SERVICES} <= set(services)
    assert services["gateway"].get("restart") in ("always", "unless-stopped")
    for name, service in services.items():
        if name in one_shots:
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test is {check['test']}"
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), name


def test_long_running_services_wait_for_what_they_use(services: dict[str, dict[str, Any]]) -> None:
    for name in AIRFLOW_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
        if name != "airflow-init":
            assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["gateway"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    # The gateway logs in to MLflow as the user mlflow-init creates.
    assert services["gateway"]["depends_on"]["mlflow-init"]["condition"] == "service_completed_successfully"
    assert services["mlflow-init"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    # Tasks deploy through the gateway and log to MLflow.
    worker = services["airflow-worker"]["depends_on"]
    assert worker["mlflow"]["condition"] == worker["gateway"]["condition"] == "service_healthy"


def test_airflow_services_share_the_anchor(raw_compose: dict[str, Any], compose: dict[str, Any]) -> None:
    common = compose["x-airflow-common"]
    # In the node graph an alias is the anchored node itself: each service must merge that very node.
    root = yaml.compose(COMPOSE_FILE.read_text())
    top = {key.value: value for key, value in root.value}
    services_node = {key.value: value for key, value in top["services"].value}
    for name, subcommand in AIRFLOW_SERVICES.items():
        merged = [value for key, value in services_node[name].value if key.tag.endswith(":merge")]
        assert any(node is top["x-airflow-common"] for node in merged), f"{name}: no <<: *airflow-common"
        service = compose["services"][name]
        env = environment(service)
        for key, value in environment(common).items():
            assert env.get(key) == value, f"{name}: {key} differs from x-airflow-common"
        assert service["image"] == common["image"] and service["build"] == common["build"]
        if subcommand:
            assert service["command"][:2] == ["airflow", subcommand], f"{name}: {service['command']}"


def test_the_executor_is_celery_with_a_redis_broker(services: dict[str, dict[str, Any]]) -> None:
    for name in AIRFLOW_SERVICES:
        env = environment(services[name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
        broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
        assert broker.scheme == "redis" and broker.hostname in services
        assert services[broker.hostname]["image"].startswith("redis:7")
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://")
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        # Workers reach the execution API of the api-server, by its service name and container port.
        execution = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
        assert execution.hostname == "airflow-api-server" and execution.path == "/execution/"
        assert execution.port == int(services["airflow-api-server"]["command"][-3])
        # The same JWT secret everywhere, or tasks are rejected by the execution API.
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert services["airflow-worker"]["command"] == ["airflow", "celery", "worker"]


def test_scheduler_healthcheck_port_is_served(services: dict[str, dict[str, Any]]) -> None:
    scheduler = services["airflow-scheduler"]
    assert environment(scheduler)["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "True"
    assert f"localhost:{SCHEDULER_HEALTH_PORT}/health" in " ".join(scheduler["healthcheck"]["test"])


def test_published_ports_are_unique(services: dict[str, dict[str, Any]]) -> None:
    host_ports: dict[int, str] = {}
    for name, service in services.items():
        for mapping in service.get("ports") or []:
            host = int(str(mapping).rpartition(":")[0].rpartition(":")[2])
            assert host not in host_ports, (
                f"host port {host} is published by {host_ports.get(host)} and {name}"
            )
            host_ports[host] = name
    assert {8080, 5000, 8008} <= set(host_ports)


def test_named_volumes_are_declared_and_bind_mounts_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = str(volume).split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (PROJECT_ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in declared, f"{name} uses volume {source!r}, not declared under volumes:"
                used.add(source)
    assert declared == used, f"declared but unused volumes: {declared - used}"


# --- PostgreSQL ------------------------------------------------------------------------------------


def postgres_urls(compose: dict[str, Any]) -> list[str]:
    """Every SQLAlchemy/psycopg URL in environments and commands (connections JSON included)."""
    text = json.dumps(compose["services"])
    return re.findall(r"(?:db\+)?postgresql(?:\+psycopg2)?://[^\s\"',]+", text)


def test_databases_and_roles_of_every_url_are_created(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    urls = postgres_urls(compose)
    assert len(urls) >= 4
    databases, roles = created_databases(services), created_roles(services)
    assert {"airflow", "mlflow", "modelops_audit", "modelops_predictions"} <= databases
    for url in urls:
        parts = urlsplit(url.removeprefix("db+"))
        assert parts.hostname == "postgres" and parts.port == 5432, url
        assert parts.path.lstrip("/") in databases, f"{url}: database not created by {INIT_DIR}"
        assert parts.username in roles, f"{url}: role not created by {INIT_DIR}"


def test_init_script_is_mounted_and_gets_its_passwords(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:15"
    assert "./docker/postgres/init:/docker-entrypoint-initdb.d:ro" in postgres["volumes"]
    env = environment(postgres)
    for variable in set(re.findall(r"\$\{?([A-Z_]+_PASSWORD)", init_script_text())):
        assert env.get(variable), f"the init script reads {variable}; set it on the postgres service"
    # The role passwords the init script sets are the ones the clients use.
    for url in postgres_urls({"services": services}):
        parts = urlsplit(url.removeprefix("db+"))
        expected = env["POSTGRES_PASSWORD"] if parts.username == "airflow" else None
        expected = expected or env[f"{parts.username.upper()}_DB_PASSWORD"]
        assert parts.password == expected, f"{url}: password differs from the postgres service's"
    for path in INIT_DIR.glob("*.sh"):
        assert path.stat().st_mode & 0o111, f"{path} must be executable (docker-entrypoint runs it)"


# --- connections against the hooks -----------------------------------------------------------------


def test_every_hook_default_connection_is_defined(services: dict[str, dict[str, Any]]) -> None:
    from modelops.hooks.audit import AuditHook
    from modelops.hooks.gateway import GatewayHook
    from modelops.hooks.prediction_log import PredictionLogHook
    from modelops.hooks.registry import MlflowRegistryHook

    env = environment(services["airflow-worker"])
    hooks = [AuditHook, GatewayHook, PredictionLogHook, MlflowRegistryHook]
    expected = {"mlflow_default", "modelops_audit", "modelops_predictions", "modelops_gateway"}
    assert {hook.default_conn_name for hook in hooks} == expected
    for hook in hooks:
        raw = env.get(f"AIRFLOW_CONN_{hook.default_conn_name.upper()}")
        assert raw, f"no AIRFLOW_CONN_ for {hook.__name__}.default_conn_name={hook.default_conn_name!r}"
        fields = json.loads(raw)
        assert fields["conn_type"] in (hook.conn_type, "postgres"), f"{hook.__name__}: {fields}"


@pytest.mark.usefixtures("compose_connections")
def test_hooks_resolve_the_compose_connections_to_the_services(services: dict[str, dict[str, Any]]) -> None:
    from airflow.sdk import BaseHook

    from modelops.hooks._db import sqlalchemy_url
    from modelops.hooks.audit import AuditHook
    from modelops.hooks.gateway import GatewayHook
    from modelops.hooks.prediction_log import PredictionLogHook
    from modelops.hooks.registry import MlflowRegistryHook

    mlflow_port = int(services["mlflow"]["command"][services["mlflow"]["command"].index("--port") + 1])
    gateway_port = int(services["gateway"]["command"][services["gateway"]["command"].index("--port") + 1])
    assert MlflowRegistryHook().tracking_uri == f"http://mlflow:{mlflow_port}"
    assert GatewayHook().get_conn().base_url == f"http://gateway:{gateway_port}"
    # The hook's bearer token is the gateway's admin token.
    token = BaseHook.get_connection(GatewayHook.default_conn_name).password
    assert token == environment(services["gateway"])["MODELOPS_GATEWAY_ADMIN_TOKEN"]

    databases = created_databases(services)
    audit_url = urlsplit(AuditHook().url)
    predictions_url = sqlalchemy_url(PredictionLogHook().connection)
    assert audit_url.hostname == "postgres" and audit_url.path.lstrip("/") in databases
    # Monitoring reads exactly the database the gateway writes.
    assert predictions_url == environment(services["gateway"])["MODELOPS_PREDICTIONS_URL"]
    assert environment(services["gateway"])["MLFLOW_TRACKING_URI"] == f"http://mlflow:{mlflow_port}"


# --- object storage --------------------------------------------------------------------------------


def created_buckets(services: dict[str, dict[str, Any]]) -> set[str]:
    script = " ".join(services["minio-init"]["command"])
    return set(re.findall(r"store/([a-z0-9.-]+)", script.split("mc mb", 1)[1]))


@pytest.mark.usefixtures("compose_connections")
def test_storage_root_is_an_s3_bucket_behind_a_minio_connection(services: dict[str, dict[str, Any]]) -> None:
    from airflow.providers.amazon.aws.utils.connection_wrapper import AwsConnectionWrapper
    from airflow.sdk import BaseHook

    env = environment(services["airflow-worker"])
    root = urlsplit(env["MODELOPS_STORAGE_ROOT"])
    assert root.scheme == "s3" and root.hostname in created_buckets(services)
    conn = BaseHook.get_connection(env["MODELOPS_STORAGE_CONN_ID"])
    assert conn.conn_type == "aws"
    wrapper = AwsConnectionWrapper(conn)
    endpoint = urlsplit(wrapper.get_service_endpoint_url("s3"))
    assert endpoint.hostname == "minio" and endpoint.port == 9000
    minio = environment(services["minio"])
    assert (conn.login, conn.password) == (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"])


def test_mlflow_server_uses_postgres_and_a_created_bucket(services: dict[str, dict[str, Any]]) -> None:
    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]

    def option(flag: str) -> str:
        assert flag in command, f"mlflow server lacks {flag}"
        return command[command.index(flag) + 1]

    assert option("--backend-store-uri").startswith("postgresql+psycopg2://mlflow:")
    artifacts = urlsplit(option("--artifacts-destination"))
    assert artifacts.scheme == "s3" and artifacts.hostname in created_buckets(services)
    assert option("--host") == "0.0.0.0"
    # Clients inside the network send Host: mlflow:<port>; MLflow's host check must accept it.
    assert f"mlflow:{option('--port')}" in option("--allowed-hosts").split(",")
    env = environment(mlflow)
    assert urlsplit(env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    assert published_port(mlflow, int(option("--port"))) == 5000
    assert f"localhost:{option('--port')}/health" in " ".join(mlflow["healthcheck"]["test"])


def test_mlflow_server_accepts_the_flags_used() -> None:
    from click.testing import CliRunner
    from mlflow.cli import server

    result = CliRunner().invoke(server, ["--help"])
    assert result.exit_code == 0
    for flag in ("--backend-store-uri", "--artifacts-destination", "--host", "--port", "--workers"):
        assert flag in result.output
    assert "--allowed-hosts" in result.output
    assert "--app-name" in result.output and "basic-auth" in result.output


# --- MLflow authentication, secrets, exposure --------------------------------------------------------

# A reference that compose refuses to start without: ``${NAME:?message}``.
_REQUIRED = r"\$\{{{name}:\?[^}}]+\}}"
_ANY_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}")
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEYS?$")
BASIC_AUTH = "mlflow.server.auth:authenticate_request_basic_auth"


def is_required_reference(value: str, name: str) -> bool:
    return re.fullmatch(_REQUIRED.format(name=re.escape(name)), value) is not None


def raw_environments(raw_compose: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Each service's environment before substitution (safe_load has resolved anchors and merges)."""
    return {name: environment(service) for name, service in raw_compose["services"].items()}


def test_mlflow_runs_the_basic_auth_app_with_the_mounted_config(services: dict[str, dict[str, Any]]) -> None:
    from mlflow.utils.plugins import get_entry_points

    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    assert "--app-name" in command, "MLflow must run its basic-auth app: authentication off otherwise"
    assert command[command.index("--app-name") + 1] == "basic-auth"
    # The app that name selects, in the locked MLflow.
    apps = {entry.name: entry.value for entry in get_entry_points("mlflow.app")}
    assert apps.get("basic-auth") == "mlflow.server.auth:create_app"
    env = environment(mlflow)
    mount = f"./{MLFLOW_AUTH_INI.relative_to(PROJECT_ROOT)}:{env['MLFLOW_AUTH_CONFIG_PATH']}:ro"
    assert mount in mlflow["volumes"], (
        f"the auth config is not mounted where MLFLOW_AUTH_CONFIG_PATH says: {mount}"
    )
    # CSRF protection of the auth app needs one static secret for all workers.
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == required_value("MLFLOW_FLASK_SECRET_KEY")


def test_the_basic_auth_app_is_importable_with_the_locked_dependencies() -> None:
    # mlflow[auth]: the app imports Flask-WTF for CSRF and the server refuses to start without it.
    assert "flask-wtf" in locked_names(), "uv.lock lacks flask-wtf: depend on mlflow[auth] in pyproject.toml"
    import mlflow.server.auth  # noqa: F401


def test_mlflow_auth_config_grants_no_write_by_default_and_lives_in_postgres(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.server.auth.config import read_auth_config
    from mlflow.server.auth.permissions import get_permission
    from sqlalchemy.engine import make_url

    parser = configparser.ConfigParser()
    parser.read_string(MLFLOW_AUTH_INI.read_text())
    # No secret in the file: the admin comes from the environment, the DB password from PGPASSWORD.
    assert not {"admin_username", "admin_password"} & set(parser["mlflow"]), "admin credentials in the ini"

    # The configuration as MLflow reads it in the container.
    env = environment(services["mlflow"])
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(MLFLOW_AUTH_INI))
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.setenv(name, env[name])
    config = read_auth_config()
    assert config.default_permission in ("NO_PERMISSIONS", "READ")
    default = get_permission(config.default_permission)
    assert not (default.can_use or default.can_update or default.can_delete or default.can_manage)
    assert config.authorization_function == BASIC_AUTH
    assert not config.grant_default_workspace_access
    assert config.admin_username == required_value("MLFLOW_ADMIN_USERNAME")
    assert config.admin_password == required_value("MLFLOW_ADMIN_PASSWORD")

    # Users and grants persist in PostgreSQL (not an SQLite file inside the container), in their own
    # database, reached as the mlflow role with the password the postgres service gives that role.
    auth = make_url(config.database_uri)
    command = services["mlflow"]["command"]
    tracking = make_url(command[command.index("--backend-store-uri") + 1])
    assert auth.get_backend_name() == "postgresql" and (auth.host, auth.port) == ("postgres", 5432)
    assert auth.database in created_databases(services), f"{auth.database}: no init script creates it"
    assert auth.database != tracking.database, "the auth database must be apart from the tracking store"
    assert auth.username == tracking.username and auth.username in created_roles(services)
    assert auth.password is None, "no password in the ini: PGPASSWORD carries it"
    assert env["PGPASSWORD"] == tracking.password == environment(services["postgres"])["MLFLOW_DB_PASSWORD"]


def test_required_variables_are_the_secrets_without_default_and_documented(
    raw_compose: dict[str, Any],
) -> None:
    text = COMPOSE_FILE.read_text()
    references = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?", text)
    required = {name for name, operator in references if operator in (":?", "?")}
    assert required == REQUIRED_VARIABLES
    for name in REQUIRED_VARIABLES:
        # Required wherever it is used: a default in one place would be the value there.
        assert {operator for used, operator in references if used == name} == {":?"}, name
    header = text.split("\nx-", 1)[0]
    readme = README.read_text().split("## MLflow authentication in production", 1)
    assert len(readme) == 2, "README.md has no section '## MLflow authentication in production'"
    section = readme[1].split("\n## ", 1)[0]
    for name in REQUIRED_VARIABLES:
        assert name in header, f"{name}: list it in docker-compose.yaml's header"
        assert name in section, f"{name}: document it in README's MLflow authentication section"

    raw = raw_environments(raw_compose)
    mlflow = raw["mlflow"]
    assert is_required_reference(mlflow["MLFLOW_AUTH_ADMIN_USERNAME"], "MLFLOW_ADMIN_USERNAME")
    assert is_required_reference(mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"], "MLFLOW_ADMIN_PASSWORD")
    assert is_required_reference(mlflow["MLFLOW_FLASK_SERVER_SECRET_KEY"], "MLFLOW_FLASK_SECRET_KEY")
    for name, env in raw.items():
        if "MLFLOW_TRACKING_PASSWORD" in env:
            value = env["MLFLOW_TRACKING_PASSWORD"]
            assert is_required_reference(value, "MLFLOW_ADMIN_PASSWORD") or is_required_reference(
                value, "MLFLOW_GATEWAY_PASSWORD"
            ), f"{name}: MLFLOW_TRACKING_PASSWORD={value!r}"


def test_no_secret_is_written_into_compose(raw_compose: dict[str, Any]) -> None:
    """Every password, key, token and secret is a ${...} reference: never a literal in the file."""

    def literal_secret(value: str) -> bool:
        return not _ANY_REFERENCE.fullmatch(value)

    def check_json(where: str, text: str) -> None:
        # A connection's password, a keyring's secrets: each must be one reference, nothing else.
        fields = json.loads(_ANY_REFERENCE.sub("<reference>", text))
        secrets = {"password": fields.get("password"), **(fields.get("keys") or {})}
        for field, secret in secrets.items():
            assert secret in (None, "<reference>"), f"{where}: {field} is a literal: use a ${{VARIABLE}}"

    blocks = {f"services.{name}": service for name, service in raw_compose["services"].items()}
    blocks |= {key: value for key, value in raw_compose.items() if key.startswith("x-")}
    for where, block in blocks.items():
        for key, value in environment(block).items():
            if value.lstrip().startswith("{"):
                check_json(f"{where}.{key}", value)
            elif _SECRET_NAME.search(key) and value:
                assert not literal_secret(value), f"{where}.{key} is a literal: use a ${{VARIABLE}}"
        # Passwords inside URLs, in environments and commands alike.
        for match in re.finditer(r"://[^:/@\s\"']+:([^@\s\"']+)@", json.dumps(block)):
            assert not literal_secret(match.group(1)), f"{where}: literal password in a URL"
    # The values the tests give the required variables appear nowhere in the file.
    text = COMPOSE_FILE.read_text()
    assert not any(required_value(name) in text for name in REQUIRED_VARIABLES)


def test_every_service_that_talks_to_mlflow_logs_in(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.utils.credentials import get_default_host_creds

    clients = {name for name, service in services.items() if "MLFLOW_TRACKING_URI" in environment(service)}
    assert clients == {*AIRFLOW_SERVICES, "gateway", "mlflow-init"}
    mlflow = environment(services["mlflow"])
    admin = (mlflow["MLFLOW_AUTH_ADMIN_USERNAME"], mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"])
    for name in sorted(clients):
        env = environment(services[name])
        for variable in [v for v in os.environ if v.startswith("MLFLOW_TRACKING_")]:
            monkeypatch.delenv(variable)
        for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert env.get(variable), f"{name} talks to MLflow without {variable}"
            monkeypatch.setenv(variable, env[variable])
        # What the MLflow client of that container sends (the hook's and the gateway's clients alike).
        creds = get_default_host_creds(env["MLFLOW_TRACKING_URI"])
        expected = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
        assert (creds.username, creds.password) == expected, name
        if name != "gateway":
            assert expected == admin, f"{name}: the pipeline and mlflow-init log in as MLflow's admin"
    # The gateway is the non-admin user mlflow-init creates: default_permission READ, it cannot write.
    gateway, init = environment(services["gateway"]), environment(services["mlflow-init"])
    gateway_user = (gateway["MLFLOW_TRACKING_USERNAME"], gateway["MLFLOW_TRACKING_PASSWORD"])
    assert gateway_user == (
        init["MODELOPS_GATEWAY_MLFLOW_USERNAME"],
        init["MODELOPS_GATEWAY_MLFLOW_PASSWORD"],
    )
    assert gateway_user[0] != admin[0]
    assert "update_user_admin(user, False)" in services["mlflow-init"]["command"][-1]
    # MlflowRegistryHook takes the address only from mlflow_default; credentials there would be ignored.
    connection = json.loads(environment(services["airflow-worker"])["AIRFLOW_CONN_MLFLOW_DEFAULT"])
    assert not {"login", "password"} & set(connection), "MlflowRegistryHook does not pass them to MLflow"


def test_every_published_port_listens_on_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    published = set()
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name}: host networking publishes every port"
        for mapping in service.get("ports") or []:
            if isinstance(mapping, dict):
                assert mapping.get("host_ip") == "127.0.0.1", f"{name}: {mapping}"
            else:
                host_ip, _, rest = str(mapping).partition(":")
                assert host_ip == "127.0.0.1" and rest.count(":") == 1, (
                    f"{name}: {mapping} is not 127.0.0.1:host:container"
                )
            published.add(name)
    assert {"mlflow", "gateway", "airflow-api-server"} <= published


@pytest.mark.usefixtures("compose_connections")
def test_the_audit_key_is_required_and_the_same_for_airflow_and_the_gateway(
    raw_compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    from modelops.audit import AuditKeyring
    from modelops.hooks.audit import AuditHook

    raw = raw_environments(raw_compose)
    for name in AIRFLOW_SERVICES:
        connection = json.loads(_ANY_REFERENCE.sub("x", raw[name]["AIRFLOW_CONN_MODELOPS_AUDIT_KEY"]))
        assert connection["conn_type"] == "generic" and connection["login"] == "k1", name
        assert re.search(
            r'"password": "\$\{MODELOPS_AUDIT_KEY:\?[^}]+\}"', raw[name]["AIRFLOW_CONN_MODELOPS_AUDIT_KEY"]
        )
    assert re.search(r'"k1": "\$\{MODELOPS_AUDIT_KEY:\?[^}]+\}"', raw["gateway"]["MODELOPS_AUDIT_KEYS"])

    hook = AuditHook()
    assert AuditHook.default_key_conn_name == "modelops_audit_key"
    gateway = environment(services["gateway"])
    keyring = AuditKeyring.from_json(gateway["MODELOPS_AUDIT_KEYS"], source="MODELOPS_AUDIT_KEYS")
    assert hook.keyring.current == keyring.current == "k1"
    assert dict(hook.keyring.keys) == dict(keyring.keys) == {"k1": required_value("MODELOPS_AUDIT_KEY")}
    # The gateway checks deployments against the very log the pipeline writes.
    assert gateway["MODELOPS_AUDIT_URL"] == hook.url


# A real basic-auth server, as compose configures it (app, ini settings, admin and CSRF variables) but with
# SQLite stores in a temporary folder: not the session's shared server of tests/conftest.py, which runs
# without authentication like the demo.


@pytest.fixture
def basic_auth_server(tmp_path: Path, services: dict[str, dict[str, Any]]) -> Iterator[str]:
    """``mlflow server`` with compose's command flags for auth and its ini, on a free loopback port."""
    parser = configparser.ConfigParser()
    parser.read_string(MLFLOW_AUTH_INI.read_text())
    parser["mlflow"]["database_uri"] = f"sqlite:///{tmp_path / 'auth.db'}"
    ini = tmp_path / "basic_auth.ini"
    with ini.open("w") as handle:
        parser.write(handle)
    compose_env = environment(services["mlflow"])
    command = services["mlflow"]["command"]
    port = free_port()
    argv = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--app-name",
        command[command.index("--app-name") + 1],
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination",
        str(tmp_path / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env |= {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for name in (
        "MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    ):
        env[name] = compose_env[name]
    log_file = tmp_path / "mlflow-server.log"
    with log_file.open("ab") as log:
        # Its own process group: `mlflow server` runs uvicorn as a child, and both must stop at the end.
        process = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        if not _wait_healthy(url, process, timeout=90):
            pytest.fail(f"mlflow server --app-name basic-auth did not start:\n{log_file.read_text()[-3000:]}")
        yield url
    finally:
        _stop_process_group(process)


def test_basic_auth_server_refuses_anonymous_writes_and_lets_the_pipeline_write(
    basic_auth_server: str,
    services: dict[str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    import httpx
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from modelops.registry import ModelRegistry

    api = f"{basic_auth_server}/api/2.0/mlflow"
    http = httpx.Client(trust_env=False, timeout=30)
    admin = environment(services["mlflow"])
    admin_user = admin["MLFLOW_AUTH_ADMIN_USERNAME"]

    def create_model(name: str, auth: tuple[str, str] | None = None) -> int:
        return http.post(f"{api}/registered-models/create", json={"name": name}, auth=auth).status_code

    # Anonymous, an unknown user and a wrong password: 401, for reads, writes and sign-ups alike.
    assert create_model("auth_probe") == 401
    assert create_model("auth_probe", ("intruder", "intruder-password")) == 401
    assert create_model("auth_probe", (admin_user, "not-the-admin-password")) == 401
    assert http.get(f"{api}/registered-models/search").status_code == 401
    signup = {"username": "intruder", "password": "intruder-password"}
    assert http.post(f"{api}/users/create", json=signup).status_code == 401

    def log_in_as(env: dict[str, str]) -> ModelRegistry:
        for variable in [v for v in os.environ if v.startswith("MLFLOW_TRACKING_")]:
            monkeypatch.delenv(variable)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", env["MLFLOW_TRACKING_USERNAME"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", env["MLFLOW_TRACKING_PASSWORD"])
        return ModelRegistry(basic_auth_server)

    # The Airflow services' credentials: the pipeline registers a model, a version and its champion alias.
    worker_env = environment(services["airflow-worker"])
    pipeline = log_in_as(worker_env)
    model = pipeline.ensure_model("auth_probe", tags={"modelops.owner": "test"})
    assert model.tags["modelops.owner"] == "test"
    client = MlflowClient(basic_auth_server)
    run = client.create_run(client.create_experiment("auth_probe"))
    client.log_text(run.info.run_id, "weights v1", "model/weights.txt")
    version = client.create_model_version(
        "auth_probe", f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    ).version
    pipeline.set_alias("auth_probe", "champion", version)

    # mlflow-init's script as compose runs it, twice (a restart of the stack): the gateway's user.
    init_env = environment(services["mlflow-init"])
    log_in_as(init_env)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", basic_auth_server)
    for variable in ("MODELOPS_GATEWAY_MLFLOW_USERNAME", "MODELOPS_GATEWAY_MLFLOW_PASSWORD"):
        monkeypatch.setenv(variable, init_env[variable])
    script = services["mlflow-init"]["command"][-1]
    for _ in range(2):
        exec(compile(script, "mlflow-init", "exec"), {})

    # The gateway's credentials read what it serves: the champion and its files.
    gateway_env = environment(services["gateway"])
    gateway = log_in_as(gateway_env)
    champion = gateway.version_by_alias("auth_probe", "champion")
    assert champion is not None and champion.version == str(version)
    downloaded = download_artifacts(
        run_id=run.info.run_id,
        artifact_path="model/weights.txt",
        dst_path=str(tmp_path / "download"),
        tracking_uri=basic_auth_server,
    )
    assert Path(downloaded).read_text() == "weights v1"

    # ... and change nothing of the pipeline's: no tag, alias, version or file (the attacks).
    gateway_auth = (gateway_env["MLFLOW_TRACKING_USERNAME"], gateway_env["MLFLOW_TRACKING_PASSWORD"])
    forbidden = {
        "registered-models/set-tag": {"name": "auth_probe", "key": "compliance_status", "value": "approved"},
        "registered-models/alias": {"name": "auth_probe", "alias": "champion", "version": str(version)},
        "model-versions/create": {"name": "auth_probe", "source": f"{run.info.artifact_uri}/model"},
        "model-versions/set-tag": {"name": "auth_probe", "version": str(version), "key": "k", "value": "v"},
    }
    for endpoint, body in forbidden.items():
        assert http.post(f"{api}/{endpoint}", json=body, auth=gateway_auth).status_code == 403, endpoint
    assert (
        http.delete(
            f"{api}/registered-models/alias",
            params={"name": "auth_probe", "alias": "champion"},
            auth=gateway_auth,
        ).status_code
        == 403
    )
    artifact = f"{basic_auth_server}/api/2.0/mlflow-artifacts/artifacts/"
    artifact += f"{run.info.artifact_uri.removeprefix('mlflow-artifacts:/')}/model/weights.txt"
    assert http.put(artifact, content=b"tampered").status_code == 401
    assert http.put(artifact, content=b"tampered", auth=gateway_auth).status_code == 403
    with pytest.raises(MlflowException):
        gateway.set_alias("auth_probe", "champion", version)

    # MLflow lets any known user create a new experiment or model (its creator owns it); it gives no
    # right on anyone else's (README, "MLflow authentication in production").
    assert create_model("gateway_probe", gateway_auth) == 200

    log_in_as(worker_env)
    assert pipeline.aliases("auth_probe") == {"champion": str(version)}
    assert client.get_registered_model("auth_probe").tags == {"modelops.owner": "test"}
    fresh = download_artifacts(
        run_id=run.info.run_id,
        artifact_path="model/weights.txt",
        dst_path=str(tmp_path / "after"),
        tracking_uri=basic_auth_server,
    )
    assert Path(fresh).read_text() == "weights v1"


# --- commands against the code ---------------------------------------------------------------------


def test_gateway_command_parses_with_the_module_cli(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import modelops.serving.__main__ as gateway_cli

    command = services["gateway"]["command"]
    assert command[:3] == ["python", "-m", "modelops.serving"]
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(gateway_cli.GatewayConfig, "from_env", classmethod(lambda cls: None))
    monkeypatch.setattr(gateway_cli, "create_app", lambda config: "app")
    monkeypatch.setattr(gateway_cli.uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    gateway_cli.main(command[3:])
    assert calls and calls[0]["host"] == "0.0.0.0"
    port = calls[0]["port"]
    assert published_port(services["gateway"], port) == 8008
    assert f"localhost:{port}/" in " ".join(services["gateway"]["healthcheck"]["test"])
    env = environment(services["gateway"])
    assert {"MLFLOW_TRACKING_URI", "MODELOPS_PREDICTIONS_URL"} <= set(env)
    # OpenMP threads of the model's predict spin against each other under load (bench_gateway.py).
    assert env.get("OMP_NUM_THREADS") == "1"


def test_gateway_and_airflow_agree_on_the_default_model(
    raw_compose: dict[str, Any], services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelops.serving.gateway import GatewayConfig
    from modelops.settings import load_catalog

    # One variable, passed through to both with an empty default, so include/modelops.yaml decides
    # unless .env sets it; a default written here would silently override the settings file.
    passed_through = "${MODELOPS_DEFAULT_MODEL:-}"
    assert raw_compose["services"]["gateway"]["environment"]["MODELOPS_DEFAULT_MODEL"] == passed_through
    assert raw_compose["x-airflow-common"]["environment"]["MODELOPS_DEFAULT_MODEL"] == passed_through
    gateway_env = environment(services["gateway"])
    assert "MODELOPS_SERVED_MODEL" not in gateway_env  # replaced by MODELOPS_DEFAULT_MODEL
    for name in AIRFLOW_SERVICES:
        assert environment(services[name])["MODELOPS_DEFAULT_MODEL"] == gateway_env["MODELOPS_DEFAULT_MODEL"]

    # The gateway's configuration as the container resolves it: every model spec it can serve.
    monkeypatch.setenv("MODELOPS_DEFAULT_MODEL", gateway_env["MODELOPS_DEFAULT_MODEL"])
    catalog = load_catalog()
    config = GatewayConfig.from_env(gateway_env)
    assert config.default_model == catalog.platform.default_model
    assert set(config.models) == {name for name, spec in catalog.models.items() if spec.serving.enabled}
    assert config.admin_token == gateway_env["MODELOPS_GATEWAY_ADMIN_TOKEN"]


def test_python_modules_run_with_dash_m_have_a_main(compose: dict[str, Any]) -> None:
    import importlib.util

    for name, service in compose["services"].items():
        command = service.get("command") or []
        for index, part in enumerate(command[:-1]):
            if part == "-m" and index > 0 and command[index - 1] == "python":
                module = command[index + 1]
                spec = importlib.util.find_spec(f"{module}.__main__") if "." in module else None
                spec = spec or importlib.util.find_spec(module)
                assert spec and spec.origin, f"{name}: no module {module}"
                assert "__main__" in Path(spec.origin).read_text(), f"{name}: {module} has no CLI"


def test_airflow_init_migrates_and_loads_pools_with_the_project_loader(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from modelops import airflow_settings

    script = services["airflow-init"]["command"][-1]
    assert "airflow db migrate" in script
    # modelops.airflow_settings has no CLI: the init runs its loader through `python -c '...'`.
    match = re.search(r"python -c '\n(.*?)\n'", script, re.DOTALL)
    assert match, "airflow-init should load airflow_settings.yaml with modelops.airflow_settings"
    applied: list[airflow_settings.AirflowSettings] = []
    monkeypatch.setattr(airflow_settings, "apply", lambda settings, env=None: applied.append(settings))
    exec(compile(match.group(1), "airflow-init", "exec"), {})
    (settings,) = applied
    expected = airflow_settings.load_settings_file()
    assert settings.pools == expected.pools and settings.variables == expected.variables
    assert settings.connections == [], "connections come from AIRFLOW_CONN_*, not the embedded stack's file"
    assert "pools" in capsys.readouterr().out


# --- Dockerfile ------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_base_image_matches_the_locked_airflow() -> None:
    (base,) = [args for op, args in dockerfile_instructions() if op == "FROM"]
    match = re.fullmatch(r"apache/airflow:(\d+\.\d+\.\d+)-python(\d+\.\d+)", base)
    assert match, f"FROM {base}: expected apache/airflow:<version>-python<x.y>"
    image_airflow, image_python = Version(match.group(1)), match.group(2)
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    assert image_airflow == locked_version("apache-airflow"), "FROM and uv.lock pin different Airflows"
    spec = next(d for d in pyproject["dependencies"] if re.match(r"apache-airflow[<>=! ]", d))
    assert image_airflow in SpecifierSet(spec.removeprefix("apache-airflow")), spec
    assert Version(f"{image_python}.0") in SpecifierSet(pyproject["requires-python"])


def test_dockerfile_installs_the_lock_and_copies_the_code() -> None:
    instructions = dockerfile_instructions()
    copies = [args.split() for op, args in instructions if op == "COPY"]
    sources = {source.rstrip("/") for args in copies for source in args[:-1] if not source.startswith("--")}
    assert {"dags", "plugins", "include", "airflow_settings.yaml", "uv.lock", "pyproject.toml"} <= sources
    targets = {args[-1].rstrip("/") for args in copies}
    assert {"./dags", "./plugins", "./include"} <= targets  # relative to WORKDIR /opt/airflow
    workdirs = [args for op, args in instructions if op == "WORKDIR"]
    assert workdirs[-1] == "/opt/airflow"
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert "uv export --frozen" in runs and "--no-dev" in runs and "-r requirements.txt" in runs
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert "PYTHONPATH=/opt/airflow/plugins" in env  # the gateway and `python -c` import modelops


def test_dockerfile_adds_what_the_lock_lacks_for_this_stack() -> None:
    runs = " ".join(args for op, args in dockerfile_instructions() if op == "RUN")
    names = locked_names()
    # CeleryExecutor needs the celery provider; s3:// ObjectStoragePath needs s3fs.
    for package in ("apache-airflow-providers-celery", "s3fs"):
        assert package in names or package in runs, f"{package} is neither locked nor installed"


def test_dockerignore_keeps_state_out_but_not_the_inputs() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", ".demo", ".modelops"} <= ignored
    needed = {"dags", "plugins", "include", "airflow_settings.yaml", "uv.lock", "pyproject.toml"}
    assert not needed & ignored
