"""Stage 5: drift monitoring of the served model.

Compares the predictions logged in one window (the DAG run's data interval, so a backfill of a past
hour reproduces its verdict) with the training data of the version that served them, found through
its ``train_data_sha256`` lineage. Evidently measures per-feature drift; the thresholds in
``include/policies/monitoring.yaml`` turn that into ok / warning / critical. Too few rows gives
``insufficient_data``: an empty hour is not an alert.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from modelops.settings import ModelSpec, MonitoringPolicy

if TYPE_CHECKING:
    import pandas as pd

    from modelops.hooks.registry import MlflowRegistryHook

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


def log_assessment_run(
    *,
    registry: MlflowRegistryHook,
    experiment_name: str,
    model_name: str,
    version: str,
    window_start: datetime,
    window_end: datetime,
    assessment: DriftAssessment,
    html_path: Path | None,
) -> str:
    """Log one window's assessment as an MLflow run (metrics, verdict, Evidently's HTML report).

    One run per model and window: a retry or a backfill rerun of the same window reuses its run, so the
    MLflow UI shows each hour once.
    """
    import mlflow

    registry.activate()
    experiment = mlflow.set_experiment(experiment_name)
    window = f"{window_start.isoformat()}--{window_end.isoformat()}"
    existing = registry.client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.modelops_kind = 'drift_assessment' and tags.modelops_model = '{model_name}' "
        f"and tags.modelops_window = '{window}'",
        max_results=1,
    )
    tags = {
        "modelops_kind": "drift_assessment",
        "modelops_model": model_name,
        "modelops_model_version": version,
        "modelops_window": window,
        "modelops_verdict": assessment.verdict,
    }
    with mlflow.start_run(
        run_id=existing[0].info.run_id if existing else None,
        run_name=f"drift-{model_name}-v{version}-{window_start:%Y%m%dT%H%M}",
        tags=tags,
    ) as run:
        mlflow.set_tags(tags)
        metrics = {"rows": float(assessment.rows)}
        if assessment.drift_share is not None:
            metrics["drift_share"] = assessment.drift_share
        if assessment.out_of_range_share is not None:
            metrics["out_of_range_share"] = assessment.out_of_range_share
        mlflow.log_metrics(metrics)
        mlflow.log_dict(assessment.to_dict(), "drift/assessment.json")
        if html_path is not None and html_path.exists():
            mlflow.log_artifact(str(html_path), artifact_path="drift")
        return run.info.run_id
