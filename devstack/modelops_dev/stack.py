"""What the local stack is: its ports, the ``.demo/`` folder, the environment and the eight services.

Every port the stack binds comes from a variable, and every server binds 127.0.0.1 only, so two
checkouts can run side by side with different ``MODELOPS_*_PORT`` values. That includes Airflow's log
servers: Airflow's own (started inside the scheduler and the triggerer) always listens on every
interface, so the demo starts both with ``--skip-serve-logs`` and runs the same log-server app itself,
on loopback, as two more services.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from modelops.errors import ConfigurationError
from modelops.settings import PROJECT_ROOT
from modelops_dev import LOOPBACK
from modelops_dev.processes import RestartPolicy, Service

ADMIN_USER = "admin"
APPROVER_USERS = ("risk_officer",)
"""Airflow users who answer the compliance gate's approval requests: the approvers the demo models'
policies name (``strict``: ``risk_officer``). Role ``user``: enough to answer, not to administer."""
AIRFLOW_USERS = {ADMIN_USER: "admin", **dict.fromkeys(APPROVER_USERS, "user")}
"""SimpleAuthManager's users of the demo, user -> role; each gets a generated password."""
DEMO_AUDIT_KEY_ID = "demo-k1"
DEV_ROOT = Path(__file__).resolve().parents[1]
"""The folder that holds ``modelops_dev`` (``devstack/``): on PYTHONPATH for every process of the stack."""

# Airflow's log server as an ASGI app factory (what `airflow scheduler` and `airflow triggerer` run in a
# subprocess, there bound to every interface).
LOG_SERVER_APP = "airflow.utils.serve_logs.log_server:create_app"

RESTART = RestartPolicy()
"""Every service of the stack is supervised: restarted after 1, 2, 4 ... 30 s when it exits unasked, given
up (``make status``: FAILED) after 5 restarts within a minute (modelops_dev.supervision)."""

# Started in this order, stopped in reverse.
SERVICE_NAMES = (
    "mlflow",
    "airflow-api-server",
    "airflow-worker-log-server",
    "airflow-triggerer-log-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "gateway",
)


# --- ports ---------------------------------------------------------------------------------------

PORT_VARIABLES: dict[str, tuple[str, int]] = {
    "airflow": ("MODELOPS_AIRFLOW_PORT", 8080),
    "mlflow": ("MODELOPS_MLFLOW_PORT", 5000),
    "gateway": ("MODELOPS_GATEWAY_PORT", 8008),
    # Airflow's defaults for [logging] worker_log_server_port and trigger_log_server_port.
    "worker_log": ("MODELOPS_WORKER_LOG_PORT", 8793),
    "triggerer_log": ("MODELOPS_TRIGGERER_LOG_PORT", 8794),
}
"""Ports field -> (the variable that sets it, its default)."""


def ports_from_env(variables: Mapping[str, tuple[str, int]], env: Mapping[str, str]) -> dict[str, int]:
    """field -> port, each from its variable in ``env`` (else its default); a value that is no TCP port,
    or two fields on one port, is a ``ConfigurationError`` naming the variables. ``make demo`` and
    ``make stack`` read their ports this way."""
    ports: dict[str, int] = {}
    seen: dict[int, str] = {}
    for field_name, (name, default) in variables.items():
        raw = env.get(name, "").strip()
        if raw and (not raw.isdigit() or not 0 < int(raw) < 65536):
            raise ConfigurationError(f"{name}={raw!r} is not a TCP port; set it to a number like {default}")
        number = int(raw) if raw else default
        if number in seen:
            raise ConfigurationError(
                f"{seen[number]} and {name} are both {number}; every service needs a port of its own"
            )
        seen[number] = name
        ports[field_name] = number
    return ports


@dataclass(frozen=True)
class Ports:
    """Every TCP port the stack binds (all on 127.0.0.1)."""

    airflow: int = 8080
    mlflow: int = 5000
    gateway: int = 8008
    worker_log: int = 8793
    triggerer_log: int = 8794

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Ports:
        return cls(**ports_from_env(PORT_VARIABLES, env))

    def by_variable(self) -> dict[str, int]:
        """``{"MODELOPS_AIRFLOW_PORT": 8080, ...}``: each port under the variable that sets it."""
        return {PORT_VARIABLES[f.name][0]: getattr(self, f.name) for f in fields(self)}

    @property
    def airflow_url(self) -> str:
        return f"http://{LOOPBACK}:{self.airflow}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{LOOPBACK}:{self.mlflow}"

    @property
    def gateway_url(self) -> str:
        return f"http://{LOOPBACK}:{self.gateway}"


# --- the .demo/ folder ---------------------------------------------------------------------------


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
    def incoming(self) -> Path:
        """``MODELOPS_INCOMING_ROOT``: each dataset's incoming folder is ``<this>/<dataset>``."""
        return self.modelops_home / "incoming"

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
    def gateway_token_file(self) -> Path:
        return self.modelops_home / "gateway_admin_token"

    @property
    def gateway_keys_file(self) -> Path:
        """The demo callers' API keys (owner-only): what the traffic simulator and the driver send."""
        return self.modelops_home / "gateway_keys.json"

    @property
    def audit_key_file(self) -> Path:
        return self.modelops_home / "audit_key"

    @property
    def outbox_file(self) -> Path:
        """Where the monitoring alerts go (``modelops.notifications.OUTBOX_FILE`` under ``MODELOPS_HOME``)."""
        return self.modelops_home / "outbox" / "alerts.jsonl"

    def create(self) -> None:
        for folder in (self.airflow_home, self.incoming, self.mlflow_dir / "artifacts", self.logs, self.run):
            folder.mkdir(parents=True, exist_ok=True)


def predictions_url(layout: Layout) -> str:
    return f"sqlite:///{layout.modelops_home / 'predictions.db'}"


def audit_url(layout: Layout) -> str:
    return f"sqlite:///{layout.modelops_home / 'audit.db'}"


def ensure_passwords(passwords_file: Path, users: Iterable[str] = AIRFLOW_USERS) -> dict[str, str]:
    """The passwords of Airflow's SimpleAuthManager users ``users``, each created once per ``.demo/``.

    The auth manager only generates passwords for users missing from this file, so writing it first
    gives passwords the demo can log in with and the summary can print. Other users' entries are kept.
    """
    users = list(users)
    passwords: dict[str, str] = {}
    if passwords_file.is_file() and passwords_file.read_text().strip():
        passwords = json.loads(passwords_file.read_text())
    missing = [user for user in users if not passwords.get(user)]
    if missing:
        passwords.update({user: secrets.token_urlsafe(12) for user in missing})
        passwords_file.parent.mkdir(parents=True, exist_ok=True)
        passwords_file.touch(mode=0o600)
        # A file that already existed keeps its mode on write; it holds passwords, so narrow it first.
        passwords_file.chmod(0o600)
        passwords_file.write_text(json.dumps(passwords) + "\n")
    return {user: passwords[user] for user in users}


def known_passwords(passwords_file: Path, users: Iterable[str] = AIRFLOW_USERS) -> dict[str, str]:
    """The passwords of ``users`` the file holds (none created): what ``make status`` prints."""
    text = passwords_file.read_text().strip() if passwords_file.is_file() else ""
    passwords = json.loads(text) if text else {}
    return {user: passwords[user] for user in users if passwords.get(user)}


def ensure_admin_password(passwords_file: Path) -> str:
    """The ``admin`` password of Airflow's SimpleAuthManager, created once per ``.demo/``."""
    return ensure_passwords(passwords_file, [ADMIN_USER])[ADMIN_USER]


def ensure_gateway_token(token_file: Path) -> str:
    """The scoring gateway's admin token, created once per ``.demo/`` (owner-only file).

    Even on loopback, staging and promoting a model version takes the token: the deployment DAG sends
    it as the ``modelops_gateway`` connection's password.
    """
    return _ensure_secret(token_file, 24)


CLICK_MODEL = "ctr_recommender"
"""The model the traffic simulator (modelops.data.traffic) speaks for: its team's keys are named after the
simulator's default callers, so ``python -m modelops.data.traffic`` works with the demo's keys file."""


def spec_teams(models_dir: Path = PROJECT_ROOT / "include" / "models") -> dict[str, str]:
    """model name -> team, read from the model specs' YAML (no catalog load: stack_env runs before the
    environment the catalog expands exists)."""
    import yaml

    teams = {}
    for path in sorted(models_dir.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text()) or {}
        if isinstance(spec, dict) and spec.get("name") and spec.get("team"):
            teams[str(spec["name"])] = str(spec["team"])
    return teams


def demo_key_ids(team: str, click_team: str | None) -> list[str]:
    """The demo's three callers of ``team``: the simulator's callers for the click model's team, the same
    names prefixed by the team for every other team (key ids are unique across teams)."""
    from modelops.data.traffic import DEFAULT_CALLERS

    return list(DEFAULT_CALLERS) if team == click_team else [f"{team}-{caller}" for caller in DEFAULT_CALLERS]


def ensure_gateway_keys(keys_file: Path, teams: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """API keys for three callers of every team the model specs name, created once per ``.demo/`` in an
    owner-only file ``{key_id: {"team": ..., "key": ...}}``; a team new since then gets its keys added."""
    from modelops.serving.access import new_key

    keys: dict[str, dict[str, str]] = {}
    if keys_file.is_file() and keys_file.read_text().strip():
        keys = json.loads(keys_file.read_text())
    click_team = teams.get(CLICK_MODEL)
    wanted = {
        key_id: team for team in sorted(set(teams.values())) for key_id in demo_key_ids(team, click_team)
    }
    missing = {key_id: team for key_id, team in wanted.items() if key_id not in keys}
    if missing:
        keys.update({key_id: {"team": team, "key": new_key()} for key_id, team in missing.items()})
        keys_file.parent.mkdir(parents=True, exist_ok=True)
        keys_file.touch(mode=0o600)
        keys_file.chmod(0o600)  # an older file keeps its mode on write: narrow it before the keys go in
        keys_file.write_text(json.dumps(keys, indent=2) + "\n")
    return keys


def gateway_keys_env(keys: Mapping[str, Mapping[str, str]]) -> str:
    """``MODELOPS_GATEWAY_KEYS`` for ``keys``: each key id's team and digest, never a key."""
    from modelops.serving.access import key_entry

    return json.dumps({key_id: key_entry(entry["team"], entry["key"]) for key_id, entry in keys.items()})


def ensure_audit_key(key_file: Path) -> str:
    """The audit log's signing key (HMAC), created once per ``.demo/`` (owner-only file). Losing it makes
    the demo's audit log unverifiable, exactly as in production."""
    return _ensure_secret(key_file, 32)


def _ensure_secret(secret_file: Path, nbytes: int) -> str:
    if secret_file.is_file() and secret_file.read_text().strip():
        return secret_file.read_text().strip()
    secret_file.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(nbytes)
    # Created owner-only before the secret is written, so it is never readable by others.
    secret_file.touch(mode=0o600)
    secret_file.chmod(0o600)
    secret_file.write_text(secret + "\n")
    return secret


# --- environment and services --------------------------------------------------------------------


def stack_env(layout: Layout, ports: Ports, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of every process of the stack (Airflow's settings as ``AIRFLOW__`` variables)."""
    env = dict(base)
    audit_key = ensure_audit_key(layout.audit_key_file)
    # A developer's own Airflow settings must not leak into the demo's.
    for name in [n for n in env if n.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_"))]:
        del env[name]
    env.pop("AIRFLOW_CONFIG", None)
    python_path = [str(DEV_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
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
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(
                f"{user}:{role}" for user, role in AIRFLOW_USERS.items()
            ),
            # Only a task's assigned users may answer its approval form (all-admins mode lets anyone).
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(layout.passwords_file),
            # Task and triggerer log URLs are http://<hostname>:<port>/log/...: the loopback address the
            # log servers listen on, whatever the machine's name resolves to.
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "modelops_dev.loopback_hostname",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(ports.worker_log),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(ports.triggerer_log),
            # New DAG files listed every 5 s, each file re-parsed at most every 10 s, one parser (2 cores).
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            # The scheduler looks for queued Asset events and new runs every loop; keep the loop short.
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "1",
            # OpenLineage (apache-airflow-providers-openlineage): every task run's START/COMPLETE event, with
            # the Assets it reads and writes, by configuration alone; the demo writes them to a file, a
            # production stack points the transport at its lineage backend (Marquez, DataHub...).
            "AIRFLOW__OPENLINEAGE__NAMESPACE": "modelops-demo",
            "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
                {
                    "type": "file",
                    "log_file_path": str(layout.logs / "openlineage-events.jsonl"),
                    "append": True,
                }
            ),
            # Its health-check server would bind 0.0.0.0:8974; the demo has no use for it.
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW__API__HOST": LOOPBACK,
            "AIRFLOW__API__PORT": str(ports.airflow),
            "AIRFLOW__API__BASE_URL": ports.airflow_url,
            "AIRFLOW__API__WORKERS": "1",
            "MODELOPS_HOME": str(layout.modelops_home),
            "MODELOPS_INCOMING_ROOT": str(layout.incoming),
            # A version's first cold_start_days (monitoring policy, default 7) only record their alerts. The
            # demo's versions are minutes old, and its incident must send its critical alert to the outbox:
            # no cold start here, whatever the developer's shell says.
            "MODELOPS_COLD_START_DAYS": "0",
            **{name: str(number) for name, number in ports.by_variable().items()},
            "MODELOPS_GATEWAY_ADMIN_TOKEN": ensure_gateway_token(layout.gateway_token_file),
            # The gateway gets the digests; the demo's own clients (driver, traffic simulator) the keys file.
            "MODELOPS_GATEWAY_KEYS": gateway_keys_env(
                ensure_gateway_keys(layout.gateway_keys_file, spec_teams())
            ),
            "MODELOPS_GATEWAY_CLIENT_KEYS_FILE": str(layout.gateway_keys_file),
            # Airflow reads it through the connection modelops_audit_key (airflow_settings.yaml), processes
            # outside Airflow (the gateway, the CLI, the driver) as a keyring.
            "MODELOPS_AUDIT_KEY": audit_key,
            "MODELOPS_AUDIT_KEYS": json.dumps(
                {"current": DEMO_AUDIT_KEY_ID, "keys": {DEMO_AUDIT_KEY_ID: audit_key}}
            ),
            "MLFLOW_TRACKING_URI": ports.mlflow_url,
            "PYTHONPATH": os.pathsep.join(dict.fromkeys(python_path)),
            "GIT_PYTHON_REFRESH": "quiet",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "PYTHONUNBUFFERED": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    return env


def services(
    layout: Layout, ports: Ports, env: Mapping[str, str], conn_env: Mapping[str, str]
) -> list[Service]:
    """The eight processes of the stack, in start order. ``conn_env``: connections for non-Airflow ones."""
    bin_dir = Path(sys.executable).parent
    airflow = str(bin_dir / "airflow")
    log = layout.logs
    variable = {field: name for field, (name, _) in PORT_VARIABLES.items()}

    def airflow_component(name: str, *args: str, **extra: Any) -> Service:
        settings: dict[str, Any] = {"health_url": None, "cwd": layout.root, "restart": RESTART, **extra}
        return Service(
            name=f"airflow-{name}",
            argv=[airflow, *args],
            env=env,
            log_file=log / f"airflow-{name}.log",
            **settings,
        )

    def log_server(name: str, port: int, port_env: str) -> Service:
        return Service(
            name=f"airflow-{name}",
            argv=[
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                LOG_SERVER_APP,
                "--host",
                LOOPBACK,
                "--port",
                str(port),
                "--workers",
                "1",
                "--no-access-log",
            ],
            env=env,
            health_url=f"http://{LOOPBACK}:{port}/",
            log_file=log / f"airflow-{name}.log",
            port=port,
            port_env=port_env,
            any_http_answer_is_up=True,  # it serves /log/<path> only: "/" answers 404 once it listens
            cwd=layout.root,
            restart=RESTART,
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
                LOOPBACK,
                "--port",
                str(ports.mlflow),
                "--workers",
                "1",
            ],
            env=other_env,
            health_url=f"{ports.mlflow_url}/health",
            log_file=log / "mlflow.log",
            port=ports.mlflow,
            port_env=variable["mlflow"],
            cwd=layout.mlflow_dir,
            url=ports.mlflow_url,
            restart=RESTART,
        ),
        airflow_component(
            "api-server",
            "api-server",
            "--host",
            LOOPBACK,
            "--port",
            str(ports.airflow),
            "--workers",
            "1",
            health_url=f"{ports.airflow_url}/api/v2/monitor/health",
            port=ports.airflow,
            port_env=variable["airflow"],
            url=ports.airflow_url,
        ),
        log_server("worker-log-server", ports.worker_log, variable["worker_log"]),
        log_server("triggerer-log-server", ports.triggerer_log, variable["triggerer_log"]),
        # --skip-serve-logs: their own log servers would listen on every interface (see above).
        airflow_component("scheduler", "scheduler", "--skip-serve-logs"),
        airflow_component("dag-processor", "dag-processor"),
        airflow_component("triggerer", "triggerer", "--skip-serve-logs"),
        Service(
            name="gateway",
            argv=[
                sys.executable,
                "-m",
                "modelops.serving",
                "--host",
                LOOPBACK,
                "--port",
                str(ports.gateway),
            ],
            env={
                **other_env,
                "MODELOPS_PREDICTIONS_URL": predictions_url(layout),
                "MODELOPS_AUDIT_URL": audit_url(layout),
            },
            health_url=f"{ports.gateway_url}/health",
            log_file=log / "gateway.log",
            port=ports.gateway,
            port_env=variable["gateway"],
            any_http_answer_is_up=True,  # 503 until a champion is deployed
            cwd=layout.root,
            url=f"{ports.gateway_url}/invocations",
            restart=RESTART,
        ),
    ]
