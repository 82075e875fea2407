"""A SparkSession for running the preprocess job locally (laptop, CI, `ftpipe up`).

On Dataproc the session comes from `spark-submit` and its cluster settings; `job.main` then only
calls `SparkSession.builder.getOrCreate()` on top of what the cluster provides. Everything here is
about starting fast and quietly on a small machine:

- `local[N]` with N = 2 by default (the laptop budget), few shuffle partitions;
- no UI, no console progress bar, no Hive catalog, loopback networking (no hostname lookups);
- modest driver memory (the driver is also the only executor in local mode);
- the JVM's full JIT by default: `quick_jvm=True` (C1 only) starts ~0.5 s sooner but runs the
  near-dup stage's SQL ~2x slower (bench/preprocess), so only short-lived test sessions use it;
- log4j at ERROR from the first line on (a generated log4j2 config, not just `setLogLevel`),
  so that Spark's start-up chatter never lands in service logs;
- the Python workers use this interpreter and can import the `services` package even when the
  project is not pip-installed (PYTHONPATH is passed to the workers through `spark.executorEnv`).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

_PROJECT_ROOT = Path(__file__).resolve().parents[2]

_LOG4J2 = """\
rootLogger.level = error
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n
logger.nativeio.name = org.apache.hadoop.util.NativeCodeLoader
logger.nativeio.level = off
# PySpark counts as a "REPL": Spark resets the root level to WARN (and says so on stderr) unless
# the REPL logger has a level of its own.
logger.repl.name = org.apache.spark.repl.Main
logger.repl.level = error
logger.pygateway.name = org.apache.spark.api.python.PythonGatewayServer
logger.pygateway.level = error
"""

#: seconds the last `build_session` call took (JVM start + SparkContext); None before the first.
last_start_seconds: float | None = None


def _log4j2_file() -> Path:
    path = Path(tempfile.gettempdir()) / "ftpipe-spark-log4j2.properties"
    if not path.is_file() or path.read_text() != _LOG4J2:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(_LOG4J2)
        os.replace(tmp, path)
    return path


def build_session(
    app_name: str = "ftpipe-preprocess",
    *,
    cores: int | str = 2,
    shuffle_partitions: int = 4,
    driver_memory: str = "1g",
    quick_jvm: bool = False,
    extra_conf: dict[str, str] | None = None,
) -> SparkSession:
    """A local SparkSession tuned for a small machine and a fast start.

    `cores` is the N of `local[N]` (`"*"` for every core). If a session already exists in this
    process it is returned as is (static settings such as memory cannot change after the JVM
    started). The start time is logged and kept in `last_start_seconds`.
    """
    global last_start_seconds
    started = time.perf_counter()

    # pyspark 4.3 warns at import time when pandas >= 3 is installed; we use no pandas API.
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)
    # Workers must run this interpreter (the venv) and import `services.preprocess.*`.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    worker_path = os.pathsep.join(p for p in (str(_PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    log4j = _log4j2_file()
    java_opts = f"-Dlog4j2.configurationFile=file:{log4j} -XX:+UseSerialGC -Xss4m"
    if quick_jvm:
        java_opts += " -XX:TieredStopAtLevel=1"

    conf = {
        "spark.master": f"local[{cores}]",
        "spark.app.name": app_name,
        "spark.driver.memory": driver_memory,
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.driver.extraJavaOptions": java_opts,
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.catalogImplementation": "in-memory",
        "spark.sql.shuffle.partitions": str(shuffle_partitions),
        "spark.default.parallelism": str(shuffle_partitions),
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.session.timeZone": "UTC",
        "spark.python.worker.reuse": "true",
        "spark.executorEnv.PYTHONPATH": worker_path,
        "spark.executorEnv.PYTHONHASHSEED": "0",
        "spark.eventLog.enabled": "false",
    }
    conf.update(extra_conf or {})

    builder = SparkSession.builder
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")

    last_start_seconds = time.perf_counter() - started
    log.info("spark session %s (%s) ready in %.2fs", app_name, conf["spark.master"], last_start_seconds)
    return spark


def session_alive(spark: SparkSession) -> bool:
    """False once the session's JVM has died (killed, out of memory) or its context was stopped."""
    try:
        return not spark.sparkContext._jsc.sc().isStopped()
    except Exception:  # py4j cannot reach the JVM: connection refused, or the context is gone
        return False


def discard_session(spark: SparkSession) -> None:
    """Forget a session whose JVM died, so that the next `build_session` starts a new JVM.

    pyspark keeps its gateway and active context in class attributes and has no public call for
    this: `SparkContext.stop()` raises part-way through when the JVM is gone, leaving the dead
    context registered, and `getOrCreate` would hand it back."""
    from pyspark import SparkContext

    context = spark.sparkContext
    try:
        context.stop()
    except Exception:  # expected: the JVM it would tell is gone
        pass
    if getattr(context, "_accumulatorServer", None):
        context._accumulatorServer.shutdown()
        context._accumulatorServer = None
    with SparkContext._lock:
        SparkContext._active_spark_context = None
        gateway, SparkContext._gateway, SparkContext._jvm = SparkContext._gateway, None, None
    SparkSession._instantiatedSession = None
    SparkSession._activeSession = None
    if gateway is not None:
        try:
            gateway.shutdown()
        except Exception:
            pass
