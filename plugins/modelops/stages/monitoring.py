"""Stage 5: drift monitoring of one served model.

Compares the predictions logged for one model in one window (the DAG run's data interval, so a backfill
of a past hour reproduces its verdict) with the training data of the version that served them, found
through its ``train_data_uri`` lineage tag. Evidently measures per-feature drift; the model's monitoring
policy (chosen by its risk tier) turns that into ok / warning / critical. Too few rows gives
``insufficient_data``: an empty hour is not an alert. A verdict the policy lists in
``request_retraining_on`` becomes a retraining request.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from modelops.errors import MonitoringError
from modelops.settings import Catalog, ModelSpec, MonitoringPolicy
from modelops.stages.outcome import AuditEntry, StageOutcome, sha256_json
from modelops.storage import as_storage_path, copy_file, read_dataset
from modelops.vocabulary import (
    DRIFT_RUN_KIND,
    SMOKE_TEST_CALLER,
    Alias,
    AuditAction,
    Decision,
    EventField,
    RunTag,
    Tag,
    model_subject,
)

if TYPE_CHECKING:
    import pandas as pd
    from airflow.sdk import ObjectStoragePath

    from modelops.registry import ModelRegistry
    from modelops.serving.prediction_log import PredictionLog

Verdict = Literal["ok", "warning", "critical", "insufficient_data"]


@dataclass
class DriftAssessment:
    verdict: Verdict
    rows: int
    reference_rows: int
    drift_share: float | None = None
    drifted_features: list[str] = field(default_factory=list)
    feature_scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    out_of_range_share: float | None = None
    out_of_range_features: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def out_of_range(
    current: pd.DataFrame, reference: pd.DataFrame, numeric: list[str]
) -> tuple[float, dict[str, int]]:
    """Share of rows with any numeric feature outside the training range, and counts per feature."""
    import pandas as pd

    flags = pd.DataFrame(index=current.index)
    for column in numeric:
        low, high = reference[column].min(), reference[column].max()
        flags[column] = (current[column] < low) | (current[column] > high)
    per_feature = {column: int(count) for column, count in flags.sum().items() if count}
    share = float(flags.any(axis=1).mean()) if len(flags) else 0.0
    return share, per_feature


def _drifted(method: str, value: float, threshold: float) -> bool:
    # Evidently reports p-values for statistical tests (drift when below the threshold) and distances
    # for the others (drift when at or above it).
    return value < threshold if "p_value" in method.lower() else value >= threshold


def assess_drift(
    *,
    current: pd.DataFrame,
    reference: pd.DataFrame,
    spec: ModelSpec,
    policy: MonitoringPolicy,
    html_path: str | None = None,
) -> DriftAssessment:
    """Classify one window. Writes Evidently's HTML report to ``html_path`` when given and rows suffice."""
    reference = reference[spec.features]
    if len(reference) > policy.reference_sample_rows:
        # Fixed seed: the same window against the same training data always gives the same verdict.
        reference = reference.sample(policy.reference_sample_rows, random_state=0).sort_index()
    if len(current) < policy.min_rows:
        return DriftAssessment(
            verdict="insufficient_data",
            rows=len(current),
            reference_rows=len(reference),
            reasons=[f"{len(current)} rows in the window, fewer than min_rows={policy.min_rows}"],
        )
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    current = current[spec.features].reset_index(drop=True)
    definition = DataDefinition(
        numerical_columns=spec.numeric_features, categorical_columns=spec.categorical_features
    )
    preset = DataDriftPreset(
        num_method=policy.numerical_method,
        num_threshold=policy.numerical_threshold,
        cat_method=policy.categorical_method,
        cat_threshold=policy.categorical_threshold,
    )
    snapshot = Report([preset]).run(
        current_data=Dataset.from_pandas(current, data_definition=definition),
        reference_data=Dataset.from_pandas(reference.reset_index(drop=True), data_definition=definition),
    )
    scores: dict[str, dict[str, Any]] = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric.get("config", {})
        column = config.get("column")
        if column and config.get("method") is not None and isinstance(metric.get("value"), int | float):
            value, threshold = float(metric["value"]), float(config.get("threshold"))
            scores[column] = {
                "method": config["method"],
                "value": round(value, 6),
                "threshold": threshold,
                "drifted": _drifted(config["method"], value, threshold),
            }
    drifted = sorted(column for column, score in scores.items() if score["drifted"])
    drift_share = len(drifted) / len(spec.features)
    oor_share, oor_features = out_of_range(current, reference, spec.numeric_features)

    reasons = []
    if drift_share >= policy.drift_share_critical:
        reasons.append(
            f"{len(drifted)}/{len(spec.features)} features drifted ({drift_share:.0%}) >= critical share"
        )
    elif drift_share >= policy.drift_share_warning:
        reasons.append(
            f"{len(drifted)}/{len(spec.features)} features drifted ({drift_share:.0%}) >= warning share"
        )
    if oor_share >= policy.out_of_range_share_critical:
        reasons.append(f"{oor_share:.1%} of rows hold values outside the training range {oor_features}")
    if drift_share >= policy.drift_share_critical or oor_share >= policy.out_of_range_share_critical:
        verdict: Verdict = "critical"
    elif drift_share >= policy.drift_share_warning:
        verdict = "warning"
    else:
        verdict = "ok"
    if html_path is not None:
        snapshot.save_html(html_path)
    return DriftAssessment(
        verdict=verdict,
        rows=len(current),
        reference_rows=len(reference),
        drift_share=round(drift_share, 6),
        drifted_features=drifted,
        feature_scores=scores,
        out_of_range_share=round(oor_share, 6),
        out_of_range_features=oor_features,
        reasons=reasons or ["no feature drifted beyond the thresholds"],
    )


# --- the window --------------------------------------------------------------------------------------


def monitoring_window(
    start_text: str | None,
    end_text: str | None,
    data_interval_start: datetime | None,
    data_interval_end: datetime | None,
) -> tuple[datetime, datetime]:
    """The window to assess: both ends given (ISO 8601, e.g. from the trigger form), else the run's data
    interval. A timestamp without a zone is read as UTC."""
    import pendulum

    start_text, end_text = (start_text or "").strip(), (end_text or "").strip()
    if start_text or end_text:
        if not (start_text and end_text):
            raise MonitoringError("give both window_start and window_end (ISO 8601), or neither")
        try:
            start, end = pendulum.parse(start_text), pendulum.parse(end_text)
        except (ValueError, pendulum.parsing.exceptions.ParserError) as exc:
            raise MonitoringError(f"window_start/window_end must be ISO 8601 timestamps: {exc}") from exc
        for name, value in (("window_start", start), ("window_end", end)):
            if not isinstance(value, datetime):
                raise MonitoringError(
                    f"{name} must be an ISO 8601 timestamp such as 2026-03-01T10:00:00Z, not a "
                    f"{type(value).__name__.lower()}"
                )
    else:
        start, end = data_interval_start, data_interval_end
        if start is None or end is None:
            raise MonitoringError(
                "this run has no data interval; the DAG needs an interval timetable, or give window_start/end"
            )
    if start >= end:
        raise MonitoringError(f"window_start {start} is not before window_end {end}")
    return start, end


def window_label(start: datetime, end: datetime) -> str:
    """How a window is named in run tags and file paths: ``START--END`` in ISO 8601."""
    return f"{start.isoformat()}--{end.isoformat()}"


# --- the MLflow run ----------------------------------------------------------------------------------


def log_assessment_run(
    *,
    registry: ModelRegistry,
    spec: ModelSpec,
    version: str,
    window_start: datetime,
    window_end: datetime,
    assessment: DriftAssessment,
    html_path: Path | None,
) -> str:
    """Log one window's assessment as an MLflow run in the model's experiment (metrics, verdict,
    Evidently's HTML report); returns the run id.

    One run per model and window: a retry or a backfill rerun of the same window adds to its run, so the
    MLflow UI shows each hour once.
    """
    identity = {
        str(RunTag.KIND): DRIFT_RUN_KIND,
        str(RunTag.MODEL): spec.name,
        str(RunTag.WINDOW): window_label(window_start, window_end),
    }
    metrics = {"rows": float(assessment.rows)}
    if assessment.drift_share is not None:
        metrics["drift_share"] = assessment.drift_share
    if assessment.out_of_range_share is not None:
        metrics["out_of_range_share"] = assessment.out_of_range_share
    return registry.log_run(
        experiment=spec.experiment_name,
        run_name=f"drift-{spec.name}-v{version}-{window_start:%Y%m%dT%H%M}",
        tags={**identity, str(RunTag.MODEL_VERSION): version, str(RunTag.VERDICT): assessment.verdict},
        metrics=metrics,
        json_artifacts={"drift/assessment.json": assessment.to_dict()},
        artifact_files={"drift": html_path} if html_path is not None else None,
        run_id=registry.find_run(spec.experiment_name, identity),
    )


# --- which models, and the stage ---------------------------------------------------------------------


def plan_monitoring(*, catalog: Catalog, registry: ModelRegistry, models: list[str]) -> list[dict[str, Any]]:
    """One entry ``{"model": name}`` per model to assess: the named ones (every catalog model when none
    is named) that serve, i.e. whose spec enables serving and that have a champion. An unknown name fails."""
    names = [name for name in dict.fromkeys(models or []) if name] or sorted(catalog.models)
    plan = []
    for name in names:
        spec = catalog.model(name)
        if spec.serving.enabled and Alias.CHAMPION in registry.aliases(name):
            plan.append({"model": name})
    return plan


def _served_version(window: pd.DataFrame, spec: ModelSpec) -> str:
    """The version that answered most rows of the window: its training data is the reference."""
    served = window["model_version"].dropna()
    if served.empty:
        raise MonitoringError(
            f"no prediction of {spec.name} in the window names the version that answered it, so there is "
            "no training data to compare with"
        )
    return str(served.mode().iloc[0])


def assess(
    *,
    spec: ModelSpec,
    policy: MonitoringPolicy,
    registry: ModelRegistry,
    prediction_log: PredictionLog,
    storage: ObjectStoragePath,
    start: datetime,
    end: datetime,
) -> StageOutcome:
    """Assess the predictions ``spec`` served in ``[start, end)`` against the served version's training
    data. Keeps ``assessment.json`` (and Evidently's report) under ``<storage>/monitoring/<model>/<window>/``
    and, when the window has rows, one MLflow run per window."""
    window = prediction_log.window(spec.name, start, end)
    # Deployment's smoke test scores rows of the training data itself: not traffic, so never evidence.
    window = window[window["caller_id"] != SMOKE_TEST_CALLER] if not window.empty else window
    report_dir = storage / "monitoring" / spec.name / window_label(start, end).replace(":", "")
    version = train_sha = mlflow_run_id = html_uri = html_sha256 = None
    if window.empty:
        assessment = DriftAssessment(
            verdict="insufficient_data", rows=0, reference_rows=0, reasons=["no predictions in the window"]
        )
        # A quiet hour is still a verdict about the version that was serving.
        champion = registry.version_by_alias(spec.name, Alias.CHAMPION)
        version = champion.version if champion is not None else None
    else:
        version = _served_version(window, spec)
        tags = registry.version(spec.name, version).tags
        train_sha, train_uri = tags.get(Tag.TRAIN_DATA_SHA256), tags.get(Tag.TRAIN_DATA_URI)
        if not train_sha or not train_uri:
            raise MonitoringError(
                f"{spec.name} v{version} has no {Tag.TRAIN_DATA_SHA256}/{Tag.TRAIN_DATA_URI} lineage tags, "
                "so there is no reference data to compare with"
            )
        missing = [column for column in spec.features if column not in window.columns]
        if missing:
            raise MonitoringError(
                f"the predictions of {spec.name} in the window lack the features {missing} its spec lists; "
                "callers must send every feature by name"
            )
        reference = read_dataset(train_uri, columns=spec.features)
        # Evidently writes local files only; render locally, then copy through ObjectStoragePath.
        with tempfile.TemporaryDirectory(prefix="modelops-drift-") as tmp:
            local_html = Path(tmp) / "drift_report.html"
            assessment = assess_drift(
                current=window[spec.features],
                reference=reference,
                spec=spec,
                policy=policy,
                html_path=str(local_html),
            )
            rendered = local_html if local_html.exists() else None
            if rendered is not None:
                target = report_dir / rendered.name
                html_sha256 = copy_file(as_storage_path(rendered), target)
                html_uri = str(target)
            mlflow_run_id = log_assessment_run(
                registry=registry,
                spec=spec,
                version=version,
                window_start=start,
                window_end=end,
                assessment=assessment,
                html_path=rendered,
            )
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "assessment.json").write_text(json.dumps(assessment.to_dict(), indent=2, sort_keys=True))

    evidence = {"assessment": sha256_json(assessment.to_dict()), "policy": sha256_json(policy.model_dump())}
    if html_sha256:
        evidence["drift_report_html"] = html_sha256
    if train_sha:
        evidence["reference_dataset"] = train_sha
    facts = {
        "window_start": start.isoformat(),
        "window_end": end.isoformat(),
        "report_uri": html_uri,
        "mlflow_run_id": mlflow_run_id,
    }
    return StageOutcome(
        decision=assessment.verdict,
        summary=f"{spec.name}: {assessment.verdict}: {assessment.rows} rows, "
        f"{len(assessment.drifted_features)} drifted features, window "
        f"{start.astimezone(UTC):%Y-%m-%d %H:%M}-{end.astimezone(UTC):%H:%M} UTC (policy {policy.name})",
        details={
            "model_name": spec.name,
            "version": version,
            "window_start": facts["window_start"],
            "window_end": facts["window_end"],
            "verdict": assessment.verdict,
            "rows": assessment.rows,
            "drift_share": assessment.drift_share,
            "drifted_features": assessment.drifted_features,
            "out_of_range_share": assessment.out_of_range_share,
            "report_uri": html_uri,
            "mlflow_run_id": mlflow_run_id,
            "request_retraining": assessment.verdict in policy.request_retraining_on,
        },
        records=(
            AuditEntry(
                AuditAction.DRIFT_ASSESSED,
                model_subject(spec.name, version),
                assessment.verdict,
                details={**facts, "policy": policy.name, **assessment.to_dict()},
                evidence=evidence,
            ),
        ),
    )


def retraining_request(assessment: dict[str, Any], policy: MonitoringPolicy) -> StageOutcome | None:
    """A retraining request for an assessment (the XCom of :func:`assess`) whose verdict ``policy`` lists
    in ``request_retraining_on``; None when the verdict does not call for one."""
    verdict = assessment.get("verdict")
    if verdict not in policy.request_retraining_on:
        return None
    name, version = assessment["model_name"], assessment["version"]
    reason = f"drift verdict {verdict} for window {assessment['window_start']}--{assessment['window_end']}"
    request = {
        EventField.MODEL_NAME: name,
        EventField.VERSION: version,
        "verdict": verdict,
        "reason": reason,
    }
    return StageOutcome(
        decision=Decision.REQUESTED,
        summary=f"retraining of {name} requested: {reason}",
        details=dict(request),
        records=(
            AuditEntry(
                AuditAction.RETRAINING_REQUESTED,
                model_subject(name, version),
                Decision.REQUESTED,
                details=dict(request),
                evidence={"assessment": sha256_json(assessment)},
            ),
        ),
        asset_extra=dict(request),
    )
