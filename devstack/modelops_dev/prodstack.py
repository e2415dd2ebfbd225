"""``make stack``: the production shape of ``docker-compose.yaml``, run as processes on this machine.

Nothing here restates the production settings: the stack reads ``docker-compose.yaml`` and runs each of
its services' commands with their environment, translated to this machine (:class:`Translation`):

- the ``postgres`` service is the PostgreSQL server of ``MODELOPS_STACK_PG_URL`` (the machine's by default):
  every role and database the compose URLs name is created there under the stack's prefix
  (``modelops_stack_airflow``, ``modelops_stack_mlflow`` ...), owned by its role, and dropped by
  ``make stack-down``;
- ``redis`` is the Redis server of ``MODELOPS_STACK_REDIS_URL`` (a database number of its own, flushed at
  start and stop);
- ``minio`` is moto's S3 server on loopback; ``minio-init``'s buckets are created under the prefix
  (``modelops-stack-modelops`` ...), object-locked where compose asks ``mc mb --with-lock``;
- host names become loopback addresses with the stack's ports, ``0.0.0.0`` becomes ``127.0.0.1``,
  container paths become folders of the stack (``.stack/`` by default), and a file compose bind-mounts
  is copied there with the same translation;
- ``airflow-worker`` runs ``MODELOPS_STACK_WORKERS`` times (2), each a Celery node of its own name.

What the stack adds, and why, is :data:`STACK_ONLY` and :data:`COMMAND_FLAGS`; the test
``tests/unit/test_prodstack.py`` holds the translation to compose. Secrets compose requires are generated
once per stack folder (owner-only ``secrets.json``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelops.errors import ConfigurationError
from modelops.settings import PROJECT_ROOT
from modelops_dev import LOOPBACK
from modelops_dev.processes import RestartPolicy, Service
from modelops_dev.stack import (
    AIRFLOW_USERS,
    DEV_ROOT,
    LOG_SERVER_APP,
    ensure_gateway_keys,
    ensure_passwords,
    gateway_keys_env,
    ports_from_env,
    spec_teams,
)

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yaml"
RESTART = RestartPolicy()  # compose: `restart: always`

# Every compose service, and what the process stack does with it (tests check nothing is left out).
REPLACED = {
    "postgres": "the PostgreSQL server of MODELOPS_STACK_PG_URL: the roles and databases compose's URLs name",
    "redis": "the Redis server of MODELOPS_STACK_REDIS_URL",
    "minio": "moto's S3 server (moto_server) on loopback",
    "minio-init": "the buckets of its `mc mb` commands, created with boto3 (object lock for --with-lock)",
}
ONE_SHOTS = ("airflow-init", "mlflow-init")
"""Run once, in this order, after the servers they need are up (compose: service_completed_successfully)."""
LONG_RUNNING = (
    "mlflow",
    "gateway",
    "airflow-api-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
)

STACK_ONLY: dict[str, str] = {
    "AIRFLOW_HOME": "the image's /opt/airflow: Airflow's config, logs and the generated passwords file",
    "AIRFLOW__CORE__DAGS_FOLDER": "the image bakes dags/ into /opt/airflow/dags",
    "AIRFLOW__CORE__PLUGINS_FOLDER": "the image bakes plugins/ into /opt/airflow/plugins",
    "PYTHONPATH": "the hostname callable below lives in devstack/, which the image does not ship",
    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "every component runs on this host: log URLs point at loopback",
    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": "the stack's ports are its own, beside a running make demo",
    "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": "the stack's ports are its own, beside a running make demo",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "compose's 8974 health server, on loopback",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": "the stack's ports are its own",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "the demo's approver (risk_officer) answers the gate",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": "passwords the stack's driver logs in with",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "only a task's assigned users answer its form",
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "two workers on two cores: MODELOPS_STACK_WORKER_CONCURRENCY",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "a killed worker's task is retried in 30 s, not 5 min",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "new DAG files seen within seconds",
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "the scheduler looks for Asset events every second",
    "MODELOPS_COLD_START_DAYS": "versions minutes old must alert as the demo's do",
    "NO_PROXY": "loopback services are never reached through a proxy",
}
"""Environment the process stack sets for Airflow's components beyond compose's, each with its reason."""

COMMAND_FLAGS: dict[str, tuple[str, ...]] = {
    # Two workers, the scheduler's and the triggerer's log servers would all bind 0.0.0.0:8793/8794 on one
    # host: the stack serves the shared log folder with Airflow's own log-server app on loopback instead.
    "airflow-worker": ("--skip-serve-logs",),
    "airflow-triggerer": ("--skip-serve-logs",),
    "airflow-scheduler": ("--skip-serve-logs",),
}

DEFAULT_PREFIX = "modelops_stack"
PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}")
_PG_URL = re.compile(r"(?:db\+)?postgresql(?:\+psycopg2)?://[^\s'\",]+")
_S3_URI = re.compile(r"s3://([a-z0-9][a-z0-9.-]*)")


# --- configuration -------------------------------------------------------------------------------


PORT_VARIABLES: dict[str, tuple[str, int]] = {
    "airflow": ("MODELOPS_STACK_AIRFLOW_PORT", 8180),
    "mlflow": ("MODELOPS_STACK_MLFLOW_PORT", 5100),
    "gateway": ("MODELOPS_STACK_GATEWAY_PORT", 8108),
    "s3": ("MODELOPS_STACK_S3_PORT", 9100),
    "worker_log": ("MODELOPS_STACK_WORKER_LOG_PORT", 8893),
    "triggerer_log": ("MODELOPS_STACK_TRIGGERER_LOG_PORT", 8894),
    "scheduler_health": ("MODELOPS_STACK_SCHEDULER_HEALTH_PORT", 8984),
}
"""StackPorts field -> (its variable, its default): other defaults than make demo's, so both can run."""


@dataclass(frozen=True)
class StackPorts:
    airflow: int = 8180
    mlflow: int = 5100
    gateway: int = 8108
    s3: int = 9100
    worker_log: int = 8893
    triggerer_log: int = 8894
    scheduler_health: int = 8984

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StackPorts:
        return cls(**ports_from_env(PORT_VARIABLES, env))

    def url(self, name: str) -> str:
        return f"http://{LOOPBACK}:{getattr(self, name)}"


@dataclass(frozen=True)
class StackConfig:
    """Where the stack runs and what it uses; every field from a ``MODELOPS_STACK_*`` variable."""

    root: Path
    prefix: str = DEFAULT_PREFIX
    pg_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
    redis_url: str = "redis://127.0.0.1:6379/7"
    ports: StackPorts = field(default_factory=StackPorts)
    workers: int = 2
    worker_concurrency: int = 4
    include_dir: Path | None = None  # settings and model specs; None: the project's include/
    # What every client is told S3's endpoint is; None: moto's own port. A test puts a proxy there to
    # make S3 unreachable for a while (moto keeps its objects in memory: it cannot be restarted).
    s3_endpoint_override: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StackConfig:
        prefix = env.get("MODELOPS_STACK_PREFIX", "").strip() or DEFAULT_PREFIX
        if not PREFIX_PATTERN.match(prefix):
            raise ConfigurationError(
                f"MODELOPS_STACK_PREFIX={prefix!r}: use lower-case letters, digits and _ (at most 31), "
                "starting with a letter: it names the stack's databases, roles and buckets"
            )

        def count(name: str, default: int, low: int, high: int) -> int:
            raw = env.get(name, "").strip() or str(default)
            if not raw.isdigit() or not low <= int(raw) <= high:
                raise ConfigurationError(f"{name}={raw!r}: set a whole number from {low} to {high}")
            return int(raw)

        return cls(
            root=Path(env.get("MODELOPS_STACK_DIR", "").strip() or PROJECT_ROOT / ".stack"),
            prefix=prefix,
            pg_url=psycopg2_url(env.get("MODELOPS_STACK_PG_URL", "").strip() or cls.pg_url),
            redis_url=env.get("MODELOPS_STACK_REDIS_URL", "").strip() or cls.redis_url,
            ports=StackPorts.from_env(env),
            workers=count("MODELOPS_STACK_WORKERS", 2, 1, 8),
            worker_concurrency=count("MODELOPS_STACK_WORKER_CONCURRENCY", 4, 1, 32),
            include_dir=Path(env["MODELOPS_STACK_INCLUDE_DIR"])
            if env.get("MODELOPS_STACK_INCLUDE_DIR")
            else None,
        )

    @property
    def bucket_prefix(self) -> str:
        return self.prefix.replace("_", "-")

    @property
    def s3_endpoint(self) -> str:
        return self.s3_endpoint_override or self.ports.url("s3")

    # The stack's folders.
    @property
    def airflow_home(self) -> Path:
        return self.root / "airflow"

    @property
    def modelops_home(self) -> Path:
        return self.root / "modelops"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def mounts(self) -> Path:
        return self.root / "mounts"

    @property
    def secrets_file(self) -> Path:
        return self.root / "secrets.json"

    @property
    def passwords_file(self) -> Path:
        return self.airflow_home / "simple_auth_manager_passwords.json"

    @property
    def gateway_keys_file(self) -> Path:
        return self.modelops_home / "gateway_keys.json"


def psycopg2_url(url: str) -> str:
    """``url`` with the psycopg2 driver compose's URLs use (SQLAlchemy's default for ``postgresql://`` is
    psycopg 3, which is not installed)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed.render_as_string(hide_password=False)


# --- compose: load and interpolate ---------------------------------------------------------------


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """docker-compose.yaml as data, YAML anchors and merges resolved, ``${...}`` not yet interpolated."""
    return yaml.safe_load(path.read_text())


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's variable interpolation: ``${V}``, ``${V:-default}``, ``${V-default}``, ``${V:?error}``,
    ``${V?error}`` and ``$$``. Hand-written because no library here implements compose's rules (the
    defaults may nest a variable, as compose allows)."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.group(1), match.group(2), match.group(3) or ""
        value = variables.get(name)
        unset_or_empty = value is None or (value == "" and operator is not None and operator.startswith(":"))
        if operator in (":-", "-") and (value is None if operator == "-" else unset_or_empty):
            return interpolate(argument, variables)
        if operator in (":?", "?") and (value is None if operator == "?" else unset_or_empty):
            raise ConfigurationError(f"docker-compose.yaml requires {name}: {argument}")
        return value or ""

    return _VARIABLE.sub(substitute, text)


def interpolated(value: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return interpolate(value, variables)
    if isinstance(value, list):
        return [interpolated(item, variables) for item in value]
    if isinstance(value, dict):
        return {key: interpolated(item, variables) for key, item in value.items()}
    return value


def required_variables(compose_text: str) -> list[str]:
    """The variables compose refuses to start without (``${V:?...}``)."""
    return sorted(set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", compose_text)))


def compose_buckets(compose: Mapping[str, Any]) -> dict[str, bool]:
    """Bucket -> object lock, from minio-init's ``mc mb`` commands."""
    script = " ".join(compose["services"]["minio-init"]["command"])
    buckets: dict[str, bool] = {}
    for command in re.findall(r"mc mb ([^&]+)", script):
        words = command.split()
        locked = "--with-lock" in words
        for word in words:
            if word.startswith("store/"):
                buckets[word.removeprefix("store/")] = locked
    return buckets


# --- secrets -------------------------------------------------------------------------------------


def ensure_secrets(config: StackConfig, required: Iterable[str]) -> dict[str, str]:
    """Values for the variables compose requires and for its development-default passwords, generated once
    per stack folder into an owner-only file; a variable set in the environment wins."""
    from cryptography.fernet import Fernet

    wanted = {
        *required,
        "POSTGRES_PASSWORD",
        "MLFLOW_DB_PASSWORD",
        "MODELOPS_DB_PASSWORD",
        "AIRFLOW_FERNET_KEY",
        "AIRFLOW_JWT_SECRET",
        "AIRFLOW_API_SECRET_KEY",
        "MODELOPS_GATEWAY_ADMIN_TOKEN",
    }
    wanted.discard("MODELOPS_GATEWAY_KEYS")  # made from the keys file below, never stored here
    stored: dict[str, str] = {}
    if config.secrets_file.is_file():
        stored = json.loads(config.secrets_file.read_text())
    missing = sorted(name for name in wanted if name not in stored)
    for name in missing:
        if name == "AIRFLOW_FERNET_KEY":
            stored[name] = Fernet.generate_key().decode()
        elif name == "MLFLOW_ADMIN_USERNAME":
            stored[name] = "modelops-admin"
        else:
            stored[name] = secrets.token_urlsafe(32)
    if missing:
        config.secrets_file.parent.mkdir(parents=True, exist_ok=True)
        config.secrets_file.touch(mode=0o600)
        config.secrets_file.chmod(0o600)
        config.secrets_file.write_text(json.dumps(stored, indent=2) + "\n")
    return stored


def compose_variables(config: StackConfig, compose_text: str, base: Mapping[str, str]) -> dict[str, str]:
    """What ``${...}`` in compose expands to on this stack."""
    variables = ensure_secrets(config, required_variables(compose_text))
    variables.update({name: value for name, value in base.items() if name in variables})
    models_dir = (config.include_dir or PROJECT_ROOT / "include") / "models"
    keys = ensure_gateway_keys(config.gateway_keys_file, spec_teams(models_dir))
    variables.update(
        {
            "MODELOPS_GATEWAY_KEYS": gateway_keys_env(keys),
            "MODELOPS_AIRFLOW_PORT": str(config.ports.airflow),
            "MODELOPS_MLFLOW_PORT": str(config.ports.mlflow),
            "MODELOPS_GATEWAY_PORT": str(config.ports.gateway),
            "MODELOPS_DEFAULT_MODEL": base.get("MODELOPS_DEFAULT_MODEL", ""),
            # Compose leaves OpenLineage off unless its transport is set; the stack writes a file of events.
            "OPENLINEAGE_TRANSPORT": json.dumps(
                {
                    "type": "file",
                    "log_file_path": str(config.logs / "openlineage-events.jsonl"),
                    "append": True,
                }
            ),
        }
    )
    return variables


# --- translation to this machine -----------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    """A role and its database, as the stack creates them."""

    role: str
    password: str | None
    name: str


@dataclass
class Translation:
    """Compose's addresses, names and paths -> this machine's, for one stack."""

    config: StackConfig
    buckets: Mapping[str, bool]
    databases: dict[str, Database] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from sqlalchemy.engine import make_url

        self._pg = make_url(self.config.pg_url)
        self.paths.setdefault("/opt/airflow/modelops", str(self.config.modelops_home))

    def name(self, compose_name: str) -> str:
        return f"{self.config.prefix}_{compose_name}"

    def bucket(self, compose_bucket: str) -> str:
        return f"{self.config.bucket_prefix}-{compose_bucket}"

    def pg_url(self, url: str) -> str:
        from sqlalchemy.engine import make_url

        scheme_prefix = "db+" if url.startswith("db+") else ""
        parsed = make_url(url.removeprefix("db+"))
        if parsed.host != "postgres":
            return url
        role, database = self.name(parsed.username or "postgres"), self.name(parsed.database or "postgres")
        self._remember(role, parsed.password, database)
        moved = parsed.set(username=role, database=database, host=self._pg.host, port=self._pg.port)
        return scheme_prefix + moved.render_as_string(hide_password=False)

    def _remember(self, role: str, password: Any, database: str) -> None:
        # A role's password is the one any URL gives it: basic_auth.ini's URL has none (libpq takes it
        # from PGPASSWORD), and must not blank the one mlflow's own URL sets.
        secret = str(password) if password is not None else None
        secret = secret or next((db.password for db in self.databases.values() if db.role == role), None)
        for name, db in list(self.databases.items()):
            if db.role == role and secret and not db.password:
                self.databases[name] = Database(role=role, password=secret, name=name)
        self.databases[database] = Database(role=role, password=secret, name=database)

    def text(self, value: str) -> str:
        """Translate the addresses, buckets and paths in one string."""
        value = _PG_URL.sub(lambda m: self.pg_url(m.group(0)), value)
        hosts = {
            "redis://redis:6379/0": self.config.redis_url,
            "http://minio:9000": self.config.s3_endpoint,
            "http://mlflow:5000": self.config.ports.url("mlflow"),
            "http://gateway:8008": self.config.ports.url("gateway"),
            "http://airflow-api-server:8080": self.config.ports.url("airflow"),
        }
        for compose_address, address in hosts.items():
            value = value.replace(compose_address, address)
        value = _S3_URI.sub(
            lambda m: f"s3://{self.bucket(m.group(1))}" if m.group(1) in self.buckets else m.group(0), value
        )
        for container_path, path in self.paths.items():
            value = value.replace(container_path, path)
        return value

    def connection(self, value: str) -> str:
        """An ``AIRFLOW_CONN_*`` JSON connection, its host, port, database and role translated."""
        conn = json.loads(value)
        service_ports = {"mlflow": "mlflow", "gateway": "gateway", "airflow-api-server": "airflow"}
        if conn.get("conn_type") == "postgres" and conn.get("host") == "postgres":
            role, database = self.name(conn.get("login") or "postgres"), self.name(conn["schema"])
            self._remember(role, conn.get("password"), database)
            conn.update(host=self._pg.host, port=self._pg.port, schema=database, login=role)
        elif conn.get("host") in service_ports:
            conn.update(host=LOOPBACK, port=getattr(self.config.ports, service_ports[conn["host"]]))
        return json.dumps(self._deep(conn))

    def _deep(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {key: self._deep(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self._deep(item) for item in value]
        return value

    def environment(self, env: Mapping[str, Any]) -> dict[str, str]:
        translated = {}
        for name, value in env.items():
            text = "" if value is None else str(value)
            is_json = name.startswith("AIRFLOW_CONN_") and text.lstrip().startswith("{")
            translated[name] = self.connection(text) if is_json else self.text(text)
        return translated

    def command(self, argv: Sequence[str], port: int | None) -> list[str]:
        """A compose command: its executable from this venv, addresses translated, ``--port`` the stack's."""
        bin_dir = Path(sys.executable).parent
        executables = {"airflow", "mlflow", "celery"}
        out: list[str] = []
        for index, arg in enumerate(argv):
            if index == 0 and arg in executables:
                arg = str(bin_dir / arg)
            elif index == 0 and arg == "python":
                arg = sys.executable
            elif arg == "0.0.0.0":
                arg = LOOPBACK
            elif index > 0 and argv[index - 1] == "--port" and port is not None:
                arg = str(port)
            out.append(self.text(arg))
        return out


def mounted_files(service: Mapping[str, Any], translation: Translation) -> None:
    """Copy each file the service bind-mounts into the stack's ``mounts/``, translated, and map its
    container path there."""
    for volume in service.get("volumes", []):
        if not isinstance(volume, str) or not volume.startswith("./"):
            continue
        source, target = volume.split(":")[:2]
        path = PROJECT_ROOT / source
        if not path.is_file():
            continue  # folders (postgres' init scripts) belong to replaced services
        copy = translation.config.mounts / path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        translation.paths[target] = str(copy)
        copy.write_text(translation.text(path.read_text()))


# --- the stack -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OneShot:
    name: str
    argv: list[str]
    env: dict[str, str]


@dataclass(frozen=True)
class Plan:
    """Everything ``make stack`` starts, in order."""

    config: StackConfig
    databases: list[Database]
    buckets: dict[str, bool]
    servers: list[Service]  # moto, mlflow, gateway: before the one-shots that need them
    one_shots: list[OneShot]
    airflow: list[Service]  # api-server, log servers, scheduler, dag-processor, triggerer, workers
    airflow_env: dict[str, str]
    admin_password: str
    approver_passwords: dict[str, str]

    @property
    def services(self) -> list[Service]:
        return [*self.servers, *self.airflow]


def airflow_extras(config: StackConfig) -> dict[str, str]:
    """The values of :data:`STACK_ONLY`."""
    python_path = [str(DEV_ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    extras = {
        "AIRFLOW_HOME": str(config.airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(python_path)),
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "modelops_dev.loopback_hostname",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(config.ports.worker_log),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(config.ports.triggerer_log),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": LOOPBACK,
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(config.ports.scheduler_health),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in AIRFLOW_USERS.items()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(config.passwords_file),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(config.worker_concurrency),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "1",
        "MODELOPS_COLD_START_DAYS": "0",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    assert set(extras) == set(STACK_ONLY), "every stack-only setting says why (STACK_ONLY)"
    return extras


def base_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment without its own Airflow, MLflow or modelops settings."""
    prefixes = ("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_", "MLFLOW_", "MODELOPS_", "AWS_")
    env = {name: value for name, value in base.items() if not name.startswith(prefixes)}
    env.pop("AIRFLOW_CONFIG", None)
    # The image has its venv first on PATH: scripts in compose's commands call `airflow` and `python`.
    path = [str(Path(sys.executable).parent), *[p for p in env.get("PATH", "").split(os.pathsep) if p]]
    env.update({"PYTHONUNBUFFERED": "1", "no_proxy": "127.0.0.1,localhost", "PATH": os.pathsep.join(path)})
    return env


def plan(
    config: StackConfig, base: Mapping[str, str] | None = None, compose_file: Path = COMPOSE_FILE
) -> Plan:
    """Read compose and translate it into this stack's processes (creates the stack's folders and secrets)."""
    base = dict(os.environ if base is None else base)
    for folder in (config.airflow_home, config.modelops_home, config.logs, config.run_dir):
        folder.mkdir(parents=True, exist_ok=True)
    text = compose_file.read_text()
    compose = load_compose(compose_file)
    unknown = set(compose["services"]) - set(REPLACED) - set(ONE_SHOTS) - set(LONG_RUNNING)
    if unknown:
        raise ConfigurationError(
            f"docker-compose.yaml has services the process stack does not know: {sorted(unknown)}; "
            "add each to REPLACED, ONE_SHOTS or LONG_RUNNING in devstack/modelops_dev/prodstack.py"
        )
    variables = compose_variables(config, text, base)
    compose = interpolated(compose, variables)
    translation = Translation(config, compose_buckets(compose))
    services = compose["services"]
    for name in (*ONE_SHOTS, *LONG_RUNNING):
        mounted_files(services[name], translation)
    clean = base_environment(base)
    if config.include_dir is not None:
        clean["MODELOPS_INCLUDE_DIR"] = str(config.include_dir)
    clean["AIRFLOW_HOME"] = str(config.airflow_home)  # the gateway and MLflow import Airflow's settings too
    extras = airflow_extras(config)
    ports = {
        "mlflow": config.ports.mlflow,
        "gateway": config.ports.gateway,
        "airflow-api-server": config.ports.airflow,
    }

    def env_of(name: str) -> dict[str, str]:
        env = {**clean, **translation.environment(services[name].get("environment") or {})}
        if name.startswith("airflow-"):
            env.update(extras)
        return env

    def argv_of(name: str) -> list[str]:
        # The image's entrypoint is dumb-init (a container's PID 1); a process here needs none.
        command = [str(arg) for arg in services[name]["command"]]
        return [*translation.command(command, ports.get(name)), *COMMAND_FLAGS.get(name, ())]

    logs = config.logs

    def service(name: str, argv: list[str], env: Mapping[str, str], **extra: Any) -> Service:
        return Service(
            name=name,
            argv=argv,
            env=env,
            log_file=logs / f"{name}.log",
            cwd=config.root,
            restart=RESTART,
            **extra,
        )

    moto = service(
        "s3",
        [str(Path(sys.executable).parent / "moto_server"), "-H", LOOPBACK, "-p", str(config.ports.s3)],
        clean,
        health_url=f"{config.ports.url('s3')}/moto-api/",
        port=config.ports.s3,
        port_env=PORT_VARIABLES["s3"][0],
        any_http_answer_is_up=True,
    )
    servers = [
        moto,
        service(
            "mlflow",
            argv_of("mlflow"),
            env_of("mlflow"),
            health_url=f"{config.ports.url('mlflow')}/health",
            port=config.ports.mlflow,
            port_env=PORT_VARIABLES["mlflow"][0],
            url=config.ports.url("mlflow"),
        ),
    ]
    gateway = service(
        "gateway",
        argv_of("gateway"),
        env_of("gateway"),
        health_url=f"{config.ports.url('gateway')}/version",
        port=config.ports.gateway,
        port_env=PORT_VARIABLES["gateway"][0],
        url=f"{config.ports.url('gateway')}/invocations",
    )
    one_shots = [OneShot(name, argv_of(name), env_of(name)) for name in ONE_SHOTS]
    airflow_env = env_of("airflow-scheduler")

    def log_server(name: str, port: int) -> Service:
        argv = [sys.executable, "-m", "uvicorn", "--factory", LOG_SERVER_APP, "--host", LOOPBACK]
        return service(
            name,
            [*argv, "--port", str(port), "--workers", "1", "--no-access-log"],
            airflow_env,
            health_url=f"http://{LOOPBACK}:{port}/",
            port=port,
            any_http_answer_is_up=True,
        )

    workers = [
        service(
            f"airflow-worker-{number}",
            [*argv_of("airflow-worker"), "--celery-hostname", f"{config.prefix}-worker-{number}@%h"],
            env_of("airflow-worker"),
            health_url=None,
        )
        for number in range(1, config.workers + 1)
    ]
    airflow = [
        service(
            "airflow-api-server",
            argv_of("airflow-api-server"),
            env_of("airflow-api-server"),
            health_url=f"{config.ports.url('airflow')}/api/v2/monitor/health",
            port=config.ports.airflow,
            port_env=PORT_VARIABLES["airflow"][0],
            url=config.ports.url("airflow"),
        ),
        log_server("airflow-worker-log-server", config.ports.worker_log),
        log_server("airflow-triggerer-log-server", config.ports.triggerer_log),
        service(
            "airflow-scheduler",
            argv_of("airflow-scheduler"),
            env_of("airflow-scheduler"),
            health_url=f"http://{LOOPBACK}:{config.ports.scheduler_health}/health",
        ),
        service(
            "airflow-dag-processor",
            argv_of("airflow-dag-processor"),
            env_of("airflow-dag-processor"),
            health_url=None,
        ),
        service(
            "airflow-triggerer", argv_of("airflow-triggerer"), env_of("airflow-triggerer"), health_url=None
        ),
        *workers,
        gateway,
    ]
    passwords = ensure_passwords(config.passwords_file, AIRFLOW_USERS)
    return Plan(
        config=config,
        databases=sorted(translation.databases.values(), key=lambda d: d.name),
        buckets={translation.bucket(b): locked for b, locked in translation.buckets.items()},
        servers=servers,
        one_shots=one_shots,
        airflow=airflow,
        airflow_env=airflow_env,
        admin_password=passwords["admin"],
        approver_passwords={user: secret for user, secret in passwords.items() if user != "admin"},
    )


# --- PostgreSQL, Redis and S3 --------------------------------------------------------------------


def _admin_engine(config: StackConfig) -> Any:
    import sqlalchemy as sa

    return sa.create_engine(config.pg_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


def check_postgres(url: str, what: str) -> None:
    """Connect once. A refused log-in is modelops.db's one ConfigurationError naming the store, its URL
    without the password and the fix; a server that does not answer is one too."""
    import sqlalchemy as sa

    from modelops.db import create_engine, safe_url

    engine = create_engine(url, what=f"PostgreSQL as {what}")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except sa.exc.OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise ConfigurationError(
            f"{what}: cannot connect to PostgreSQL at {safe_url(url)}: {reason}; start the server or fix the "
            "host and port of MODELOPS_STACK_PG_URL"
        ) from None
    finally:
        engine.dispose()


@contextmanager
def redis_client(url: str) -> Iterator[Any]:
    """A client of the stack's Redis database; a server that does not answer is a ConfigurationError."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        yield client
    except redis.RedisError as exc:
        raise ConfigurationError(
            f"cannot reach Redis at {url} ({exc}); start it or set MODELOPS_STACK_REDIS_URL"
        ) from None
    finally:
        client.close()


def check_redis(url: str) -> None:
    with redis_client(url) as client:
        client.ping()


def flush_redis(url: str) -> None:
    with redis_client(url) as client:
        client.flushdb()


def create_databases(config: StackConfig, databases: Iterable[Database]) -> None:
    """Each role (its password set) and its own database, as docker/postgres/init/ does for compose."""
    from psycopg2 import sql

    engine = _admin_engine(config)
    try:
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            with raw.cursor() as cursor:
                for db in databases:
                    cursor.execute("select 1 from pg_roles where rolname = %s", (db.role,))
                    verb = "ALTER" if cursor.fetchone() else "CREATE"
                    statement = sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(db.role), sql.Literal(db.password)
                    )
                    cursor.execute(statement)
                    cursor.execute("select 1 from pg_database where datname = %s", (db.name,))
                    if not cursor.fetchone():
                        cursor.execute(
                            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                                sql.Identifier(db.name), sql.Identifier(db.role)
                            )
                        )
                    cursor.execute(
                        sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(sql.Identifier(db.name))
                    )
    finally:
        engine.dispose()


def drop_databases(config: StackConfig) -> list[str]:
    """Drop every database and role of the stack's prefix; returns the databases dropped."""
    from psycopg2 import sql

    pattern = config.prefix.replace("_", r"\_") + r"\_%"
    engine = _admin_engine(config)
    dropped: list[str] = []
    try:
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            with raw.cursor() as cursor:
                cursor.execute("select datname from pg_database where datname like %s", (pattern,))
                for (name,) in cursor.fetchall():
                    cursor.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
                    dropped.append(name)
                cursor.execute("select rolname from pg_roles where rolname like %s", (pattern,))
                for (role,) in cursor.fetchall():
                    cursor.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    finally:
        engine.dispose()
    return dropped


def s3_client(config: StackConfig) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=config.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="modelops",
        aws_secret_access_key="modelops",
    )


def create_buckets(config: StackConfig, buckets: Mapping[str, bool]) -> None:
    client = s3_client(config)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket, locked in buckets.items():
        if bucket not in existing:
            client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=locked)


# --- up / down / status --------------------------------------------------------------------------

HEALTH_TIMEOUT_SECONDS = 240.0


def run_one_shot(shot: OneShot, config: StackConfig) -> None:
    from modelops_dev import processes

    processes.run_to_log(shot.argv, shot.env, config.logs / f"{shot.name}.log", shot.name)


def up(
    config: StackConfig, say: Callable[[str], None] = print, base: Mapping[str, str] | None = None
) -> Plan:
    """Start the stack; returns its plan. Checks the servers it needs before anything starts."""
    from modelops_dev import processes

    started = time.monotonic()
    still = processes.running_services(config.run_dir)
    if still:
        raise ConfigurationError(
            f"the stack in {config.root} still runs ({', '.join(still)}); run `make stack-down`"
        )
    check_postgres(config.pg_url, "the stack's administrator (MODELOPS_STACK_PG_URL)")
    check_redis(config.redis_url)
    the_plan = plan(config, base)
    for service in the_plan.services:
        processes.check_port(service)
    create_databases(config, the_plan.databases)
    # The roles exist now: a refused log-in from here is a wrong password in compose's URLs, said once.
    for db in the_plan.databases:
        from sqlalchemy.engine import make_url

        url = make_url(config.pg_url).set(username=db.role, password=db.password, database=db.name)
        check_postgres(url.render_as_string(hide_password=False), f"role {db.role}")
    flush_redis(config.redis_url)
    say(f"PostgreSQL: databases {', '.join(db.name for db in the_plan.databases)}; Redis {config.redis_url}")
    processes.start_all(the_plan.servers[:1], config.run_dir, say, HEALTH_TIMEOUT_SECONDS)
    create_buckets(config, the_plan.buckets)
    say(f"S3 (moto) at {config.s3_endpoint}: buckets {', '.join(the_plan.buckets)}")
    processes.start_all(the_plan.servers[1:], config.run_dir, say, HEALTH_TIMEOUT_SECONDS)
    for shot in the_plan.one_shots:
        t0 = time.monotonic()
        run_one_shot(shot, config)
        say(f"{shot.name} done ({time.monotonic() - t0:.1f} s)")
    processes.start_all(the_plan.airflow, config.run_dir, say, HEALTH_TIMEOUT_SECONDS)
    say(
        f"stack up in {time.monotonic() - started:.0f} s: Airflow {config.ports.url('airflow')} (admin / "
        f"{the_plan.admin_password}), MLflow {config.ports.url('mlflow')}, gateway {config.ports.url('gateway')}"
    )
    return the_plan


def service_names(config: StackConfig) -> list[str]:
    """Every service name the stack may run, in start order."""
    names = [
        "s3",
        "mlflow",
        "airflow-api-server",
        "airflow-worker-log-server",
        "airflow-triggerer-log-server",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
    ]
    names += [f"airflow-worker-{n}" for n in range(1, config.workers + 1)]
    return [*names, "gateway"]


def down(config: StackConfig, say: Callable[[str], None] = print, *, drop: bool = True) -> None:
    """Stop every process of the stack; with ``drop``, drop its databases and roles, flush its Redis
    database and remove its folder but ``logs/`` (the buckets lived in moto's memory)."""
    from modelops_dev import processes

    run_dir = config.run_dir
    running = sorted(p.stem for p in run_dir.glob("*.pid")) if run_dir.is_dir() else []
    order = [n for n in reversed(service_names(config)) if n in running]
    order += [n for n in running if n not in order]
    for name in order:
        outcome = processes.stop(name, run_dir)
        if outcome in ("stopped", "killed"):
            say(f"stopped {name}" + (" (had to SIGKILL)" if outcome == "killed" else ""))
    if not drop:
        return
    dropped = drop_databases(config)
    say(f"dropped databases {', '.join(dropped) or '(none)'}")
    flush_redis(config.redis_url)
    if config.root.is_dir():
        for child in config.root.iterdir():
            if child.name != "logs":
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def status(config: StackConfig) -> int:
    from modelops_dev import processes, supervision

    states = {state.name: state for state in processes.status(config.run_dir)}
    if not any(state.running for state in states.values()):
        print("the stack is not running (start it with `make stack`)")
        return 0
    for line in supervision.status_lines(config.run_dir, service_names(config)):
        print(line)
    if config.passwords_file.is_file():
        passwords = json.loads(config.passwords_file.read_text())
        for user in AIRFLOW_USERS:
            if user in passwords:
                print(f"  Airflow login: {user} / {passwords[user]}")
    return 0


CLIENT_PREFIXES = ("MODELOPS_", "AIRFLOW_CONN_", "MLFLOW_TRACKING_", "AIRFLOW_HOME")


def client_env(the_plan: Plan) -> dict[str, str]:
    """What a process driving the stack from outside needs: the platform's settings and connections (to
    drop dataset files into the bucket), the audit and prediction databases, the callers' keys file."""
    gateway = next(s for s in the_plan.services if s.name == "gateway")
    env = {k: v for k, v in the_plan.airflow_env.items() if k.startswith(CLIENT_PREFIXES)}
    env.update(
        {k: v for k, v in gateway.env.items() if k.startswith(("MODELOPS_AUDIT", "MODELOPS_PREDICTIONS"))}
    )
    env["MODELOPS_GATEWAY_CLIENT_KEYS_FILE"] = str(the_plan.config.gateway_keys_file)
    return env


def mlflow_auth(the_plan: Plan) -> tuple[str, str]:
    env = the_plan.airflow_env
    return env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]


def lifecycle(the_plan: Plan, models: Sequence[str], out: Callable[[str], None] = print) -> Any:
    """Run ``models`` through the six stages on the running stack, as ``make demo`` does on its own:
    datasets uploaded to the incoming bucket, the gate answered by its approver through Airflow's API,
    traffic through the gateway, monitoring and a dry-run retirement. Returns the driver's report."""
    from modelops_dev.airflow_api import AirflowApi, wait_for_dags
    from modelops_dev.driver import DAG_IDS, drive
    from modelops_dev.mlflow_api import MlflowApi

    os.environ.update(client_env(the_plan))
    from modelops.settings import load_catalog

    catalog = load_catalog()
    config = the_plan.config
    api = AirflowApi(config.ports.url("airflow"), "admin", the_plan.admin_password)
    wait_for_dags(api, DAG_IDS)
    for dag_id in DAG_IDS:
        api.unpause(dag_id)
    return drive(
        api,
        MlflowApi(config.ports.url("mlflow"), auth=mlflow_auth(the_plan)),
        config.ports.url("gateway"),
        catalog,
        models=models,
        out=out,
        approver_passwords=the_plan.approver_passwords,
        incident_model=None,
        canary_rollback_model=None,
        outbox=config.modelops_home / "outbox" / "alerts.jsonl",
        staging=config.root / "staging",
    )


def main(argv: Sequence[str]) -> int:
    command = argv[0] if argv else ""
    if command not in ("up", "down", "status", "lifecycle"):
        print("usage: python -m modelops_dev stack up|down|status|lifecycle [MODEL ...]", file=sys.stderr)
        return 2
    try:
        config = StackConfig.from_env(os.environ)
        if command == "up":
            try:
                up(config)
            except ConfigurationError:
                down(config, print, drop=False)
                raise
            return 0
        if command == "down":
            down(config)
            return 0
        if command == "lifecycle":
            from modelops_dev.driver import DEMO_MODELS

            lifecycle(plan(config), argv[1:] or DEMO_MODELS[:1])
            return 0
        return status(config)
    except ConfigurationError as exc:
        print(f"\nmake stack: {exc}", file=sys.stderr)
        return 1
