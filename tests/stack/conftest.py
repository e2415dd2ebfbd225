"""The production-shaped stack of ``make stack`` (modelops_dev.prodstack), started once for this folder.

It runs on a PostgreSQL cluster of its own (the machine's PostgreSQL binaries, ``initdb`` into a temporary
folder, password authentication, a free port), so the fault tests may restart or stop it without touching
the machine's server, and wrong passwords are refused as on a production server. Redis is the machine's
(a database number of its own), S3 is moto's server, started by the stack.

Skipped where no PostgreSQL binaries or no Redis are found; ``MODELOPS_REQUIRE_SERVICES=1`` (``.ci/run``)
turns that skip into a failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_or_skip

PG_BINARIES = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
REDIS_URL = os.environ.get("MODELOPS_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of the tests' own: scram-sha-256 for every TCP login, superuser ``postgres``."""

    bin_dir: Path
    data_dir: Path
    port: int
    password: str

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg2://postgres:{self.password}@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # PostgreSQL refuses to run as root: the machine's postgres user owns the cluster.
        command = [*(["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []), *argv]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> None:
        pwfile = self.data_dir.parent / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._chown(self.data_dir.parent)
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "--username=postgres",
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=scram-sha-256",
            "--encoding=UTF8",
        )
        pwfile.unlink()

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")
            path.chmod(0o700)

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data_dir.parent} -c max_connections=300"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-o",
            options,
            "-l",
            str(self.data_dir.parent / "server.log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop", check=False
        )

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop the server (every connection dropped), stay down ``down_seconds``, start it again."""
        self.stop("fast")
        time.sleep(down_seconds)
        self.start()


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    if not PG_BINARIES:
        require_or_skip("no PostgreSQL server binaries under /usr/lib/postgresql (Debian: postgresql)")
    base = Path(tempfile.mkdtemp(prefix="modelops-pg-"))
    base.chmod(0o755)
    cluster = PrivatePostgres(PG_BINARIES[-1], base / "data", free_port(), secrets.token_urlsafe(16))
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


def _redis_up(url: str) -> bool:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError:
        return False
    return True


def stack_config(root: Path, pg_url: str, prefix: str, s3_port: int | None = None):  # -> StackConfig
    from modelops_dev.prodstack import StackConfig, StackPorts

    ports = StackPorts(
        **{name: free_port() for name in ("airflow", "mlflow", "gateway", "worker_log", "triggerer_log")},
        s3=s3_port or free_port(),
        scheduler_health=free_port(),
    )
    return StackConfig(root=root, prefix=prefix, pg_url=pg_url, redis_url=REDIS_URL, ports=ports)


def _include_without_canary(root: Path) -> Path:
    """The project's settings, the click model's canary off: its new versions go live at once when they
    pass the gate (the fault tests wait for them), instead of soaking on labelled traffic."""
    import yaml

    from modelops.settings import PROJECT_ROOT

    include = root / "include"
    shutil.copytree(PROJECT_ROOT / "include", include)
    spec_file = include / "models" / "ctr_recommender.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec["serving"]["canary"] = {**spec["serving"].get("canary", {}), "enabled": False}
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    return include


@pytest.fixture(scope="session")
def production_stack(private_postgres: PrivatePostgres, s3_proxy, tmp_path_factory: pytest.TempPathFactory):
    """The running stack's Plan (modelops_dev.prodstack), torn down and its databases dropped at the end.
    Every client reaches moto through ``s3_proxy``."""
    from dataclasses import replace

    from modelops_dev import prodstack

    if not _redis_up(REDIS_URL):
        require_or_skip(f"no Redis at {REDIS_URL} (set MODELOPS_TEST_REDIS_URL)")
    root = tmp_path_factory.mktemp("stack")
    config = stack_config(
        root, private_postgres.admin_url, f"mst_{secrets.token_hex(3)}", s3_proxy.target_port
    )
    config = replace(
        config,
        s3_endpoint_override=f"http://127.0.0.1:{s3_proxy.port}",
        include_dir=_include_without_canary(root),
    )
    messages: list[str] = []
    saved = dict(os.environ)
    try:
        the_plan = prodstack.up(config, messages.append)
    except Exception:
        prodstack.down(config, messages.append)
        raise
    try:
        yield the_plan
    finally:
        os.environ.clear()
        os.environ.update(saved)
        prodstack.down(config, messages.append)


@pytest.fixture(scope="session")
def s3_proxy():
    """Set up before the stack (it is the S3 endpoint every client is given); pointed at moto later."""
    from tests.stack.faults import BlockableProxy

    proxy = BlockableProxy(target_port=free_port())
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def lifecycle_report(production_stack):
    """The first model's lifecycle on the stack, run once for the tests that build on it."""
    from modelops_dev.prodstack import lifecycle

    lines: list[str] = []
    report = lifecycle(production_stack, ["ctr_recommender"], out=lines.append)
    report.lines = lines
    return report
