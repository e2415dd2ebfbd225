"""Stage 5: drift monitoring of one served model.

Compares the predictions logged for one model in one window (the DAG run's data interval, so a backfill
of a past hour reproduces its verdict) with the training data of the version that served them, found
through its ``train_data_uri`` lineage tag. Evidently measures per-feature drift; the model's monitoring
policy (chosen by its risk tier) turns that into ok / warning / critical. Too few rows gives
``insufficient_data``: an empty hour is not an alert. A verdict the policy lists in
``request_retraining_on`` becomes a retraining request.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from modelops.errors import MonitoringError
from modelops.monitoring_history import HistoryRow, MonitoringHistory
from modelops.settings import Catalog, ModelSpec, MonitoringPolicy
from modelops.stages.outcome import AuditEntry, StageOutcome, sha256_json
from modelops.storage import as_storage_path, copy_file, read_dataset, sha256_of
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

    from modelops.audit import AuditRecord, AuditStore
    from modelops.monitoring_reference import ReferenceProfile
    from modelops.notifications import Alert
    from modelops.registry import ModelRegistry
    from modelops.serving.client import GatewayClient
    from modelops.serving.prediction_log import PredictionLog
    from modelops.stages.outcome import Recorder

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
    drift_level: Verdict | None = None
    """What drift alone says (ok / warning / critical); ``verdict`` also weighs the business metric."""
    business: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    callers: dict[str, Any] = field(default_factory=dict)
    prediction_drift: dict[str, Any] = field(default_factory=dict)
    """The model's outputs in the window against its outputs on the reference (the same statistic as a
    numeric feature's); empty when the reference has none."""
    reference: dict[str, Any] = field(default_factory=dict)
    """Which reference the window was compared with (source, profile sha256, rows)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def out_of_range(
    current: pd.DataFrame, reference: pd.DataFrame, numeric: list[str]
) -> tuple[float, dict[str, int]]:
    """Share of rows with any numeric feature outside the training range, and counts per feature."""
    from modelops.monitoring_reference import numeric_ranges

    return out_of_ranges(current, numeric_ranges(reference, numeric))


def out_of_ranges(
    current: pd.DataFrame, ranges: dict[str, list[float | None]]
) -> tuple[float, dict[str, int]]:
    """:func:`out_of_range` against ``{feature: [min, max]}`` of the reference (a profile's ``ranges``)."""
    import pandas as pd

    flags = pd.DataFrame(index=current.index)
    for column, (low, high) in ranges.items():
        values = pd.to_numeric(current[column], errors="coerce")
        outside = pd.Series(False, index=current.index)
        if low is not None:
            outside |= values < low
        if high is not None:
            outside |= values > high
        flags[column] = outside
    per_feature = {column: int(count) for column, count in flags.sum().items() if count}
    share = float(flags.any(axis=1).mean()) if len(flags) else 0.0
    return share, per_feature


def _drifted(method: str, value: float, threshold: float) -> bool:
    # Evidently reports p-values for statistical tests (drift when below the threshold) and distances
    # for the others (drift when at or above it).
    return value < threshold if "p_value" in method.lower() else value >= threshold


HTML_REPORT_ROWS = 20_000
"""Rows of the window Evidently's HTML report is drawn from (a fixed-seed sample of larger windows)."""


def _drift_scores(
    current: pd.DataFrame, reference: pd.DataFrame, spec: ModelSpec, policy: MonitoringPolicy
) -> dict[str, dict[str, Any]]:
    """Evidently's per-feature statistics, computed with scipy directly, one feature per thread.

    Hand-written because Evidently's Report costs ~12.6 s on a 1 M-row window against 1.8 s for the same
    statistics here (measured, benchmarks/bench_monitoring.py); the values are Evidently's definitions
    (normed Wasserstein: the distance over the reference's standard deviation, floored at 0.001;
    Jensen-Shannon distance of the category frequencies) and agree with its report to 1e-6
    (tests/unit/test_monitoring_alarms.py). Evidently still renders the HTML report. numpy's sorts and
    pandas' hashing release the GIL, so two threads use both cores of a small worker.
    """

    def one(column: str) -> tuple[str, dict[str, Any] | None]:
        if column in spec.numeric_features:
            return column, numeric_score(reference[column], current[column], policy)
        return column, _categorical_score(reference[column], current[column], policy)

    with ThreadPoolExecutor(max_workers=STATISTICS_THREADS) as pool:
        results = list(pool.map(one, spec.features))
    return {column: score for column, score in results if score is not None}


STATISTICS_THREADS = 2


def numeric_score(
    reference: Any, current: Any, policy: MonitoringPolicy, threshold: float | None = None
) -> dict[str, Any] | None:
    """Normed Wasserstein distance of one numeric column (None when either side has no value), judged
    against ``threshold`` (default: the policy's ``numerical_threshold``)."""
    import numpy as np
    from scipy.stats import wasserstein_distance

    ref, cur = pd_numeric(reference), pd_numeric(current)
    ref, cur = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
    if not len(ref) or not len(cur):
        return None
    # The window as distinct values with their counts: the same distance (scipy weighs each value by its
    # count), one sort of a million values instead of scipy's three, and integer features shrink to a few
    # hundred values.
    values, counts = np.unique(cur, return_counts=True)
    distance = wasserstein_distance(ref, values, v_weights=counts.astype("float64"))
    value = float(distance / max(float(np.std(ref)), 0.001))
    return _score("wasserstein", value, policy.numerical_threshold if threshold is None else threshold)


def _category_counts(values: Any) -> Any:
    """Rows per category, categories as text (``1`` and ``"1"`` are one category, as in the reference
    file). Counted first and turned into text after: a million rows hash faster than they convert."""
    counts = values.value_counts(dropna=True)
    return counts.groupby(counts.index.astype(str)).sum()


def _categorical_score(reference: Any, current: Any, policy: MonitoringPolicy) -> dict[str, Any] | None:
    from scipy.spatial.distance import jensenshannon

    ref_counts = _category_counts(reference)
    cur_counts = _category_counts(current)
    if ref_counts.empty or cur_counts.empty:
        return None
    categories = sorted(set(ref_counts.index) | set(cur_counts.index))
    ref_p = ref_counts.reindex(categories, fill_value=0).to_numpy(float)
    cur_p = cur_counts.reindex(categories, fill_value=0).to_numpy(float)
    value = float(jensenshannon(ref_p / ref_p.sum(), cur_p / cur_p.sum()))
    return _score("jensenshannon", value, policy.categorical_threshold)


def _score(method: str, value: float, threshold: float) -> dict[str, Any]:
    return {
        "method": method,
        "value": round(value, 6),
        "threshold": threshold,
        "drifted": _drifted(method, value, threshold),
    }


def _evidently_report(
    current: pd.DataFrame, reference: pd.DataFrame, spec: ModelSpec, policy: MonitoringPolicy
) -> Any:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    if len(current) > HTML_REPORT_ROWS:
        current = current.sample(HTML_REPORT_ROWS, random_state=0).sort_index()
    definition = DataDefinition(
        numerical_columns=spec.numeric_features, categorical_columns=spec.categorical_features
    )
    preset = DataDriftPreset(
        num_method=policy.numerical_method,
        num_threshold=policy.numerical_threshold,
        cat_method=policy.categorical_method,
        cat_threshold=policy.categorical_threshold,
    )
    return Report([preset]).run(
        current_data=Dataset.from_pandas(current.reset_index(drop=True), data_definition=definition),
        reference_data=Dataset.from_pandas(reference.reset_index(drop=True), data_definition=definition),
    )


_RANDOM_ID = re.compile(
    r"(?<![0-9a-fA-F])[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}(?![0-9a-fA-F])"
)


def stable_html(path: Path) -> None:
    """Replace the random uuids Evidently gives its widgets with numbers in order of appearance.

    Evidently names every widget with a fresh ``uuid4``, so the same report rendered twice has different
    bytes; with these replaced, a backfill of a window writes a byte-identical report and its sha256 in the
    audit record reproduces. Only ids are replaced (the same id the same way), never what the report shows.
    """
    seen: dict[str, str] = {}
    text = path.read_text(encoding="utf-8")
    path.write_text(
        _RANDOM_ID.sub(lambda match: seen.setdefault(match.group(0), f"{len(seen):032x}"), text),
        encoding="utf-8",
    )


def _evidently_scores(snapshot: Any) -> dict[str, dict[str, Any]]:
    """Per-feature scores from Evidently's report (for methods other than the two computed natively)."""
    scores: dict[str, dict[str, Any]] = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric.get("config", {})
        column = config.get("column")
        if column and config.get("method") is not None and isinstance(metric.get("value"), int | float):
            scores[column] = _score(config["method"], float(metric["value"]), float(config.get("threshold")))
    return scores


def assess_drift(
    *,
    current: pd.DataFrame,
    reference: pd.DataFrame,
    spec: ModelSpec,
    policy: MonitoringPolicy,
    html_path: str | None = None,
) -> DriftAssessment:
    """Classify one window against a reference DataFrame (profiled here; the stage reuses a stored
    profile instead). Writes Evidently's HTML report to ``html_path`` when given and rows suffice."""
    from modelops.monitoring_reference import build_profile

    profile = build_profile(
        reference,
        spec,
        sample_rows=policy.reference_sample_rows,
        source="training_data",
        source_sha256="",
    )
    return assess_against(current=current, profile=profile, spec=spec, policy=policy, html_path=html_path)


def assess_against(
    *,
    current: pd.DataFrame,
    profile: ReferenceProfile,
    spec: ModelSpec,
    policy: MonitoringPolicy,
    html_path: str | None = None,
    predictions: Any = None,
) -> DriftAssessment:
    """Classify one window against a reference profile: per-feature drift against its sample, values
    outside its ranges, and (``predictions`` given, and the profile has the model's outputs) prediction
    drift. Writes Evidently's HTML report to ``html_path`` when given and rows suffice."""
    reference = profile.sample_frame(spec)
    if len(current) < policy.min_rows:
        return DriftAssessment(
            verdict="insufficient_data",
            rows=len(current),
            reference_rows=len(reference),
            reasons=[f"{len(current)} rows in the window, fewer than min_rows={policy.min_rows}"],
        )
    # One copy of the feature columns (a million rows of 50 features is 400 MB); nothing below needs a
    # fresh index (the HTML sample resets its own).
    current = current[spec.features]
    native = (policy.numerical_method, policy.categorical_method) == ("wasserstein", "jensenshannon")
    snapshot = None
    if html_path is not None or not native:
        # Evidently renders (pure Python, ~2 s) in a thread while the statistics run: their sorts and
        # hashing release the GIL, so the two overlap on a second core.
        with ThreadPoolExecutor(max_workers=1) as renderer:
            rendering = renderer.submit(_evidently_report, current, reference, spec, policy)
            if native:
                scores = _drift_scores(current, reference, spec, policy)
            snapshot = rendering.result()
    else:
        scores = _drift_scores(current, reference, spec, policy)
    if not native:
        scores = _evidently_scores(snapshot)
    drifted = sorted(column for column, score in scores.items() if score["drifted"])
    drift_share = len(drifted) / len(spec.features)
    # Against the whole reference's range, not the sample's: a value the sample missed is not outside.
    oor_share, oor_features = out_of_ranges(current, profile.ranges)

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
    prediction_drift: dict[str, Any] = {}
    reference_predictions = profile.prediction_array()
    if predictions is not None and reference_predictions is not None:
        prediction_drift = (
            numeric_score(reference_predictions, predictions, policy, policy.prediction_threshold) or {}
        )
        if prediction_drift.get("drifted"):
            reasons.append(
                f"the model's outputs drifted from its outputs on the reference (normed Wasserstein "
                f"{prediction_drift['value']:.3f} >= {policy.prediction_threshold})"
            )
            if verdict == "ok":
                verdict = "warning"
    if html_path is not None and snapshot is not None:
        snapshot.save_html(html_path)
        stable_html(Path(html_path))
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
        prediction_drift=prediction_drift,
    )


CALLER_DRIFT_ROWS = 20_000
"""Rows of one caller that :func:`caller_drift` compares (a fixed-seed sample of a caller with more)."""


def caller_drift(
    window: pd.DataFrame, profile: ReferenceProfile, spec: ModelSpec, policy: MonitoringPolicy
) -> dict[str, dict[str, Any]]:
    """Drift per caller, for the callers with at least ``min_rows`` rows (the 10 with most): which
    features drifted in that caller's rows alone. Shows whether a shift is everyone's or one caller's."""
    if window.empty:
        return {}
    import numpy as np

    reference = profile.sample_frame(spec)
    counts = window["caller_id"].value_counts()
    positions = window.groupby("caller_id", sort=False).indices
    result: dict[str, dict[str, Any]] = {}
    for caller, rows in counts.head(10).items():
        if rows < policy.min_rows:
            continue
        taken = positions[caller]
        if len(taken) > CALLER_DRIFT_ROWS:  # a diagnostic: a fixed-seed sample is as telling
            taken = np.sort(np.random.default_rng(0).choice(taken, CALLER_DRIFT_ROWS, replace=False))
        scores = _drift_scores(window.iloc[taken][spec.features], reference, spec, policy)
        drifted = sorted(column for column, score in scores.items() if score["drifted"])
        result[str(caller)] = {
            "rows": int(rows),
            "drift_share": round(len(drifted) / len(spec.features), 6),
            "drifted_features": drifted,
        }
    return result


# --- the business metric, data quality, callers, and the correlated verdict ------------------------------

BASELINE_METRIC = {
    "click_through_rate": "holdout_positive_rate",
    "accuracy": "holdout_accuracy",
    "roc_auc": "holdout_roc_auc",
    "rmse": "holdout_rmse",
    "mae": "holdout_mae",
}
"""The holdout metric training recorded that is the serving version's own baseline for each business metric."""
HIGHER_IS_BETTER = {"click_through_rate", "accuracy", "roc_auc"}


def business_metric(
    window: pd.DataFrame, spec: ModelSpec, policy: MonitoringPolicy, baseline_metrics: dict[str, float] | None
) -> dict[str, Any]:
    """The spec's business metric over the window's labelled predictions, its coverage and its drop
    against the serving version's holdout baseline. Too few labels is ``pending_labels``: never a drop."""
    metric = policy.business.metric.get(spec.task)
    rows = len(window)
    labelled = window[window["label"].notna()] if rows else window
    coverage = len(labelled) / rows if rows else 0.0
    result: dict[str, Any] = {
        "metric": metric,
        "labelled_rows": len(labelled),
        "label_coverage": round(coverage, 6),
        "value": None,
        "baseline": None,
        "drop": None,
    }
    if metric is None:
        return {**result, "status": "not_configured"}
    baseline = (baseline_metrics or {}).get(BASELINE_METRIC[metric])
    result["baseline"] = None if baseline is None else round(float(baseline), 6)
    if len(labelled) < policy.business.min_labelled_rows or coverage < policy.business.min_label_coverage:
        return {**result, "status": "pending_labels"}
    value = metric_value(metric, labelled)
    if value is None:
        return {**result, "status": "pending_labels", "reason": "one class only among the labels"}
    result["value"] = round(value, 6)
    if baseline is None or not baseline:
        return {**result, "status": "no_baseline"}
    drop = _drop(metric, value, float(baseline))
    z = _z_score(metric, value, float(baseline), len(labelled))
    # Per caller too: an automatic action needs the drop in several callers' own rows, so one caller (who
    # can also post labels for its own requests) cannot fake it.
    floor = max(10, policy.business.min_labelled_rows // 4)
    by_caller = {}
    for caller, caller_rows in labelled.groupby("caller_id", sort=True):
        caller_value = metric_value(metric, caller_rows) if len(caller_rows) >= floor else None
        if caller_value is not None:
            caller_z = _z_score(metric, caller_value, float(baseline), len(caller_rows))
            by_caller[str(caller)] = {
                "labelled_rows": len(caller_rows),
                "value": round(caller_value, 6),
                "drop": round(_drop(metric, caller_value, float(baseline)), 6),
                "significant": caller_z is None or caller_z >= policy.business.min_z,
            }
    return {
        **result,
        "drop": round(drop, 6),
        "z": None if z is None else round(z, 3),
        "significant": z is None or z >= policy.business.min_z,
        "status": "measured",
        "by_caller": by_caller,
    }


def _z_score(metric: str, value: float, baseline: float, n: int) -> float | None:
    """How many standard errors a rate lies below its baseline (binomial, normal approximation); None for
    an error metric, whose drop is judged on its size alone."""
    if metric not in ("click_through_rate", "accuracy") or not 0 < baseline < 1 or n == 0:
        return None
    return (baseline - value) / (baseline * (1 - baseline) / n) ** 0.5


def _drop(metric: str, value: float, baseline: float) -> float:
    """Relative change for the worse: positive when the window is worse than the baseline."""
    change = (baseline - value) if metric in HIGHER_IS_BETTER else (value - baseline)
    return float(change / abs(baseline))


def metric_value(metric: str, labelled: pd.DataFrame) -> float | None:
    import numpy as np

    labels = labelled["label"].astype(float).to_numpy()
    predicted = pd_numeric(labelled["prediction"])
    if metric == "click_through_rate":
        value = float(labels.mean())
    elif metric == "accuracy":
        value = float(((predicted >= 0.5).astype(float) == labels).mean())
    elif metric == "roc_auc":
        from sklearn.metrics import roc_auc_score

        if len(set(labels.tolist())) < 2:
            return None
        value = float(roc_auc_score(labels, predicted))
    elif metric == "rmse":
        value = float(np.sqrt(np.mean((predicted - labels) ** 2)))
    else:
        value = float(np.mean(np.abs(predicted - labels)))
    return value


def pd_numeric(values: Any) -> Any:
    """``values`` (a Series or an array) as float64 numpy, anything not a number as NaN."""
    import pandas as pd

    if not isinstance(values, pd.Series):
        values = pd.Series(values, copy=False)
    return pd.to_numeric(values, errors="coerce").astype(float).to_numpy()


def cap_callers(window: pd.DataFrame, max_share: float | None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The window with no caller carrying more than ``max_share`` of its rows, and who called how much.

    A caller over the cap keeps its first rows in request order (deterministic, so a backfill of the window
    reproduces the verdict): rows at most ``max_share / (1 - max_share)`` times everyone else's. With a
    single caller there is nobody to weigh it against; its rows count, but an automatic action then needs
    more callers (``min_callers_for_action``).
    """
    if window.empty:
        return window, {"callers": 0, "rows_by_caller": {}, "capped": {}}
    counts = window["caller_id"].value_counts()
    capped: dict[str, int] = {}
    if max_share is not None and max_share < 1 and len(counts) > 1:
        total = int(counts.sum())
        limits = {}
        for caller, rows in counts.items():
            limit = max(1, int(max_share / (1 - max_share) * (total - int(rows))))
            if rows > limit:
                capped[str(caller)] = int(rows) - limit
                limits[caller] = limit
        if limits:
            # Each capped caller's first ``limit`` rows in window order (the window is in request order).
            rank = window.groupby("caller_id", sort=False).cumcount().to_numpy()
            allowed = window["caller_id"].map(limits).to_numpy(dtype="float64", na_value=float("inf"))
            window = window[rank < allowed]
    top = {str(caller): int(rows) for caller, rows in counts.head(10).items()}
    return window, {"callers": int(len(counts)), "rows_by_caller": top, "capped": capped}


def data_quality(window: pd.DataFrame, categories: dict[str, list[str]], spec: ModelSpec) -> dict[str, Any]:
    """Null rates per feature, and categories the reference never had (``categories``: a profile's; counted,
    values not quoted)."""
    nulls = {column: round(float(window[column].isna().mean()), 6) for column in spec.features if len(window)}
    unseen: dict[str, int] = {}
    for column in spec.categorical_features:
        known = set(categories.get(column, []))
        present = window[column].dropna().astype(str)
        count = int((~present.isin(known)).sum())
        if count:
            unseen[column] = count
    return {"null_rates": nulls, "unseen_category_rows": unseen}


def correlated_verdict(assessment: DriftAssessment, policy: MonitoringPolicy) -> tuple[Verdict, list[str]]:
    """The window's verdict from drift, the business metric and who called.

    Critical needs critical drift together with a business-metric drop of at least ``drop_critical``
    (unless the policy says drift suffices) and rows from ``min_callers_for_action`` callers: drift alone,
    or one caller alone, never pages and never rolls back. A pending metric is never counted as a drop.
    """
    if assessment.drift_level == "insufficient_data":
        return "insufficient_data", list(assessment.reasons)
    reasons = list(assessment.reasons)
    business = assessment.business
    measured = business.get("status") == "measured"
    # A drop within sampling noise (not significant) is reported, never counted.
    drop = business.get("drop") if measured and business.get("significant", True) else None
    if drop is not None:
        reasons.append(
            f"{business['metric']} {business['value']} against baseline {business['baseline']}: "
            f"{'drop' if drop > 0 else 'change'} of {drop:.1%} ({business['labelled_rows']} labelled rows)"
        )
    elif measured:
        reasons.append(
            f"{business['metric']} {business['value']} against baseline {business['baseline']}: a change of "
            f"{business['drop']:.1%} within sampling noise (z={business.get('z')}), not counted as a drop"
        )
    elif business.get("status") == "pending_labels":
        reasons.append(
            f"{business.get('metric')} pending: {business.get('labelled_rows', 0)} labelled rows "
            f"({business.get('label_coverage', 0):.0%} coverage) are too few to judge; re-assessed when labels arrive"
        )
    dropped = drop is not None and drop >= policy.business.drop_critical
    verdict: Verdict = "ok"
    if assessment.drift_level == "critical" and (dropped or not policy.critical_requires_business_drop):
        verdict = "critical"
    elif assessment.drift_level in ("warning", "critical") or (
        drop is not None and drop >= policy.business.drop_warning
    ):
        verdict = "warning"
        if assessment.drift_level == "critical":
            reasons.append("critical drift without a business-metric drop is a warning")
    if verdict == "critical" and policy.critical_requires_business_drop:
        witnesses = sorted(
            caller
            for caller, seen in business.get("by_caller", {}).items()
            if seen["drop"] >= policy.business.drop_critical and seen.get("significant", True)
        )
        if len(witnesses) < policy.min_callers_for_action:
            verdict = "warning"
            reasons.append(
                f"the drop shows in the rows of {len(witnesses)} caller(s) only: an automatic action needs "
                f"{policy.min_callers_for_action}"
            )
    return verdict, reasons


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


def _baseline_metrics(audit: AuditStore | None, name: str, version: str) -> dict[str, float] | None:
    """The serving version's holdout metrics as training recorded them (authentic), or None."""
    from modelops.evidence import EvidenceMismatch, registration_record

    if audit is None:
        return None
    try:
        record = registration_record(audit, name, version)
    except EvidenceMismatch:
        return None
    return {str(k): float(v) for k, v in record.details.get("metrics", {}).items()}


# --- the reference ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceChoice:
    """The profile a window is compared with, where it is kept, and the audit record to write when this is
    the first time the version's reference was set (``records``)."""

    profile: ReferenceProfile
    requested: str
    profile_uri: str | None
    records: tuple[AuditEntry, ...] = ()

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.profile.source,
            "requested": self.requested,
            "source_sha256": self.profile.source_sha256,
            "profile_sha256": self.profile.sha256,
            "rows": self.profile.rows,
            "sample_rows": self.profile.sample_rows,
            "window": self.profile.details.get("window"),
            "predictions": "model outputs"
            if self.profile.predictions is not None
            else self.profile.predictions_note,
        }


def _promotion(audit: AuditStore, model: str, version: str) -> tuple[AuditRecord | None, list[int]]:
    """The version's newest authentic promotion record (and the seqs of forged ones skipped)."""
    from modelops.evidence import newest_authentic

    return newest_authentic(
        audit, AuditAction.MODEL_DEPLOYED, model_subject(model, version), {Decision.PROMOTED}
    )


def _promoted_at(audit: AuditStore, model: str, version: str) -> datetime | None:
    promoted, _ = _promotion(audit, model, version)
    return None if promoted is None else datetime.fromisoformat(promoted.recorded_at)


def _profile_path(storage: ObjectStoragePath, model: str, version: str, source: str) -> ObjectStoragePath:
    return storage / "monitoring" / model / "reference" / f"v{version}-{source}.json"


def reference_for_window(
    *,
    spec: ModelSpec,
    policy: MonitoringPolicy,
    version: str,
    start: datetime,
    registry: ModelRegistry,
    prediction_log: PredictionLog,
    storage: ObjectStoragePath,
    audit: AuditStore | None,
    history: MonitoringHistory | None,
    train_uri: str,
    train_sha: str,
) -> ReferenceChoice:
    """What the window starting at ``start`` is compared with.

    During the version's cold start (``cold_start_days`` from its promotion record) and whenever the policy
    says ``training_data``: its training data. After the cold start, with ``production_window``: the
    version's own traffic of the last ``production_window_hours`` of its cold start, if that traffic is
    usable (enough rows and callers, no window of it judged critical), else the training data. Which one
    is decided once per version and recorded (``monitoring.reference_set``); the profile is built once,
    kept under ``<storage>/monitoring/<model>/reference/``, and reused while its sha256 matches the record;
    a missing or altered profile is rebuilt from its source and must come out byte-identical, or the window
    stops with an error naming the record. Which reference a window gets depends only on its start and
    the version's promotion time, so a backfill gets the reference its hour had.
    """
    from datetime import timedelta

    requested = str(Decision.TRAINING_DATA)
    promoted_at = cold_end = None
    if audit is not None and policy.reference.after_cold_start == Decision.PRODUCTION_WINDOW:
        promoted_at = _promoted_at(audit, spec.name, version)
        if promoted_at is not None:
            cold_end = promoted_at + timedelta(days=policy.cold_start_days)
            if start >= cold_end:
                requested = str(Decision.PRODUCTION_WINDOW)

    def training() -> ReferenceProfile:
        return _training_profile(spec, policy, version, registry, audit, train_uri, train_sha)

    if audit is None:  # nothing to record a choice in: the training data, profiled for this window only
        return ReferenceChoice(training(), requested, None)
    subject = model_subject(spec.name, version)
    recorded = None
    for record in reversed(audit.records(action=AuditAction.MONITORING_REFERENCE_SET, subject=subject)):
        if record.details.get("requested") == requested and audit.authentic(record):
            recorded = record
            break
    if recorded is not None:
        if recorded.decision == Decision.TRAINING_DATA and recorded.details.get("source_sha256") != train_sha:
            raise MonitoringError(
                f"the reference of {spec.name} v{version} on record (audit seq={recorded.seq}) was built from "
                f"training data with sha256 {str(recorded.details.get('source_sha256'))[:12]}..., but the "
                f"version's {Tag.TRAIN_DATA_SHA256} tag now says {train_sha[:12]}...: the lineage tag was "
                "changed; restore it from the registration record"
            )
        return ReferenceChoice(
            _recorded_profile(recorded, spec, policy, version, prediction_log, storage, training),
            requested,
            str(recorded.details.get("profile_uri")),
        )

    reason = (
        "the policy compares with the training data"
        if policy.reference.after_cold_start == Decision.TRAINING_DATA
        else "the version's cold start: its first windows are compared with its training data"
    )
    profile = None
    if requested == Decision.PRODUCTION_WINDOW and promoted_at is not None and cold_end is not None:
        window_start = max(promoted_at, cold_end - timedelta(hours=policy.reference.production_window_hours))
        profile, problem = _production_profile(
            spec, policy, version, window_start, cold_end, prediction_log, history, check_usable=True
        )
        if profile is None:
            reason = (
                f"the production window is not usable, so the training data stays the reference: {problem}"
            )
        else:
            reason = (
                f"cold start over ({policy.cold_start_days:g} days since promotion): the version's own traffic "
                f"of {window_start.isoformat()} to {cold_end.isoformat()} is the reference"
            )
    if profile is None:
        profile = training()
    location = _profile_path(storage, spec.name, version, profile.source)
    location.parent.mkdir(parents=True, exist_ok=True)
    location.write_bytes(profile.to_json())
    # The assessment names the profile by its sha256 only (where it is kept is no part of a verdict); the
    # record says where.
    details = {
        "requested": requested,
        "reason": reason,
        "profile_uri": str(location),
        **ReferenceChoice(profile, requested, str(location)).summary(),
    }
    record = AuditEntry(
        AuditAction.MONITORING_REFERENCE_SET,
        subject,
        Decision(profile.source),
        details=details,
        evidence={"profile": profile.sha256, "source": profile.source_sha256},
    )
    return ReferenceChoice(profile, requested, str(location), (record,))


def _recorded_profile(
    record: AuditRecord,
    spec: ModelSpec,
    policy: MonitoringPolicy,
    version: str,
    prediction_log: PredictionLog,
    storage: ObjectStoragePath,
    training: Any,
) -> ReferenceProfile:
    """The profile an authentic record names: read back if its bytes match, else rebuilt from its source
    and required to match."""
    from modelops.monitoring_reference import ReferenceProfile

    expected = str(record.details.get("profile_sha256"))
    location = as_storage_path(str(record.details.get("profile_uri")))
    data = location.read_bytes() if location.exists() else None
    if data is not None and hashlib.sha256(data).hexdigest() == expected:
        profile = ReferenceProfile.from_json(data)
        object.__setattr__(profile, "_sha256", expected)  # the bytes just hashed are its canonical JSON
        return profile
    if record.decision == Decision.PRODUCTION_WINDOW:
        window = record.details.get("window") or {}
        profile, _problem = _production_profile(
            spec,
            policy,
            version,
            datetime.fromisoformat(window["start"]),
            datetime.fromisoformat(window["end"]),
            prediction_log,
            None,
            check_usable=False,
        )
    else:
        profile = training()
    if profile is None or profile.sha256 != expected:
        raise MonitoringError(
            f"the reference profile of {spec.name} v{version} at {location} "
            f"{'was altered' if data is not None else 'is missing'}, and rebuilding it from its source "
            f"({record.decision}) does not give the profile audit record seq={record.seq} names: its source "
            "changed since. Restore the source, or retire the version; monitoring will not compare with a "
            "reference nobody recorded"
        )
    location.parent.mkdir(parents=True, exist_ok=True)
    location.write_bytes(profile.to_json())
    return profile


def _training_profile(
    spec: ModelSpec,
    policy: MonitoringPolicy,
    version: str,
    registry: ModelRegistry,
    audit: AuditStore | None,
    train_uri: str,
    train_sha: str,
) -> ReferenceProfile:
    from modelops.monitoring_reference import build_profile, sample_of

    # The reference must be the bytes the version was trained on: a file changed since is not evidence.
    # Checked when the profile is built; afterwards the profile's own record is what is checked.
    found_sha = sha256_of(as_storage_path(train_uri))[0]
    if found_sha != train_sha:
        raise MonitoringError(
            f"the training data of {spec.name} v{version} at {train_uri} has sha256 {found_sha[:12]}..., not "
            f"the {train_sha[:12]}... the version was trained on: it changed since; restore the validated "
            "snapshot (or retrain) before this window can be assessed"
        )
    reference = read_dataset(train_uri, columns=spec.features)
    sample = sample_of(reference[spec.features], policy.reference_sample_rows)
    predictions, note = _model_outputs(spec, version, registry, audit, sample)
    return build_profile(
        reference,
        spec,
        sample_rows=policy.reference_sample_rows,
        source=str(Decision.TRAINING_DATA),
        source_sha256=train_sha,
        predictions=predictions,
        predictions_note=note,
        details={"uri": train_uri},
    )


def _model_outputs(
    spec: ModelSpec, version: str, registry: ModelRegistry, audit: AuditStore | None, sample: pd.DataFrame
) -> tuple[list[float] | None, str]:
    """The version's outputs on the reference sample (p1 of a probability pair), for prediction drift.

    Loading a model runs its code, so only files its promotion record names are loaded (as the gateway
    does); a version with no promotion record has no outputs here, and the note says so.
    """
    import numpy as np
    from mlflow.exceptions import MlflowException

    from modelops.evidence import EvidenceMismatch, check_files, hash_tree, recorded_files

    if audit is None:
        return None, "no audit log to find the version's promotion record in"
    promoted, _ = _promotion(audit, spec.name, version)
    if promoted is None:
        return (
            None,
            f"v{version} has no promotion record, so its files were not loaded to score the reference",
        )
    with tempfile.TemporaryDirectory(prefix="modelops-reference-") as folder:
        model_dir = registry.download_version(spec.name, version, Path(folder))
        try:
            check_files(
                recorded_files(promoted),
                hash_tree(model_dir),
                what=f"v{version}'s files differ from those its promotion record names",
            )
        except EvidenceMismatch as exc:
            raise MonitoringError(f"{exc}; the model serving traffic is not the one approved") from exc
        import mlflow.pyfunc

        try:
            outputs = np.asarray(mlflow.pyfunc.load_model(str(model_dir)).predict(sample))
        except (MlflowException, ValueError, TypeError, KeyError) as exc:
            return None, f"v{version} could not score the reference sample ({type(exc).__name__})"
    if outputs.ndim == 2 and outputs.shape[1] in (1, 2):
        outputs = outputs[:, -1]
    if outputs.ndim != 1 or len(outputs) != len(sample):
        return None, f"v{version}'s outputs have shape {outputs.shape}, not one number per row"
    return [float(value) for value in outputs.astype("float64")], ""


def _production_profile(
    spec: ModelSpec,
    policy: MonitoringPolicy,
    version: str,
    start: datetime,
    end: datetime,
    prediction_log: PredictionLog,
    history: MonitoringHistory | None,
    *,
    check_usable: bool,
) -> tuple[ReferenceProfile | None, str]:
    """A profile of ``version``'s own traffic in ``[start, end)``, as a window would be assessed (smoke tests
    left out, no caller over its share), or None and why it is not usable."""
    from modelops.monitoring_reference import build_profile, frame_sha256, sample_of

    if start >= end:
        return None, f"the cold start ended at {end.isoformat()}, before any traffic of the version"
    frame = prediction_log.window(spec.name, start, end, features=spec.features)
    if not frame.empty:
        frame = frame[(frame["caller_id"] != SMOKE_TEST_CALLER) & (frame["model_version"] == str(version))]
    frame, callers = cap_callers(frame, policy.max_caller_share)
    if check_usable:
        if len(frame) < policy.min_rows:
            return None, f"{len(frame)} rows of v{version} in it, fewer than min_rows={policy.min_rows}"
        if callers["callers"] < policy.min_callers_for_action:
            return None, (
                f"{callers['callers']} caller(s) in it: a reference needs the traffic of "
                f"min_callers_for_action={policy.min_callers_for_action}"
            )
        critical = [
            row.window_start.isoformat()
            for row in (history.rows(spec.name, since=start, until=end) if history is not None else [])
            if row.model_version == str(version) and row.verdict == "critical"
        ]
        if critical:
            return None, f"windows of it were judged critical (starting {', '.join(critical[:3])})"
    frame = frame.reset_index(drop=True)
    sample = sample_of(frame, policy.reference_sample_rows)
    return (
        build_profile(
            frame,
            spec,
            sample_rows=policy.reference_sample_rows,
            source=str(Decision.PRODUCTION_WINDOW),
            source_sha256=frame_sha256(frame[[*spec.features, "prediction", "request_id", "row_index"]]),
            predictions=[float(v) for v in pd_numeric(sample["prediction"])],
            details={"window": {"start": start.isoformat(), "end": end.isoformat()}, "callers": callers},
        ),
        "",
    )


def assess(
    *,
    spec: ModelSpec,
    policy: MonitoringPolicy,
    registry: ModelRegistry,
    prediction_log: PredictionLog,
    storage: ObjectStoragePath,
    start: datetime,
    end: datetime,
    audit: AuditStore | None = None,
    history: MonitoringHistory | None = None,
) -> StageOutcome:
    """Assess the predictions ``spec`` served in ``[start, end)``: drift against the served version's
    training data, the business metric from delayed labels against the version's own baseline, data
    quality, error rate and latency, who called; then the correlated verdict. Keeps ``assessment.json`` (and
    Evidently's report) under ``<storage>/monitoring/<model>/<window>/``, one MLflow run per window with
    rows, and one history row per model, version and window."""
    window = prediction_log.window(spec.name, start, end, features=spec.features)
    # Deployment's smoke test scores rows of the training data itself: not traffic, so never evidence.
    if not window.empty:
        traffic = (window["caller_id"] != SMOKE_TEST_CALLER).to_numpy()
        if not traffic.all():  # a copy of a large window only when there is something to leave out
            window = window[traffic]
    report_dir = storage / "monitoring" / spec.name / window_label(start, end).replace(":", "")
    version = train_sha = mlflow_run_id = html_uri = html_sha256 = None
    reference_records: tuple[AuditEntry, ...] = ()
    if window.empty:
        assessment = DriftAssessment(
            verdict="insufficient_data", rows=0, reference_rows=0, reasons=["no predictions in the window"]
        )
        assessment.drift_level = "insufficient_data"
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
        empty = [column for column in spec.features if window[column].isna().all()]
        if empty:
            raise MonitoringError(
                f"the predictions of {spec.name} in the window carry no value for the features {empty} its "
                "spec lists; callers must send every feature by name"
            )
        capped, callers = cap_callers(window, policy.max_caller_share)
        choice = reference_for_window(
            spec=spec,
            policy=policy,
            version=version,
            start=start,
            registry=registry,
            prediction_log=prediction_log,
            storage=storage,
            audit=audit,
            history=history,
            train_uri=train_uri,
            train_sha=train_sha,
        )
        reference_records = choice.records
        profile = choice.profile
        # Evidently writes local files only; render locally, then copy through ObjectStoragePath.
        with tempfile.TemporaryDirectory(prefix="modelops-drift-") as tmp:
            local_html = Path(tmp) / "drift_report.html"
            assessment = assess_against(
                current=capped,
                profile=profile,
                spec=spec,
                policy=policy,
                html_path=str(local_html) if policy.html_report else None,
                predictions=pd_numeric(capped["prediction"]),
            )
            assessment.drift_level = assessment.verdict
            assessment.reference = choice.summary()
            callers["drift_by_caller"] = caller_drift(capped, profile, spec, policy)
            assessment.callers = callers
            assessment.quality = data_quality(capped, profile.categories, spec)
            assessment.business = business_metric(
                capped, spec, policy, _baseline_metrics(audit, spec.name, version)
            )
            assessment.verdict, assessment.reasons = correlated_verdict(assessment, policy)
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
    stats = prediction_log.request_stats(spec.name, start, end)
    assessment.quality = {
        **assessment.quality,
        "requests": stats.requests,
        "failed_requests": stats.failed,
        "error_rate": stats.error_rate,
        "latency_ms": {"p50": stats.p50_ms, "p95": stats.p95_ms, "p99": stats.p99_ms},
        # Refused label deliveries name no model (an unknown request id has none): the gateway's count for
        # every model in the window's hours, so labels sent for made-up requests show up somewhere.
        "label_deliveries_all_models": prediction_log.label_rejections(start, end),
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "assessment.json").write_text(json.dumps(assessment.to_dict(), indent=2, sort_keys=True))
    assessment_sha = sha256_json(assessment.to_dict())

    evidence = {"assessment": assessment_sha, "policy": sha256_json(policy.model_dump())}
    if html_sha256:
        evidence["drift_report_html"] = html_sha256
    if train_sha:
        evidence["reference_dataset"] = train_sha
    if assessment.reference:
        evidence["reference_profile"] = assessment.reference["profile_sha256"]
    facts = {
        "window_start": start.isoformat(),
        "window_end": end.isoformat(),
        "report_uri": html_uri,
        "mlflow_run_id": mlflow_run_id,
    }
    business = assessment.business
    effects: tuple[Any, ...] = ()
    if history is not None and version is not None:
        row = HistoryRow(
            model_name=spec.name,
            model_version=str(version),
            window_start=start,
            window_end=end,
            verdict=assessment.verdict,
            rows=assessment.rows,
            assessed_at=datetime.now(UTC),
            metrics={
                "drift_share": assessment.drift_share,
                "out_of_range_share": assessment.out_of_range_share,
                "business_metric": business.get("value"),
                "business_baseline": business.get("baseline"),
                "business_drop": business.get("drop"),
                "label_coverage": business.get("label_coverage"),
                "labelled_rows": business.get("labelled_rows"),
                "error_rate": stats.error_rate,
                "latency_p95_ms": stats.p95_ms,
            },
            report_sha256=assessment_sha,
            details={
                "drift_level": assessment.drift_level,
                "business_status": business.get("status"),
                "report_uri": html_uri,
                "mlflow_run_id": mlflow_run_id,
            },
        )
        effects = (lambda: history.upsert(row),)
    return StageOutcome(
        decision=assessment.verdict,
        summary=f"{spec.name}: {assessment.verdict}: {assessment.rows} rows, "
        f"{len(assessment.drifted_features)} drifted features"
        + (
            f", {business['metric']} {business['value']} (baseline {business['baseline']})"
            if business.get("status") == "measured"
            else (
                f", {business.get('metric')} pending labels"
                if business.get("status") == "pending_labels"
                else ""
            )
        )
        + f", window {start.astimezone(UTC):%Y-%m-%d %H:%M}-{end.astimezone(UTC):%H:%M} UTC (policy {policy.name})",
        details={
            "model_name": spec.name,
            "version": version,
            "window_start": facts["window_start"],
            "window_end": facts["window_end"],
            "verdict": assessment.verdict,
            "drift_level": assessment.drift_level,
            "rows": assessment.rows,
            "drift_share": assessment.drift_share,
            "drifted_features": assessment.drifted_features,
            "out_of_range_share": assessment.out_of_range_share,
            "business": business,
            "report_uri": html_uri,
            "report_sha256": assessment_sha,
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
            *reference_records,
        ),
        effects=effects,
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


def windows_to_reassess(
    history: MonitoringHistory,
    prediction_log: PredictionLog,
    spec: ModelSpec,
    policy: MonitoringPolicy,
    before: datetime,
) -> list[tuple[datetime, datetime]]:
    """Earlier windows whose business metric was pending labels and that have more labels now, oldest
    first: a later run assesses them again, so a drop shows up when its labels arrive."""
    from datetime import timedelta

    if policy.reassess_pending_hours <= 0:
        return []
    since = before - timedelta(hours=policy.reassess_pending_hours)
    due = []
    for row in history.rows(spec.name, since=since, until=before):
        if (row.details or {}).get("business_status") != "pending_labels" or row.window_end > before:
            continue
        labelled_then = int(row.metrics.get("labelled_rows") or 0)
        window = prediction_log.window(spec.name, row.window_start, row.window_end, features=[])
        if int(window["label"].notna().sum()) > labelled_then:
            due.append((row.window_start, row.window_end))
    return due


# --- alerts -----------------------------------------------------------------------------------------------

ALERT_TIERS = ("warning", "critical")


def _last_alert(audit: AuditStore, model: str) -> AuditRecord | None:
    """The newest authentic alert about ``model`` (any version) that was sent: cool-downs and recoveries
    count from it."""
    for record in reversed(
        audit.records(action=AuditAction.ALERT_NOTIFIED, subject_prefix=model_subject(model, ""))
    ):
        if record.decision == Decision.SENT and audit.authentic(record):
            return record
    return None


@dataclass(frozen=True)
class AlertPlan:
    """What to do about one assessment: send ``alert``, or record why not (``suppressed_because``)."""

    alert: Alert | None
    suppressed_because: str | None = None
    dedup_key: str | None = None
    tier: str | None = None


def _cold_start(
    audit: AuditStore, model: str, version: Any, policy: MonitoringPolicy, now: datetime
) -> str | None:
    """Why alerts about ``version`` are recorded but not sent yet (its first ``cold_start_days``), or None."""
    if not version or policy.cold_start_days <= 0:
        return None
    promoted, _ = _promotion(audit, model, str(version))
    if promoted is None:
        return None
    since = datetime.fromisoformat(promoted.recorded_at)
    if (now - since).total_seconds() >= policy.cold_start_days * 86400:
        return None
    until = since.timestamp() + policy.cold_start_days * 86400
    return (
        f"cold start: v{version} serves since {since.isoformat()} (audit seq={promoted.seq}); alerts are "
        f"recorded, not sent, until {datetime.fromtimestamp(until, UTC).isoformat()} "
        f"(cold_start_days={policy.cold_start_days:g})"
    )


def plan_alert(
    assessment: dict[str, Any], spec: ModelSpec, policy: MonitoringPolicy, audit: AuditStore, now: datetime
) -> AlertPlan | None:
    """Whether an assessment (the XCom of :func:`assess`) raises an alert to the model's owners.

    A warning or critical verdict alerts, once per condition within ``alert_cooldown_hours`` (the same
    condition again is recorded as suppressed); the first ``ok`` after an alert sends one recovery. None:
    nothing to say.
    """
    from modelops.notifications import Alert

    model, version, verdict = spec.name, assessment.get("version"), assessment.get("verdict")
    cold = _cold_start(audit, model, version, policy, now)
    last = _last_alert(audit, model)
    window = {
        "window_start": datetime.fromisoformat(assessment["window_start"]),
        "window_end": datetime.fromisoformat(assessment["window_end"]),
    }
    business = assessment.get("business") or {}
    if verdict in ALERT_TIERS:
        condition = f"{verdict}.drift-{assessment.get('drift_level')}.business-{business.get('status')}"
        dedup_key = f"{model}.v{version}.{condition}"
        if last is not None and last.details.get("dedup_key") == dedup_key:
            age = now - datetime.fromisoformat(last.recorded_at)
            if age.total_seconds() < policy.alert_cooldown_hours * 3600:
                return AlertPlan(
                    None,
                    f"the same alert was raised {age.total_seconds() / 60:.0f} min ago (audit seq={last.seq}); "
                    f"cool-down {policy.alert_cooldown_hours:g} h",
                    dedup_key,
                    verdict,
                )
        if cold is not None:
            return AlertPlan(None, cold, dedup_key, verdict)
        drop = business.get("drop")
        title = f"{verdict.upper()}: {len(assessment.get('drifted_features') or [])} drifted features" + (
            f", {business.get('metric')} down {drop:.1%} against its baseline" if drop else ""
        )
        body = (
            f"{model} v{version}, window {assessment['window_start']} to {assessment['window_end']}: "
            f"{assessment.get('rows')} rows, drift {assessment.get('drift_level')}, drifted features "
            f"{assessment.get('drifted_features')}, business metric {business.get('metric')} "
            f"{business.get('status')} (value {business.get('value')}, baseline {business.get('baseline')}). "
            + (
                "Critical: the previous approved version is put back and retraining is requested. "
                if verdict == "critical" and policy.rollback_on_critical
                else ""
            )
            + f"Report: {assessment.get('report_uri')}"
        )
        return AlertPlan(
            Alert(
                model_name=model,
                version=str(version),
                tier=verdict,
                title=title,
                body=body,
                dedup_key=dedup_key,
                recipients=[spec.owner],
                **window,
            ),
            dedup_key=dedup_key,
            tier=verdict,
        )
    if verdict == "ok" and cold is None and last is not None and last.details.get("tier") in ALERT_TIERS:
        dedup_key = f"{model}.v{version}.recovered"
        return AlertPlan(
            Alert(
                model_name=model,
                version=str(version),
                tier="recovered",
                title=f"recovered: {model} v{version} is ok again",
                body=f"The window {assessment['window_start']} to {assessment['window_end']} is ok; the last "
                f"alert was {last.details.get('tier')} (audit seq={last.seq}).",
                dedup_key=dedup_key,
                recipients=[spec.owner],
                **window,
            ),
            dedup_key=dedup_key,
            tier="recovered",
        )
    return None


def alert_record(
    spec: ModelSpec, version: str | None, plan: AlertPlan, deliveries: list[dict[str, Any]] | None
) -> AuditEntry:
    """The audit record of an alert: sent with every channel's delivery, suppressed, or failed on all."""
    if plan.alert is None:
        decision, extra = Decision.SUPPRESSED, {"reason": plan.suppressed_because}
    else:
        delivered = any(item.get("delivered") for item in deliveries or [])
        decision = Decision.SENT if delivered else Decision.FAILED
        extra = {
            "title": plan.alert.title,
            "recipients": plan.alert.recipients,
            "deliveries": deliveries or [],
        }
    return AuditEntry(
        AuditAction.ALERT_NOTIFIED,
        model_subject(spec.name, version),
        decision,
        details={"tier": plan.tier, "dedup_key": plan.dedup_key, **extra},
    )


# --- automatic rollback -------------------------------------------------------------------------------------


def roll_back_on_critical(
    *,
    spec: ModelSpec,
    policy: MonitoringPolicy,
    assessment: dict[str, Any],
    registry: ModelRegistry,
    gateway: GatewayClient,
    audit: AuditStore,
    record: Recorder,
) -> StageOutcome | None:
    """Put the previous approved champion back when the verdict is critical (None: nothing to do).

    Through the deployment path's checks: the version going back must have an authentic promotion record
    and files unchanged since; the rollback is recorded before the alias moves, so the gateway accepts it.
    """
    from modelops.evidence import CHAMPION_FIELD, champion_record
    from modelops.stages.deployment import roll_back_to_previous

    if assessment.get("verdict") != "critical" or not policy.rollback_on_critical:
        return None
    model, assessed = spec.name, str(assessment.get("version"))
    current = champion_record(audit, model)
    serving = None if current is None else str(current.details.get(CHAMPION_FIELD))
    if serving != assessed:
        return StageOutcome(
            decision=Decision.REFUSED,
            summary=f"{model}: no rollback: v{assessed} was assessed but v{serving} serves now",
            details={"model_name": model, "version": assessed, "serving": serving},
            records=(
                AuditEntry(
                    AuditAction.MODEL_ROLLED_BACK,
                    model_subject(model, assessed),
                    Decision.REFUSED,
                    details={"reason": f"v{assessed} no longer serves (v{serving} does)"},
                ),
            ),
        )
    reason = (
        f"critical monitoring verdict for window {assessment['window_start']}--{assessment['window_end']}: "
        f"drift {assessment.get('drift_level')} with {(assessment.get('business') or {}).get('metric')} down "
        f"{(assessment.get('business') or {}).get('drop')}"
    )
    return roll_back_to_previous(
        model=model, registry=registry, gateway=gateway, audit=audit, record=record, reason=reason
    )
