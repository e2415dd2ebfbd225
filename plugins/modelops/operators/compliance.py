"""Operator for stage 3: the compliance gate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context

from modelops.assets import MODEL_CANDIDATE
from modelops.errors import ComplianceGateFailed, ModelOpsError
from modelops.hooks.audit import AuditHook
from modelops.hooks.registry import MlflowRegistryHook
from modelops.operators._common import emit, sha256_json, triggering_extras
from modelops.operators.validation import latest_passed_validation
from modelops.settings import compliance_policy, model_spec
from modelops.stages.training import CANDIDATE_ALIAS

CHALLENGER_ALIAS = "challenger"


def resolve_version(
    context: Context, registry: MlflowRegistryHook, name: str, explicit: str, asset: Any, alias: str
) -> str:
    """The version a stage acts on: the form's value, else the triggering event, else the alias."""
    if explicit:
        return explicit
    events = [e for e in triggering_extras(context, asset) if e.get("model_name") == name]
    if events:
        return str(events[-1]["version"])
    version = registry.version_by_alias(name, alias)
    if version is None:
        raise ModelOpsError(
            f"model {name!r} has no version with alias {alias!r}; give model_version explicitly"
        )
    return str(version.version)


class ComplianceGateOperator(BaseOperator):
    """Evaluate the compliance policy against a version: approve (alias ``challenger``) or reject."""

    template_fields: Sequence[str] = ("model_version", "model")
    ui_color = "#f8f0e0"

    def __init__(
        self,
        *,
        model_version: str = "",
        model: str = "",
        mlflow_conn_id: str = MlflowRegistryHook.default_conn_name,
        audit_conn_id: str = AuditHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_version = model_version
        self.model = model
        self.mlflow_conn_id = mlflow_conn_id
        self.audit_conn_id = audit_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from modelops.stages.compliance import evaluate_policy

        name = model_spec(self.model or None).name
        registry = MlflowRegistryHook(mlflow_conn_id=self.mlflow_conn_id)
        audit = AuditHook(audit_conn_id=self.audit_conn_id)
        policy = compliance_policy()
        version = resolve_version(
            context, registry, name, str(self.model_version).strip(), MODEL_CANDIDATE, CANDIDATE_ALIAS
        )
        model_version = registry.get_version(name, version)
        tags = dict(model_version.tags)
        metrics = dict(registry.client.get_run(model_version.run_id).data.metrics)
        sha = tags.get("train_data_sha256", "")
        validated = bool(sha) and latest_passed_validation(audit.store, sha) is not None
        report = evaluate_policy(
            policy=policy,
            model_name=name,
            version=version,
            tags=tags,
            metrics=metrics,
            dataset_validated=validated,
        )
        report_json = report.to_json()
        registry.client.log_text(model_version.run_id, report_json, f"compliance/gate_report_v{version}.json")
        registry.set_tags(
            name,
            version,
            {
                "compliance_status": report.verdict,
                "compliance_policy": f"{policy.name}@{policy.version}",
                "compliance_report_sha256": sha256_json(report.to_dict()),
            },
        )
        audit.record(
            action="gate.decided",
            subject=f"model:{name}@{version}",
            decision=report.verdict,
            details={
                "policy": f"{policy.name}@{policy.version}",
                "checks": [check.__dict__ for check in report.checks],
                "failed": [check.name for check in report.failures],
            },
            evidence={
                "policy": sha256_json(policy.model_dump()),
                "gate_report": sha256_json(report.to_dict()),
                "dataset": sha,
            },
            context=context,
        )
        if not report.approved:
            failures = "\n".join(f"  - {check.name}: {check.detail}" for check in report.failures)
            raise ComplianceGateFailed(
                f"{name} v{version} rejected by policy {policy.name}@{policy.version}: "
                f"{len(report.failures)} of {len(report.checks)} checks failed:\n{failures}\n"
                "No alias moved; the version is tagged compliance_status=rejected."
            )
        registry.client.set_registered_model_alias(name, CHALLENGER_ALIAS, version)
        emit(
            context,
            self.outlets,
            {"model_name": name, "version": version, "policy": f"{policy.name}@{policy.version}"},
        )
        return {
            "model_name": name,
            "version": version,
            "verdict": report.verdict,
            "checks": len(report.checks),
            "summary": f"{name} v{version} approved: {len(report.checks)}/{len(report.checks)} checks passed "
            f"({policy.name}@{policy.version})",
        }
