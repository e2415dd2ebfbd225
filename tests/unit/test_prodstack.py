"""``make stack`` runs what docker-compose.yaml runs: the same commands, settings and versions.

The process stack (modelops_dev.prodstack) is built from the compose file, translated to this machine.
These tests hold the translation to the compose file: every service accounted for, every command and
environment variable carried over with only addresses, names and paths changed, the stack's own
additions limited to the documented ones, and the servers it uses of the versions compose names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelops_dev import prodstack
from modelops_dev.prodstack import (
    COMMAND_FLAGS,
    LONG_RUNNING,
    ONE_SHOTS,
    REPLACED,
    STACK_ONLY,
    StackConfig,
    Translation,
    interpolate,
)
from tests.conftest import require_service

PROJECT_ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((PROJECT_ROOT / "docker-compose.yaml").read_text())


@pytest.fixture
def config(tmp_path: Path) -> StackConfig:
    return StackConfig(root=tmp_path / "stack", prefix="mst_unit")


@pytest.fixture
def the_plan(config: StackConfig) -> prodstack.Plan:
    return prodstack.plan(config, base={"PATH": "/usr/bin"})


def test_every_compose_service_is_run_or_replaced() -> None:
    accounted = set(REPLACED) | set(ONE_SHOTS) | set(LONG_RUNNING)
    assert set(COMPOSE["services"]) == accounted
    assert not set(REPLACED) & (set(ONE_SHOTS) | set(LONG_RUNNING))


def test_an_unknown_compose_service_stops_the_plan(config: StackConfig, tmp_path: Path) -> None:
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yaml").read_text())
    compose["services"]["airflow-edge"] = {"command": ["airflow", "edge"]}
    changed = tmp_path / "compose.yaml"
    changed.write_text(yaml.safe_dump(compose))
    with pytest.raises(Exception, match=r"services the process stack does not know: \['airflow-edge'\]"):
        prodstack.plan(config, base={}, compose_file=changed)


def _by_name(the_plan: prodstack.Plan) -> dict[str, Any]:
    return {service.name: service for service in the_plan.services}


def _untranslated(argv: list[str]) -> list[str]:
    """A stack command with the venv's paths back to the bare executables compose names."""
    return [Path(arg).name if index == 0 else arg for index, arg in enumerate(argv)]


@pytest.mark.parametrize("name", [n for n in LONG_RUNNING if n != "airflow-worker"] + ["airflow-worker-1"])
def test_commands_are_compose_commands_with_only_addresses_changed(
    the_plan: prodstack.Plan, name: str
) -> None:
    compose_name = "airflow-worker" if name.startswith("airflow-worker") else name
    compose_cmd = [str(arg) for arg in COMPOSE["services"][compose_name]["command"]]
    stack_cmd = _untranslated(list(_by_name(the_plan)[name].argv))
    extra = list(COMMAND_FLAGS.get(compose_name, ()))
    if name.startswith("airflow-worker"):
        extra += ["--celery-hostname", "mst_unit-worker-1@%h"]
    assert stack_cmd[len(stack_cmd) - len(extra) :] == extra
    stack_cmd = stack_cmd[: len(stack_cmd) - len(extra)]
    if stack_cmd[0].startswith("python"):
        stack_cmd[0] = "python"
    assert len(stack_cmd) == len(compose_cmd)
    for compose_arg, stack_arg in zip(compose_cmd, stack_cmd, strict=True):
        if compose_arg == stack_arg:
            continue
        # Only what the translation changes: listen address, port, and host names / databases in URLs.
        assert compose_arg in ("0.0.0.0",) or compose_arg.isdigit() or "://" in compose_arg, (
            compose_arg,
            stack_arg,
        )


def test_environment_is_compose_environment_translated_plus_the_documented_extras(
    the_plan: prodstack.Plan, config: StackConfig
) -> None:
    variables = prodstack.compose_variables(config, (PROJECT_ROOT / "docker-compose.yaml").read_text(), {})
    compose = prodstack.interpolated(prodstack.load_compose(), variables)
    translation = Translation(config, prodstack.compose_buckets(compose))
    for service in ("mlflow", "gateway", *[n for n in LONG_RUNNING if n.startswith("airflow-")]):
        stack_name = "airflow-worker-1" if service == "airflow-worker" else service
        stack_env = _by_name(the_plan)[stack_name].env
        compose_env = compose["services"][service].get("environment") or {}
        for key, value in compose_env.items():
            assert key in stack_env, (service, key)
            if key in STACK_ONLY and service.startswith("airflow-"):
                continue  # overridden on purpose, with the reason in STACK_ONLY
            expected = translation.environment({key: value})[key]
            if key.startswith("AIRFLOW_CONN_"):
                assert json.loads(stack_env[key]) == json.loads(expected), key
            elif "/opt/modelops/mlflow/" in str(value):
                assert stack_env[key].startswith(str(config.mounts)), key
            else:
                assert stack_env[key] == expected, key
        if service.startswith("airflow-"):
            extras = {
                k
                for k in stack_env
                if k not in compose_env and k.startswith(("AIRFLOW__", "MODELOPS_", "AIRFLOW_"))
            }
            assert extras <= set(STACK_ONLY), extras - set(STACK_ONLY)


def test_secrets_never_leak_into_a_command_line(the_plan: prodstack.Plan, config: StackConfig) -> None:
    stored = json.loads(config.secrets_file.read_text())
    assert config.secrets_file.stat().st_mode & 0o077 == 0
    for service in the_plan.services:
        line = " ".join(service.argv)
        for name, secret in stored.items():
            if name.endswith(("PASSWORD", "KEY", "SECRET", "TOKEN")) and name != "MLFLOW_DB_PASSWORD":
                assert secret not in line, (service.name, name)


def test_each_stack_gets_its_own_databases_roles_and_buckets(the_plan: prodstack.Plan) -> None:
    names = {db.name for db in the_plan.databases}
    assert names == {
        "mst_unit_airflow",
        "mst_unit_mlflow",
        "mst_unit_mlflow_auth",
        "mst_unit_modelops_audit",
        "mst_unit_modelops_predictions",
    }
    assert all(db.role.startswith("mst_unit_") and db.password for db in the_plan.databases)
    assert the_plan.buckets == {
        "mst-unit-mlflow-artifacts": False,
        "mst-unit-modelops": False,
        "mst-unit-modelops-audit-anchors": True,  # mc mb --with-lock
    }
    everything = json.dumps([dict(s.env) for s in the_plan.services]) + json.dumps(
        [list(s.argv) for s in the_plan.services]
    )
    assert (
        "@postgres:" not in everything
        and "minio:9000" not in everything
        and "redis://redis" not in everything
    )
    assert not re.search(r"s3://(modelops|mlflow-artifacts)[/\"]", everything)


def test_two_celery_workers_of_their_own_name(the_plan: prodstack.Plan) -> None:
    workers = [s for s in the_plan.airflow if re.fullmatch(r"airflow-worker-\d+", s.name)]
    assert [w.name for w in workers] == ["airflow-worker-1", "airflow-worker-2"]
    assert workers[0].env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert workers[0].env["AIRFLOW__CELERY__BROKER_URL"] == "redis://127.0.0.1:6379/7"


@pytest.mark.parametrize(
    ("text", "variables", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("${A:-d}", {"A": ""}, "d"),
        ("${A-d}", {"A": ""}, ""),
        ("${A:-${B:-c}/x}", {}, "c/x"),
        ("$${HOSTNAME}", {}, "${HOSTNAME}"),
    ],
)
def test_interpolation_follows_compose(text: str, variables: dict[str, str], expected: str) -> None:
    assert interpolate(text, variables) == expected


def test_a_required_variable_missing_names_it() -> None:
    with pytest.raises(Exception, match="requires MODELOPS_AUDIT_KEY: set it"):
        interpolate("${MODELOPS_AUDIT_KEY:?set it}", {})


def test_the_servers_are_the_versions_compose_names() -> None:
    """PostgreSQL and Redis here are the major versions of compose's images (MinIO is replaced by moto's
    S3, see REPLACED); the Python side is the same lock in both (test_compose: the Dockerfile installs
    uv.lock)."""
    import redis
    import sqlalchemy as sa

    require_service("PostgreSQL", "127.0.0.1", 5432)
    require_service("Redis", "127.0.0.1", 6379)
    postgres_tag = COMPOSE["services"]["postgres"]["image"].split(":")[1]
    redis_tag = COMPOSE["services"]["redis"]["image"].split(":")[1]
    engine = sa.create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
    try:
        with engine.connect() as conn:
            server = conn.execute(sa.text("show server_version")).scalar_one()
    finally:
        engine.dispose()
    assert server.split(".")[0] == postgres_tag.split(".")[0], (server, postgres_tag)
    version = redis.Redis.from_url("redis://127.0.0.1:6379/0").info("server")["redis_version"]
    assert version.split(".")[:2] == redis_tag.split("-")[0].split(".")[:2], (version, redis_tag)
