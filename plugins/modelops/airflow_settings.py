"""``airflow_settings.yaml``: the local stack's connections, pools and variables (Astro CLI format).

Used by the production image (docker-compose's airflow-init loads pools and variables with it)
and by ``make demo``.

The file is validated by typed models (unknown fields are errors naming the file and the field), then
converted to Airflow's own import formats and loaded with Airflow's CLI import commands, so the metadata
DB ends up exactly as if an operator had typed the imports. :func:`as_env` gives the same connections
as ``AIRFLOW_CONN_<ID>`` variables for processes that are not Airflow (the scoring gateway).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from modelops.errors import ConfigurationError, SettingsError
from modelops.settings import PROJECT_ROOT, StrictModel, load_model_file

DEFAULT_SETTINGS_FILE = PROJECT_ROOT / "airflow_settings.yaml"

# One Airflow CLI import can take a while on a 2-core machine (it imports providers).
_CLI_TIMEOUT_SECONDS = 180


class ConnectionSpec(StrictModel):
    conn_id: str = Field(min_length=1, max_length=200)
    conn_type: str = Field(min_length=1)
    conn_host: str | None = None
    conn_schema: str | None = None
    conn_login: str | None = None
    conn_password: str | None = None
    conn_port: int | None = Field(default=None, ge=1, le=65535)
    conn_extra: dict[str, Any] = Field(default_factory=dict)
    conn_description: str | None = None

    def as_airflow_fields(self) -> dict[str, Any]:
        """The connection in Airflow's JSON form (the keys of ``Connection.__init__``), unset fields left out."""
        fields: dict[str, Any] = {
            "conn_type": self.conn_type,
            "description": self.conn_description,
            "host": self.conn_host,
            "schema": self.conn_schema,
            "login": self.conn_login,
            "password": self.conn_password,
            "port": self.conn_port,
        }
        if self.conn_extra:
            fields["extra"] = json.dumps(self.conn_extra, sort_keys=True)
        return {key: value for key, value in fields.items() if value is not None}


class PoolSpec(StrictModel):
    pool_name: str = Field(min_length=1)
    pool_slot: int = Field(ge=0)
    pool_description: str = ""
    include_deferred: bool = False


class VariableSpec(StrictModel):
    variable_name: str = Field(min_length=1)
    variable_value: str


class AirflowObjects(StrictModel):
    connections: list[ConnectionSpec] = Field(default_factory=list)
    pools: list[PoolSpec] = Field(default_factory=list)
    variables: list[VariableSpec] = Field(default_factory=list)


class AirflowSettings(StrictModel):
    """The whole file: everything sits under the top-level ``airflow`` key, as in the Astro CLI."""

    airflow: AirflowObjects

    @property
    def connections(self) -> list[ConnectionSpec]:
        return self.airflow.connections

    @property
    def pools(self) -> list[PoolSpec]:
        return self.airflow.pools

    @property
    def variables(self) -> list[VariableSpec]:
        return self.airflow.variables


def load_settings_file(path: Path = DEFAULT_SETTINGS_FILE) -> AirflowSettings:
    """Read and validate the file, ``${VAR}`` references expanded; errors name the file and the field."""
    settings = load_model_file(Path(path), AirflowSettings)
    for kind, names in (
        ("conn_id", [c.conn_id for c in settings.connections]),
        ("pool_name", [p.pool_name for p in settings.pools]),
        ("variable_name", [v.variable_name for v in settings.variables]),
    ):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise SettingsError(f"{path}: {kind} {', '.join(duplicates)} defined more than once")
    return settings


def to_import_files(settings: AirflowSettings, out_dir: Path) -> dict[str, Path]:
    """Write Airflow's import files into ``out_dir``; returns ``{"connections"|"pools"|"variables": path}``.

    Only kinds with at least one entry get a file (the CLI rejects nothing, but an empty import is noise).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    payloads: dict[str, dict[str, Any]] = {
        "connections": {c.conn_id: c.as_airflow_fields() for c in settings.connections},
        "pools": {
            p.pool_name: {
                "slots": p.pool_slot,
                "description": p.pool_description,
                "include_deferred": p.include_deferred,
            }
            for p in settings.pools
        },
        "variables": {v.variable_name: v.variable_value for v in settings.variables},
    }
    files: dict[str, Path] = {}
    for kind, payload in payloads.items():
        if not payload:
            continue
        path = out_dir / f"{kind}.json"
        # Connections may hold passwords: readable by the owner only.
        path.touch(mode=0o600, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        files[kind] = path
    return files


def as_env(settings: AirflowSettings) -> dict[str, str]:
    """``AIRFLOW_CONN_<ID>`` variables (JSON values) for every connection, for processes that are not Airflow."""
    return {
        f"AIRFLOW_CONN_{c.conn_id.upper()}": json.dumps(c.as_airflow_fields(), sort_keys=True)
        for c in settings.connections
    }


def airflow_command() -> list[str]:
    """The ``airflow`` CLI of this interpreter's environment (never whatever is first on PATH)."""
    script = Path(sys.executable).with_name("airflow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "airflow"]


def import_commands(files: Mapping[str, Path]) -> list[list[str]]:
    """The Airflow CLI calls that load ``files``, overwriting what is already there."""
    airflow = airflow_command()
    commands: list[list[str]] = []
    if "connections" in files:
        commands.append([*airflow, "connections", "import", str(files["connections"]), "--overwrite"])
    if "variables" in files:
        commands.append(
            [
                *airflow,
                "variables",
                "import",
                str(files["variables"]),
                "--action-on-existing-key",
                "overwrite",
            ]
        )
    if "pools" in files:
        # `pools import` creates or updates each pool by name.
        commands.append([*airflow, "pools", "import", str(files["pools"])])
    return commands


def apply(settings: AirflowSettings, env: Mapping[str, str] | None = None) -> None:
    """Load ``settings`` into the metadata DB of the Airflow that ``env`` (its AIRFLOW_HOME etc.) points at."""
    process_env = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory(prefix="airflow-settings-") as tmp:
        for command in import_commands(to_import_files(settings, Path(tmp))):
            try:
                result = subprocess.run(
                    command,
                    env=process_env,
                    capture_output=True,
                    text=True,
                    timeout=_CLI_TIMEOUT_SECONDS,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise ConfigurationError(
                    f"`{' '.join(command[-4:])}` did not finish in {_CLI_TIMEOUT_SECONDS} s; "
                    "check that the metadata DB is not locked by another process"
                ) from exc
            # `connections import` reports a rejected entry on stdout but still exits 0.
            rejected = [line for line in result.stdout.splitlines() if line.startswith("Could not import")]
            if result.returncode != 0 or rejected:
                output = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
                raise ConfigurationError(
                    f"`airflow {' '.join(command[len(airflow_command()) :])}` failed "
                    f"(exit {result.returncode}); run `airflow db migrate` first if the DB is new. "
                    f"Output:\n{output}"
                )
