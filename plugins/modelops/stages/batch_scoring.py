"""Batch scoring: a file or a folder of files scored on Spark with the champion the audit log records.

The version scored is the one the newest authentic promotion or rollback record names, never the
registry's alias; its files are downloaded and hashed against that record *before* anything of it is
loaded (the rule the scoring gateway follows). The input (one CSV or Parquet file, or a folder of them,
local or any ``ObjectStoragePath`` URI such as ``s3://``) must lie under the model's dataset roots; each
file is copied once into the task's scratch folder, hashing the bytes as they are copied, so the hash on
record is of exactly the bytes scored. Its columns are checked against the model spec's features
(missing ones are named, extra ones are not given to the model) and its text features screened for the
dataset's PII patterns as the gateway screens them; the driver reads the rows in slices and
Spark's executors score each slice through ``mlflow.pyfunc.spark_udf``, with Arrow between them.

Written per run: one Parquet file of scores (the input's key columns, the source file, the row number
within it, ``prediction``), one prediction-log record per chunk of at most :data:`CHUNK_ROWS` rows under
the caller id ``batch:<dag_id>/<run_id>``, and one ``batch.scored`` audit record with the sha256 of every
input file and of the output. A retry of the run overwrites its output and skips the chunks it logged
already: request ids derive from the caller id, the model, the file and the chunk. No data value is
written to the audit log or the task log; the prediction log holds the scored rows, as the gateway's does.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelops.errors import BatchScoringError, BatchScoringRefused
from modelops.evidence import (
    CHAMPION_FIELD,
    EvidenceMismatch,
    champion_record,
    check_files,
    download_version_files,
    hash_tree,
    recorded_files,
)
from modelops.locations import is_within
from modelops.stages.outcome import AuditEntry, StageOutcome, sha256_json
from modelops.storage import as_storage_path, copy_file
from modelops.vocabulary import AuditAction, Decision, EventField, model_subject

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from airflow.sdk import ObjectStoragePath
    from pyspark.sql import SparkSession

    from modelops.audit import AuditRecord, AuditStore
    from modelops.registry import ModelRegistry
    from modelops.serving.prediction_log import PredictionLog
    from modelops.serving.screening import Screening
    from modelops.settings import ModelSpec, PiiPattern

logger = logging.getLogger(__name__)

CHUNK_ROWS = 10_000
"""Rows per prediction-log record (one 'call' of the batch)."""
SLICE_ROWS = 100_000
"""Rows the driver hands Spark per job; the driver holds one slice (and its scores) at a time."""
ROWS_PER_TASK = 5_000
"""Fewest rows per Spark task: a smaller slice is scored by fewer tasks."""
OUTPUT_FILE = "scores.parquet"
"""The name of the scores file in the output folder."""
PREDICTION_COLUMN = "prediction"
SOURCE_FILE_COLUMN = "source_file"
ROW_NUMBER_COLUMN = "row_number"
BATCH_CALLER_PREFIX = "batch:"
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_ROW = "__modelops_row"
_CALLER_ID_LIMIT = 200  # the prediction log's caller_id column


@dataclass(frozen=True)
class InputFile:
    """One input file, copied into the scratch folder: the hash is of the bytes scored."""

    uri: str
    name: str
    format: str
    sha256: str
    bytes: int
    local: Path


def batch_caller_id(dag_id: str, run_id: str) -> str:
    """The prediction log's caller id of one batch run: ``batch:<dag_id>/<run_id>``."""
    return f"{BATCH_CALLER_PREFIX}{dag_id}/{run_id}"[:_CALLER_ID_LIMIT]


def chunk_request_id(caller_id: str, model: str, file_index: int, chunk_index: int) -> str:
    """The request id of one chunk: the same for every try of the run, so a retry can skip it."""
    key = f"{caller_id}\n{model}\n{file_index}\n{chunk_index}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def default_output_uri(storage: ObjectStoragePath, model: str, run_id: str) -> str:
    """``<storage_root>/batch_scores/<model>/<run_id>``, the run id made safe as one folder name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return str(storage / "batch_scores" / model / safe)


# --- what is scored, and with what ------------------------------------------------------------------


def recorded_champion(audit: AuditStore, name: str) -> tuple[AuditRecord, str]:
    """The newest authentic promotion or rollback record of ``name`` and the version it names."""
    record = champion_record(audit, name)
    if record is None:
        raise BatchScoringRefused(
            f"model {name!r} has no champion: the audit log holds no authentic promotion or rollback record "
            "of it. Deploy a version first (modelops_training, modelops_compliance_gate, then "
            "modelops_deployment), then score again"
        )
    version = str(record.details.get(CHAMPION_FIELD) or "")
    if not version:
        raise BatchScoringRefused(
            f"the champion record seq={record.seq} of model {name!r} names no version; deploy a version "
            "through modelops_deployment"
        )
    return record, version


def verified_download(
    registry: ModelRegistry, name: str, version: str, record: AuditRecord, folder: Path
) -> Path:
    """Download the version into ``folder`` and check every file against ``record``; nothing is loaded."""
    try:
        expected = recorded_files(record)
        model_dir = download_version_files(registry, name, version, folder)
        check_files(
            expected,
            hash_tree(model_dir),
            what=f"version {version} of model {name!r} is not the one the audit log authorises",
        )
    except EvidenceMismatch as exc:
        raise BatchScoringRefused(
            f"{exc}; it was not loaded. Its files were changed after the decision (record seq={record.seq}): "
            "register and deploy a new version through the pipeline"
        ) from exc
    return model_dir


def input_files(input_uri: str, roots: list[str], conn_id: str | None = None) -> list[ObjectStoragePath]:
    """The CSV and Parquet files ``input_uri`` names: the file itself, or the files directly in the folder
    (names starting with '.' or '_' skipped: writers' temporary and marker files), sorted by name."""
    if not input_uri or not str(input_uri).strip():
        raise BatchScoringRefused("no input_uri given; name a CSV or Parquet file, or a folder of them")
    if not is_within(input_uri, roots):
        raise BatchScoringRefused(
            f"input {input_uri} is outside the folders batch scoring may read {roots}; move the files under "
            "one of them, or add the folder to the dataset spec's allowed_roots (or dataset_roots in "
            "include/modelops.yaml)"
        )
    path = as_storage_path(input_uri, conn_id)
    if not path.exists():
        raise BatchScoringRefused(f"input {input_uri} does not exist; check the input_uri param")
    if path.is_file():
        candidates = [path]
    else:
        candidates = sorted(
            (p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_"))),
            key=lambda p: p.name,
        )
        candidates = [p for p in candidates if p.suffix.lower() in FORMATS]
        if not candidates:
            raise BatchScoringRefused(
                f"input folder {input_uri} holds no file ending in {sorted(FORMATS)}; drop CSV or Parquet "
                "files there"
            )
    for candidate in candidates:
        if candidate.suffix.lower() not in FORMATS:
            raise BatchScoringRefused(
                f"input {candidate} is neither CSV nor Parquet (by its name); name files ending in "
                f"{sorted(FORMATS)}"
            )
        if not is_within(str(candidate), roots):
            raise BatchScoringRefused(
                f"input file {candidate} leads outside the folders batch scoring may read {roots} (a "
                "symbolic link?); copy the file itself there"
            )
    return candidates


def stage_inputs(files: list[ObjectStoragePath], folder: Path) -> list[InputFile]:
    """Copy every input file into ``folder``, hashing the bytes copied."""
    staged = []
    for index, source in enumerate(files):
        suffix = source.suffix.lower()
        local = folder / f"{index:05d}{suffix}"
        digest = copy_file(source, as_storage_path(local))
        staged.append(
            InputFile(
                uri=str(source),
                name=source.name,
                format=FORMATS[suffix],
                sha256=digest,
                bytes=local.stat().st_size,
                local=local,
            )
        )
    return staged


def file_columns(file: InputFile) -> list[str]:
    """The columns of one staged file, read from its header or schema only."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if file.format == "parquet":
            return list(pq.read_schema(file.local).names)
        return [str(c) for c in pd.read_csv(file.local, nrows=0).columns]
    except pd.errors.EmptyDataError as exc:
        raise BatchScoringRefused(
            f"input {file.uri} is empty (0 bytes or no header); it needs a header row and data"
        ) from exc
    except (pd.errors.ParserError, UnicodeDecodeError, pa.ArrowInvalid, OSError) as exc:
        raise BatchScoringRefused(
            f"input {file.uri} is not a readable {file.format} file ({type(exc).__name__})"
        ) from exc


def check_columns(spec: ModelSpec, files: list[InputFile], id_columns: list[str] | None) -> list[str]:
    """Refuse files lacking a feature (or a named id column); return the key columns to keep: the named
    ones, or else the columns called ``id`` or ending in ``_id`` that every file has and no feature is."""
    reserved = {SOURCE_FILE_COLUMN, ROW_NUMBER_COLUMN, PREDICTION_COLUMN}
    clashing = sorted(reserved & set(id_columns or []))
    if clashing:
        raise BatchScoringRefused(
            f"id_columns {clashing} are named like columns batch scoring writes itself ({sorted(reserved)}); "
            "rename them in the input"
        )
    problems: list[str] = []
    common: list[str] | None = None
    for file in files:
        columns = file_columns(file)
        missing = [c for c in spec.features if c not in columns]
        missing_ids = [c for c in id_columns or [] if c not in columns]
        if missing:
            problems.append(f"{file.uri} lacks the feature column(s) {missing}")
        if missing_ids:
            problems.append(f"{file.uri} lacks the id column(s) {missing_ids}")
        common = columns if common is None else [c for c in common if c in columns]
    if problems:
        raise BatchScoringRefused(
            f"the input does not fit model {spec.name!r}: {'; '.join(problems[:20])}. The model needs "
            f"{spec.features} (include/models/); columns besides those are not given to the model"
        )
    if id_columns:
        return list(dict.fromkeys(id_columns))
    reserved |= set(spec.features)
    return [c for c in common or [] if (c.lower() == "id" or c.lower().endswith("_id")) and c not in reserved]


def read_slices(file: InputFile, columns: list[str], rows: int) -> Iterator[pd.DataFrame]:
    """The rows of one staged file, ``rows`` at a time, only ``columns``."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if file.format == "parquet":
            for batch in pq.ParquetFile(file.local).iter_batches(batch_size=rows, columns=columns):
                yield batch.to_pandas()
        else:
            yield from pd.read_csv(file.local, usecols=columns, chunksize=rows)
    except (pd.errors.ParserError, UnicodeDecodeError, pa.ArrowInvalid) as exc:
        raise BatchScoringRefused(
            f"input {file.uri} is not a readable {file.format} file ({type(exc).__name__}); fix or remove it"
        ) from None


def pii_scan(
    files: list[InputFile], features: list[str], screening: Screening, rows: int
) -> dict[str, list[str]]:
    """``{feature: [PII pattern names]}`` of the text features whose values match the dataset's PII patterns
    in any file (the gateway's rule, ``serving.screening.pii``); nothing when the model's screening is off."""
    if screening.rules.pii == "off" or not screening.pii_patterns:
        return {}
    found: dict[str, set[str]] = {}
    for file in files:
        for frame in read_slices(file, features, rows):
            for column, names in screening.pii_findings(frame[features]).items():
                found.setdefault(column, set()).update(names)
    return {column: sorted(names) for column, names in sorted(found.items())}


# --- scoring ----------------------------------------------------------------------------------------


def _output_value(row: list[float]) -> Any:
    """What the log holds per row: the model's own output, a single value unwrapped."""
    return row[0] if len(row) == 1 else list(row)


def _prediction(row: list[float]) -> float:
    """The one number per row: p1 of a ``[p0, p1]`` pair, else the (last) value."""
    return float(row[-1])


def score_slice(spark: SparkSession, udf: Any, frame: pd.DataFrame, features: list[str]) -> list[list[float]]:
    """The model's output for every row of ``frame``, in row order, scored by Spark's executors."""
    import numpy as np
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException
    from pyspark.sql import functions as F

    data = frame[features].copy()
    data[_ROW] = np.arange(len(frame), dtype="int64")
    # A task per ROWS_PER_TASK rows at least: each task's Python worker loads the model once, which costs
    # more than scoring a few thousand rows.
    tasks = max(1, min(spark.sparkContext.defaultParallelism, -(-len(frame) // ROWS_PER_TASK)))
    try:
        scored = (
            spark.createDataFrame(data)
            .coalesce(tasks)
            .select(F.col(_ROW), udf(F.struct(*[F.col(f"`{c}`") for c in features])).alias("out"))
            .toPandas()
        )
    except (PySparkException, Py4JJavaError) as exc:
        # Spark's message carries the worker's traceback, whose MLflow schema errors may quote input values:
        # name the failure's type only, never its text.
        raise BatchScoringError(
            f"Spark failed to score a slice of {len(frame)} rows: {_failure_kind(exc)}; its message is not "
            "logged as it may quote input values (check the input's column types against the model's "
            "signature, and that the executors have the model's packages)"
        ) from None
    order = scored[_ROW].to_numpy().argsort(kind="stable")
    return [list(out) for out in scored["out"].to_numpy()[order]]


_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))\b", re.MULTILINE)


def _failure_kind(exc: BaseException) -> str:
    """The failure's exception types (Spark's own, then the Python worker's, read off the last line of its
    traceback that names one); never the message."""
    names = [type(exc).__name__]
    found = _EXCEPTION_LINE.findall(str(exc))
    if found:
        names.append(found[-1])
    return " from ".join(reversed(names))


def _logged_ids(log: PredictionLog, request_ids: list[str]) -> set[str]:
    """Which of ``request_ids`` an earlier try of the run logged already."""
    import sqlalchemy as sa

    from modelops.serving.prediction_log import predictions_table

    found: set[str] = set()
    with log.engine.connect() as conn:
        for first in range(0, len(request_ids), 500):
            batch = request_ids[first : first + 500]
            query = sa.select(predictions_table.c.request_id).where(predictions_table.c.request_id.in_(batch))
            found.update(conn.execute(query).scalars())
    return found


def check_earlier_tries(log: PredictionLog, caller_id: str, name: str, version: str) -> None:
    """Refuse when an earlier try of this run logged scores of another version (the champion changed
    between tries): skipping its chunks would make the log disagree with the output. Chunks are logged in
    order, so the first one tells (a look-up by primary key)."""
    import sqlalchemy as sa

    from modelops.serving.prediction_log import predictions_table

    table = predictions_table
    first = chunk_request_id(caller_id, name, 0, 0)
    with log.engine.connect() as conn:
        earlier = conn.execute(sa.select(table.c.model_version).where(table.c.request_id == first)).first()
    if earlier is not None and earlier.model_version != version:
        raise BatchScoringRefused(
            f"an earlier try of this run logged its scores with v{earlier.model_version}, and the champion is "
            f"v{version} now: trigger a new run to score the input with the new champion"
        )


def _logged_rows(
    frame: pd.DataFrame, screening: Screening, pii_columns: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """The rows as the prediction log keeps them: PII in the flagged columns masked (``pii: mask``)."""
    rows = frame.to_dict(orient="records")
    return screening.masked_rows(rows, pii_columns) if pii_columns else rows


@dataclass
class _Progress:
    rows: int = 0
    chunks: int = 0
    chunks_logged: int = 0
    spark_seconds: float = 0.0
    log_seconds: float = 0.0


def _score_file(
    *,
    spark: SparkSession,
    udf: Any,
    spec: ModelSpec,
    version: str,
    file: InputFile,
    file_index: int,
    keys: list[str],
    writer_schema: list[pa.Schema],
    writer: Any,
    log: PredictionLog,
    caller_id: str,
    chunk_rows: int,
    slice_rows: int,
    progress: _Progress,
    screening: Screening,
    pii_columns: dict[str, list[str]],
) -> int:
    import pandas as pd
    import pyarrow as pa

    from modelops.serving.prediction_log import PredictionRecord

    features = spec.features
    rows_in_file = 0
    chunk_index = 0
    for frame in read_slices(file, list(dict.fromkeys([*keys, *features])), slice_rows):
        if frame.empty:
            continue
        started = time.monotonic()
        outputs = score_slice(spark, udf, frame, features)
        seconds = time.monotonic() - started
        progress.spark_seconds += seconds
        # The prediction log: one record per chunk, skipped when a previous try logged it.
        ids = []
        bounds = []
        for first in range(0, len(frame), chunk_rows):
            ids.append(chunk_request_id(caller_id, spec.name, file_index, chunk_index))
            bounds.append((first, min(first + chunk_rows, len(frame))))
            chunk_index += 1
        logging_started = time.monotonic()
        done = _logged_ids(log, ids)
        for request_id, (first, last) in zip(ids, bounds, strict=True):
            progress.chunks += 1
            if request_id in done:
                continue
            log.record(
                PredictionRecord(
                    request_id=request_id,
                    received_at=datetime.now(UTC),
                    caller_id=caller_id,
                    model_name=spec.name,
                    model_version=version,
                    status_code=200,
                    latency_ms=seconds * 1000 * (last - first) / len(frame),
                    n_rows=last - first,
                    inputs=_logged_rows(frame.iloc[first:last][features], screening, pii_columns),
                    outputs=[_output_value(out) for out in outputs[first:last]],
                )
            )
            progress.chunks_logged += 1
        progress.log_seconds += time.monotonic() - logging_started
        # The scores file.
        table_frame = pd.DataFrame(
            {
                **{key: frame[key].to_numpy() for key in keys},
                SOURCE_FILE_COLUMN: file.name,
                ROW_NUMBER_COLUMN: pd.RangeIndex(rows_in_file, rows_in_file + len(frame)).to_numpy("int64"),
                PREDICTION_COLUMN: [_prediction(out) for out in outputs],
            }
        )
        table = pa.Table.from_pandas(table_frame, preserve_index=False)
        if not writer_schema:
            writer_schema.append(table.schema)
            writer.open(table.schema)
        try:
            table = table.cast(writer_schema[0])
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise BatchScoringRefused(
                f"the key columns {keys} of {file.uri} have other types than in the files before it "
                f"({type(exc).__name__}); give every file the same key column types, or name id_columns"
            ) from None
        writer.write(table)
        rows_in_file += len(frame)
    progress.rows += rows_in_file
    return rows_in_file


class _ParquetOut:
    """A Parquet writer opened with the first slice's schema."""

    def __init__(self, path: Path, metadata: dict[str, str]) -> None:
        self.path = path
        self.metadata = metadata
        self.writer: Any = None

    def open(self, schema: pa.Schema) -> None:
        import pyarrow.parquet as pq

        self.writer = pq.ParquetWriter(self.path, schema.with_metadata(self.metadata))

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table.replace_schema_metadata(self.metadata))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --- the stage --------------------------------------------------------------------------------------


def score_batch(
    *,
    spec: ModelSpec,
    registry: ModelRegistry,
    audit: AuditStore,
    prediction_log: PredictionLog,
    spark: AbstractContextManager[SparkSession],
    input_uri: str,
    output_uri: str,
    input_roots: list[str],
    caller_id: str,
    id_columns: list[str] | None = None,
    pii_patterns: Sequence[PiiPattern] = (),
    storage_conn_id: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
    slice_rows: int = SLICE_ROWS,
) -> StageOutcome:
    """Score ``input_uri`` with ``spec``'s recorded champion and write ``<output_uri>/scores.parquet``.

    ``spark`` is entered only once everything is checked (a refusal starts no JVM). A refusal (no champion,
    serving disabled, changed files, a bad input) is an outcome with a ``refused`` record; a Spark failure
    raises :class:`~modelops.errors.BatchScoringError` for Airflow to retry.

    ``pii_patterns`` (the model's dataset's) screen the text features as the gateway does, by the model's
    ``serving.screening.pii``: ``reject`` refuses the batch before anything is scored, naming the columns
    and patterns; ``mask`` scores it and logs the masked copy; ``off`` logs the rows as read.
    """
    from modelops.serving.screening import Screening

    name = spec.name
    screening = Screening.build(spec.serving.screening, pii_patterns)
    facts: dict[str, Any] = {"model_name": name, "input_uri": input_uri, "output_uri": output_uri}
    version: str | None = None
    try:
        if not spec.serving.enabled:
            raise BatchScoringRefused(
                f"model {name!r} has serving disabled (serving.enabled: false in include/models/); enable "
                "serving in its spec to score it in batch"
            )
        if chunk_rows < 1 or slice_rows < 1:
            raise BatchScoringRefused(
                f"chunk_rows and slice_rows must be positive, got {chunk_rows}, {slice_rows}"
            )
        files = input_files(input_uri, input_roots, storage_conn_id)
        if is_within(output_uri, [input_uri]) or is_within(input_uri, [output_uri]):
            raise BatchScoringRefused(
                f"output {output_uri} and input {input_uri} overlap; a later run would score its own scores. "
                "Choose an output_uri outside the input"
            )
        with tempfile.TemporaryDirectory(prefix="modelops-batch-") as tmp:
            scratch = Path(tmp)
            (scratch / "model").mkdir()
            (scratch / "inputs").mkdir()
            record, version = recorded_champion(audit, name)
            model_dir = verified_download(registry, name, version, record, scratch / "model")
            staged = stage_inputs(files, scratch / "inputs")
            keys = check_columns(spec, staged, id_columns)
            check_earlier_tries(prediction_log, caller_id, name, version)
            pii_columns = pii_scan(staged, spec.features, screening, slice_rows)
            if pii_columns and screening.rules.pii == "reject":
                named = "; ".join(f"column {c!r}: {', '.join(n)}" for c, n in pii_columns.items())
                raise BatchScoringRefused(
                    f"the input holds personal data model {name!r} must not receive ({named}); remove it, or "
                    "ask the model's owner to set serving.screening.pii: mask"
                )
            return _score(
                screening=screening,
                pii_columns=pii_columns,
                spec=spec,
                version=version,
                record=record,
                model_dir=model_dir,
                staged=staged,
                keys=keys,
                spark=spark,
                log=prediction_log,
                caller_id=caller_id,
                input_uri=input_uri,
                output_uri=output_uri,
                storage_conn_id=storage_conn_id,
                chunk_rows=chunk_rows,
                slice_rows=slice_rows,
                scratch=scratch,
            )
    except BatchScoringRefused as exc:
        reason = str(exc)
        return StageOutcome(
            decision=Decision.REFUSED,
            summary=f"{name}: batch scoring refused: {reason}",
            details={**facts, "version": version, "reason": reason},
            records=(
                AuditEntry(
                    AuditAction.BATCH_SCORED,
                    model_subject(name, version),
                    Decision.REFUSED,
                    details={**facts, "version": version, "caller_id": caller_id, "reason": reason},
                ),
            ),
            refusal=reason,
        )


def _score(
    *,
    spec: ModelSpec,
    version: str,
    record: AuditRecord,
    model_dir: Path,
    staged: list[InputFile],
    keys: list[str],
    spark: AbstractContextManager[SparkSession],
    log: PredictionLog,
    caller_id: str,
    input_uri: str,
    output_uri: str,
    storage_conn_id: str | None,
    chunk_rows: int,
    slice_rows: int,
    scratch: Path,
    screening: Screening,
    pii_columns: dict[str, list[str]],
) -> StageOutcome:
    import mlflow.pyfunc
    from pyspark.sql.types import ArrayType, DoubleType

    name = spec.name
    progress = _Progress()
    per_file: list[dict[str, Any]] = []
    local_out = scratch / OUTPUT_FILE
    metadata = {
        "modelops.model": name,
        "modelops.version": version,
        "modelops.champion_record_seq": str(record.seq),
        "modelops.caller_id": caller_id,
    }
    started = time.monotonic()
    with spark as session:
        spark_ready = time.monotonic()
        udf = mlflow.pyfunc.spark_udf(
            session, str(model_dir), result_type=ArrayType(DoubleType()), env_manager="local"
        )
        out = _ParquetOut(local_out, metadata)
        schema: list[pa.Schema] = []
        try:
            for index, file in enumerate(staged):
                rows = _score_file(
                    spark=session,
                    udf=udf,
                    spec=spec,
                    version=version,
                    file=file,
                    file_index=index,
                    keys=keys,
                    writer_schema=schema,
                    writer=out,
                    log=log,
                    caller_id=caller_id,
                    chunk_rows=chunk_rows,
                    slice_rows=slice_rows,
                    progress=progress,
                    screening=screening,
                    pii_columns=pii_columns,
                )
                per_file.append(
                    {
                        "name": file.name,
                        "uri": file.uri,
                        "sha256": file.sha256,
                        "bytes": file.bytes,
                        "rows": rows,
                    }
                )
                logger.info(
                    "scored %s: %d rows (%.1f s in Spark so far, %.1f s writing the prediction log)",
                    file.name,
                    rows,
                    progress.spark_seconds,
                    progress.log_seconds,
                )
        finally:
            out.close()
    if progress.rows == 0:
        raise BatchScoringRefused(
            f"input {input_uri} has a header but no data rows in any file; nothing to score"
        )
    target = as_storage_path(output_uri, storage_conn_id) / OUTPUT_FILE
    output_sha256 = copy_file(as_storage_path(local_out), target)
    output_bytes = local_out.stat().st_size
    total_seconds = time.monotonic() - started
    rows_per_second = progress.rows / progress.spark_seconds if progress.spark_seconds else None
    inputs = {"uri": input_uri, "files": per_file}
    details = {
        "model_name": name,
        "version": version,
        "champion_record_seq": record.seq,
        "input": inputs,
        "output": {"uri": str(target), "sha256": output_sha256, "bytes": output_bytes},
        "rows": progress.rows,
        "key_columns": keys,
        "caller_id": caller_id,
        "prediction_log_records": progress.chunks,
        "chunk_rows": chunk_rows,
        "pii": {"screening": screening.rules.pii, "masked_in_log": pii_columns},
    }
    timing = {
        "spark_start_seconds": round(spark_ready - started, 2),
        "scoring_seconds": round(progress.spark_seconds, 2),
        "prediction_log_seconds": round(progress.log_seconds, 2),
        "total_seconds": round(total_seconds, 2),
        "rows_per_second": round(rows_per_second, 1) if rows_per_second else None,
        "prediction_log_records_written": progress.chunks_logged,
    }
    return StageOutcome(
        decision=Decision.SCORED,
        summary=(
            f"{name}: v{version} scored {progress.rows} rows of {len(per_file)} file(s) into {target} "
            f"({progress.chunks} prediction-log record(s), {progress.chunks_logged} written now; Spark "
            f"started in {timing['spark_start_seconds']} s, scored at {timing['rows_per_second']} rows/s)"
        ),
        details={**details, **timing},
        records=(
            AuditEntry(
                AuditAction.BATCH_SCORED,
                model_subject(name, version),
                Decision.SCORED,
                details=details,
                evidence={"inputs": sha256_json(per_file), "output": output_sha256},
            ),
        ),
        asset_extra={
            EventField.MODEL_NAME: name,
            EventField.VERSION: version,
            "output_uri": str(target),
            EventField.SHA256: output_sha256,
            "rows": progress.rows,
        },
    )
