from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from modelops import airflow_settings
from modelops.errors import SettingsError

VALID = """\
airflow:
  connections:
    - conn_id: store
      conn_type: http
      conn_host: ${STORE_HOST:-example.org}
      conn_schema: https
      conn_login: user
      conn_password: secret
      conn_port: 8443
      conn_extra: {timeout: 5}
    - conn_id: audit
      conn_type: sqlite
      conn_host: ${MODELOPS_HOME}/audit.db
  pools:
    - pool_name: heavy
      pool_slot: 1
      pool_description: one at a time
  variables:
    - variable_name: greeting
      variable_value: hello
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "airflow_settings.yaml"
    path.write_text(text)
    return path


def test_shipped_file_loads() -> None:
    settings = airflow_settings.load_settings_file()
    by_id = {c.conn_id: c for c in settings.connections}
    assert set(by_id) == {
        "mlflow_default",
        "modelops_audit",
        "modelops_audit_key",
        "modelops_audit_anchor",
        "modelops_predictions",
        "modelops_gateway",
    }
    assert by_id["modelops_audit"].conn_host == f"{os.environ['MODELOPS_HOME']}/audit.db"
    anchor = by_id["modelops_audit_anchor"]
    assert (anchor.conn_type, anchor.conn_extra) == (
        "fs",
        {"path": f"{os.environ['MODELOPS_HOME']}/audit-anchors"},
    )
    assert by_id["mlflow_default"].conn_port == int(os.environ.get("MODELOPS_MLFLOW_PORT", "5000"))
    assert [(p.pool_name, p.pool_slot) for p in settings.pools] == [("modelops_training", 1)]


def test_env_expansion_and_as_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELOPS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STORE_HOST", "store.internal")
    settings = airflow_settings.load_settings_file(_write(tmp_path, VALID))
    env = airflow_settings.as_env(settings)
    assert json.loads(env["AIRFLOW_CONN_STORE"]) == {
        "conn_type": "http",
        "host": "store.internal",
        "schema": "https",
        "login": "user",
        "password": "secret",
        "port": 8443,
        "extra": '{"timeout": 5}',
    }
    assert json.loads(env["AIRFLOW_CONN_AUDIT"]) == {
        "conn_type": "sqlite",
        "host": f"{tmp_path}/home/audit.db",
    }


def test_unknown_field_names_file_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path, VALID.replace("pool_slot: 1", "pool_slots: 1"))
    with pytest.raises(SettingsError) as info:
        airflow_settings.load_settings_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "airflow.pools.0.pool_slots" in message and "unknown field" in message


def test_duplicate_conn_id_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, VALID.replace("conn_id: audit", "conn_id: store"))
    with pytest.raises(SettingsError, match=r"conn_id store defined more than once"):
        airflow_settings.load_settings_file(path)


def test_import_files_shapes(tmp_path: Path) -> None:
    settings = airflow_settings.load_settings_file(_write(tmp_path, VALID))
    files = airflow_settings.to_import_files(settings, tmp_path / "out")
    assert set(files) == {"connections", "pools", "variables"}
    connections = json.loads(files["connections"].read_text())
    assert connections["store"]["host"] == "example.org" and connections["store"]["port"] == 8443
    assert json.loads(files["pools"].read_text()) == {
        "heavy": {"slots": 1, "description": "one at a time", "include_deferred": False}
    }
    assert json.loads(files["variables"].read_text()) == {"greeting": "hello"}
    assert files["connections"].stat().st_mode & 0o077 == 0
    empty = airflow_settings.AirflowSettings.model_validate({"airflow": {}})
    assert airflow_settings.to_import_files(empty, tmp_path / "empty") == {}


def _airflow_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        # Our plugins folder is not needed by the CLI imports and would only slow them down.
        AIRFLOW__CORE__PLUGINS_FOLDER=str(home / "plugins"),
    )
    return env


def test_import_with_the_real_airflow_cli(tmp_path: Path) -> None:
    env = _airflow_env(tmp_path / "airflow")
    airflow = airflow_settings.airflow_command()
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=180)
    settings = airflow_settings.load_settings_file(_write(tmp_path, VALID))
    airflow_settings.apply(settings, env)

    def cli_json(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*airflow, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    # The three read-backs are independent: run them side by side.
    readers = {
        "store": cli_json("connections", "get", "store", "-o", "json"),
        "pools": cli_json("pools", "list", "-o", "json"),
        "greeting": cli_json("variables", "get", "greeting"),
    }
    out = {name: proc.communicate(timeout=120) for name, proc in readers.items()}
    assert all(proc.returncode == 0 for proc in readers.values()), out
    (store,) = json.loads(out["store"][0])
    assert (store["conn_type"], store["host"], store["schema"], store["login"]) == (
        "http",
        "example.org",
        "https",
        "user",
    )
    assert str(store["port"]) == "8443" and {k: str(v) for k, v in store["extra_dejson"].items()} == {
        "timeout": "5"
    }
    pools = {p["pool"]: p for p in json.loads(out["pools"][0])}
    assert str(pools["heavy"]["slots"]) == "1" and pools["heavy"]["description"] == "one at a time"
    assert out["greeting"][0].strip() == "hello"
