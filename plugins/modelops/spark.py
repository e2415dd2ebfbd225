"""One Spark session for one task: local mode by default, a cluster by configuration, quiet, and gone after.

``MODELOPS_SPARK_MASTER`` picks the master (default ``local[2]``: two worker threads in the task's own
JVM); ``spark://host:7077``, ``yarn`` or ``k8s://...`` send the work to a cluster, whose executors need
the same Python packages as the task (MLflow, the model's flavor). ``MODELOPS_SPARK_CONF`` adds Spark
settings as a JSON object (``{"spark.executor.memory": "4g"}``). Spark's own log is cut to errors, so
the task log keeps our lines; Arrow moves the rows between Python and the JVM. The session is stopped and
its JVM ended when the ``with`` block ends, failed or not: no Spark JVM outlives the task.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelops.errors import ConfigurationError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

logger = logging.getLogger(__name__)

SPARK_MASTER_ENV = "MODELOPS_SPARK_MASTER"
SPARK_CONF_ENV = "MODELOPS_SPARK_CONF"
DEFAULT_MASTER = "local[2]"

# Spark's log4j2 set-up: errors only, to stderr; its INFO lines (hundreds per job) stay out of the task log.
_LOG4J2 = """\
rootLogger.level = error
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = spark %p %c{1}: %m%n
# A pyspark driver counts as a shell: Spark sets the root level from these loggers' (WARN if unset).
logger.repl.name = org.apache.spark.repl.Main
logger.repl.level = error
logger.pyshell.name = org.apache.spark.api.python.PythonGatewayServer
logger.pyshell.level = error
# A failed task's Python traceback may quote input values (MLflow's schema errors do): not logged; the
# driver's error names the failure's type.
logger.executor.name = org.apache.spark.executor.Executor
logger.executor.level = off
"""


@dataclass(frozen=True)
class SparkSettings:
    master: str
    conf: dict[str, str]

    @property
    def local(self) -> bool:
        return self.master.startswith("local")


def spark_settings(env: dict[str, str] | None = None) -> SparkSettings:
    """The master and extra settings from the environment; a malformed ``MODELOPS_SPARK_CONF`` is named."""
    env = os.environ if env is None else env
    master = (env.get(SPARK_MASTER_ENV) or "").strip() or DEFAULT_MASTER
    raw = (env.get(SPARK_CONF_ENV) or "").strip()
    conf: dict[str, str] = {}
    if raw:
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(
                f"{SPARK_CONF_ENV} is not valid JSON ({exc.msg} at character {exc.pos}); set it to an object "
                'such as {"spark.executor.memory": "4g"}'
            ) from exc
        if not isinstance(parsed, dict):
            raise ConfigurationError(
                f"{SPARK_CONF_ENV} must be a JSON object of Spark settings, got {type(parsed).__name__}"
            )
        conf = {str(key): str(value) for key, value in parsed.items()}
    return SparkSettings(master=master, conf=conf)


@contextmanager
def spark_session(
    settings: SparkSettings | None = None, *, app_name: str = "modelops-batch-scoring"
) -> Iterator[SparkSession]:
    """A new Spark session for this task, stopped (and its JVM ended) when the block ends."""
    from pyspark.sql import SparkSession

    settings = settings or spark_settings()
    # py4j logs every connection it opens and closes at INFO: not for the task log.
    logging.getLogger("py4j").setLevel(logging.WARNING)
    if SparkSession.getActiveSession() is not None:
        raise ConfigurationError(
            "a Spark session is already active in this process; a task starts exactly one: stop the other "
            "first"
        )
    with tempfile.TemporaryDirectory(prefix="modelops-spark-") as tmp:
        log_config = Path(tmp) / "log4j2.properties"
        log_config.write_text(_LOG4J2)
        scratch = Path(tmp) / "local"
        scratch.mkdir()
        java_options = f"-Dlog4j2.configurationFile={log_config.as_uri()}"
        conf: dict[str, Any] = {
            "spark.sql.execution.arrow.pyspark.enabled": "true",
            # Refuse rather than fall back to the slow row-by-row path without Arrow.
            "spark.sql.execution.arrow.pyspark.fallback.enabled": "false",
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false",
            "spark.driver.extraJavaOptions": java_options,
            "spark.sql.session.timeZone": "UTC",
        }
        if settings.local:
            # Everything runs in the task's JVM: loopback only, scratch space in the task's temporary folder.
            conf |= {
                "spark.driver.host": "127.0.0.1",
                "spark.driver.bindAddress": "127.0.0.1",
                "spark.local.dir": str(scratch),
                "spark.sql.shuffle.partitions": "4",
            }
        conf |= settings.conf
        builder = SparkSession.builder.master(settings.master).appName(app_name)
        for key, value in conf.items():
            builder = builder.config(key, value)
        started = time.monotonic()
        spark = None
        try:
            with _worker_python(settings):
                spark = builder.getOrCreate()
            spark.sparkContext.setLogLevel("ERROR")
            logger.info(
                "Spark %s session on %s started in %.1f s",
                spark.version,
                settings.master,
                time.monotonic() - started,
            )
            yield spark
        finally:
            # Also when the start itself failed: a JVM launched for it must not outlive the task.
            stop_spark(spark)


@contextmanager
def _worker_python(settings: SparkSettings) -> Iterator[None]:
    """In local mode, Python workers run this interpreter (its packages: MLflow, the model's flavor); pyspark
    reads ``PYSPARK_PYTHON`` once, when the context starts. A cluster's executors use their own setting."""
    if not settings.local or os.environ.get("PYSPARK_PYTHON"):
        yield
        return
    os.environ["PYSPARK_PYTHON"] = sys.executable
    try:
        yield
    finally:
        os.environ.pop("PYSPARK_PYTHON", None)


def stop_spark(spark: SparkSession | None) -> None:
    """Stop the session and end the JVM pyspark launched for it (pyspark keeps it for a next session)."""
    from pyspark import SparkContext

    if spark is not None:
        spark.stop()
    gateway = SparkContext._gateway
    if gateway is None:
        return
    process = getattr(gateway, "proc", None)
    gateway.shutdown()
    SparkContext._gateway = None
    SparkContext._jvm = None
    if process is None:
        return
    # The JVM (PythonGatewayServer) exits when its standard input closes.
    if process.stdin is not None:
        process.stdin.close()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
