"""Operator for stage 5: drift monitoring of one window of served predictions."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator, Context

from modelops.errors import MonitoringError
from modelops.hooks.audit import AuditHook
from modelops.hooks.prediction_log import PredictionLogHook
from modelops.hooks.registry import MlflowRegistryHook
from modelops.operators._common import sha256_json
from modelops.settings import model_spec, monitoring_policy, platform_settings
from modelops.storage import as_storage_path, copy_file, storage_root


def monitoring_window(context: Context, window_start: str, window_end: str) -> tuple[datetime, datetime]:
    """The run's data interval, or an explicit window from the trigger form (both ends, ISO 8601)."""
    import pendulum

    if window_start or window_end:
        if not (window_start and window_end):
            raise MonitoringError("give both window_start and window_end (ISO 8601), or neither")
        try:
            start, end = pendulum.parse(window_start), pendulum.parse(window_end)
        except (ValueError, pendulum.parsing.exceptions.ParserError) as exc:
            raise MonitoringError(f"window_start/window_end must be ISO 8601 timestamps: {exc}") from exc
    else:
        start, end = context.get("data_interval_start"), context.get("data_interval_end")
        if start is None or end is None:
            raise MonitoringError(
                "this run has no data interval; the DAG needs an interval timetable, or give window_start/end"
            )
    if start >= end:
        raise MonitoringError(f"window_start {start} is not before window_end {end}")
    return start, end


class DriftMonitorOperator(BaseOperator):
    """Assess drift for one window; record the verdict; keep Evidently's HTML report as an artifact."""

    template_fields: Sequence[str] = ("window_start", "window_end", "model")
    ui_color = "#fdeaea"

    def __init__(
        self,
        *,
        window_start: str = "",
        window_end: str = "",
        model: str = "",
        mlflow_conn_id: str = MlflowRegistryHook.default_conn_name,
        predictions_conn_id: str = PredictionLogHook.default_conn_name,
        audit_conn_id: str = AuditHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.window_start = window_start
        self.window_end = window_end
        self.model = model
        self.mlflow_conn_id = mlflow_conn_id
        self.predictions_conn_id = predictions_conn_id
        self.audit_conn_id = audit_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from modelops.stages.monitoring import DriftAssessment, assess_drift, log_assessment_run
        from modelops.stages.validation import read_dataset

        spec = model_spec(self.model or None)
        policy = monitoring_policy()
        html_uri = html_sha256 = None
        start, end = monitoring_window(context, str(self.window_start).strip(), str(self.window_end).strip())
        window = PredictionLogHook(predictions_conn_id=self.predictions_conn_id).prediction_log.window(
            spec.name, start, end
        )
        window_label = f"{start.isoformat()}--{end.isoformat()}"
        report_dir = storage_root() / "monitoring" / spec.name / window_label.replace(":", "")
        if window.empty:
            assessment = DriftAssessment(
                verdict="insufficient_data",
                rows=0,
                reference_rows=0,
                reasons=["no predictions in the window"],
            )
            version, train_sha, mlflow_run_id = None, None, None
        else:
            # The version that served most of the window is the one whose training data is the reference.
            version = str(window["model_version"].mode().iloc[0])
            registry = MlflowRegistryHook(mlflow_conn_id=self.mlflow_conn_id)
            tags = dict(registry.get_version(spec.name, version).tags)
            train_sha = tags.get("train_data_sha256")
            if not train_sha or not tags.get("train_data_uri"):
                raise MonitoringError(
                    f"{spec.name} v{version} has no train_data_sha256/train_data_uri lineage tags, so there is "
                    "no reference data to compare with"
                )
            reference = read_dataset(tags["train_data_uri"])
            # Evidently writes local files only; render locally, then copy through ObjectStoragePath.
            with tempfile.TemporaryDirectory() as tmp:
                local_html = Path(tmp) / "drift_report.html"
                assessment = assess_drift(
                    current=window[spec.features],
                    reference=reference,
                    spec=spec,
                    policy=policy,
                    html_path=str(local_html),
                )
                if local_html.exists():
                    html = report_dir / "drift_report.html"
                    html_sha256 = copy_file(as_storage_path(local_html), html)
                    html_uri = str(html)
                mlflow_run_id = log_assessment_run(
                    registry=registry,
                    experiment_name=platform_settings().experiment_name,
                    model_name=spec.name,
                    version=version,
                    window_start=start,
                    window_end=end,
                    assessment=assessment,
                    html_path=local_html if local_html.exists() else None,
                )
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "assessment.json").write_text(
            json.dumps(assessment.to_dict(), indent=2, sort_keys=True)
        )

        evidence = {"assessment": sha256_json(assessment.to_dict())}
        if html_uri:
            evidence["drift_report_html"] = html_sha256
        if train_sha:
            evidence["reference_dataset"] = train_sha
        subject = f"model:{spec.name}@{version}" if version else f"model:{spec.name}"
        AuditHook(audit_conn_id=self.audit_conn_id).record(
            action="drift.assessed",
            subject=subject,
            decision=assessment.verdict,
            details={
                "window_start": start.isoformat(),
                "window_end": end.isoformat(),
                "report_uri": html_uri,
                "mlflow_run_id": mlflow_run_id,
                **assessment.to_dict(),
            },
            evidence=evidence,
            context=context,
        )
        return {
            "model_name": spec.name,
            "version": version,
            "window_start": start.isoformat(),
            "window_end": end.isoformat(),
            "verdict": assessment.verdict,
            "rows": assessment.rows,
            "drift_share": assessment.drift_share,
            "drifted_features": assessment.drifted_features,
            "out_of_range_share": assessment.out_of_range_share,
            "report_uri": html_uri,
            "mlflow_run_id": mlflow_run_id,
            "request_retraining": assessment.verdict in policy.request_retraining_on,
            "summary": f"{assessment.verdict}: {assessment.rows} rows, "
            f"{len(assessment.drifted_features)} drifted features, window {start:%Y-%m-%d %H:%M}-{end:%H:%M} UTC",
        }


def retraining_request(assessment: dict[str, Any], context: Context) -> dict[str, Any]:
    """Emit a retraining-request Asset event for a verdict the policy lists; skip the task otherwise."""
    from airflow.sdk.exceptions import AirflowSkipException

    from modelops.assets import RETRAINING_REQUEST

    if not assessment.get("request_retraining"):
        raise AirflowSkipException(f"verdict {assessment.get('verdict')!r} does not call for retraining")
    reason = f"drift verdict {assessment['verdict']} for window {assessment['window_start']}--{assessment['window_end']}"
    request = {
        "model_name": assessment["model_name"],
        "version": assessment["version"],
        "verdict": assessment["verdict"],
        "reason": reason,
    }
    AuditHook().record(
        action="retraining.requested",
        subject=f"model:{assessment['model_name']}@{assessment['version']}",
        decision="requested",
        details=request,
        evidence={"assessment": sha256_json(assessment)},
        context=context,
    )
    context["outlet_events"][RETRAINING_REQUEST].extra = request
    return {**request, "summary": f"retraining requested: {reason}"}
