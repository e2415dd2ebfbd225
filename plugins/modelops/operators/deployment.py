"""Operator for stage 4: deploy an approved version to the scoring gateway."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context

from modelops.assets import MODEL_APPROVED
from modelops.errors import DeploymentFailed, DeploymentRefused
from modelops.hooks.audit import AuditHook
from modelops.hooks.gateway import GatewayHook
from modelops.hooks.registry import MlflowRegistryHook
from modelops.operators._common import emit, sha256_json
from modelops.operators.compliance import CHALLENGER_ALIAS, resolve_version
from modelops.settings import model_spec

SMOKE_ROWS = 20


class DeployModelOperator(BaseOperator):
    """Stage, smoke-test and promote an approved version; the previous champion serves until it passes."""

    template_fields: Sequence[str] = ("model_version", "model")
    ui_color = "#efe6f7"

    def __init__(
        self,
        *,
        model_version: str = "",
        model: str = "",
        mlflow_conn_id: str = MlflowRegistryHook.default_conn_name,
        gateway_conn_id: str = GatewayHook.default_conn_name,
        audit_conn_id: str = AuditHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_version = model_version
        self.model = model
        self.mlflow_conn_id = mlflow_conn_id
        self.gateway_conn_id = gateway_conn_id
        self.audit_conn_id = audit_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from modelops.stages.deployment import deploy_version
        from modelops.stages.validation import read_dataset

        spec = model_spec(self.model or None)
        registry = MlflowRegistryHook(mlflow_conn_id=self.mlflow_conn_id)
        gateway = GatewayHook(gateway_conn_id=self.gateway_conn_id)
        audit = AuditHook(audit_conn_id=self.audit_conn_id)
        version = resolve_version(
            context, registry, spec.name, str(self.model_version).strip(), MODEL_APPROVED, CHALLENGER_ALIAS
        )
        tags = dict(registry.get_version(spec.name, version).tags)
        if tags.get("compliance_status") != "approved":
            audit.record(
                action="model.deployed",
                subject=f"model:{spec.name}@{version}",
                decision="refused",
                details={"reason": "not approved", "compliance_status": tags.get("compliance_status")},
                context=context,
            )
            raise DeploymentRefused(
                f"{spec.name} v{version} has compliance_status={tags.get('compliance_status')!r}; only versions "
                "approved by the compliance gate deploy. Run modelops_compliance_gate on it first."
            )
        smoke_rows = read_dataset(tags["train_data_uri"])[spec.features].head(SMOKE_ROWS)
        result = deploy_version(
            registry=registry, gateway=gateway, model=spec.name, version=version, smoke_rows=smoke_rows
        )
        decision = "deployed" if result.smoke_test.passed else "smoke_test_failed"
        audit.record(
            action="model.deployed",
            subject=f"model:{spec.name}@{version}",
            decision=decision,
            details=result.to_dict(),
            evidence={
                "smoke_test": sha256_json(result.smoke_test.__dict__),
                "dataset": tags["train_data_sha256"],
            },
            context=context,
        )
        if not result.smoke_test.passed:
            problems = "\n".join(f"  - {p}" for p in result.smoke_test.problems)
            raise DeploymentFailed(
                f"{spec.name} v{version} failed its smoke test; v{result.previous_version} keeps serving:\n{problems}"
            )
        emit(
            context,
            self.outlets,
            {"model_name": spec.name, "version": version, "previous_version": result.previous_version},
        )
        previous = f"v{result.previous_version}" if result.previous_version else "none"
        return {
            **result.to_dict(),
            "serving_url": f"{gateway.base_url}/invocations",
            "summary": f"{spec.name} v{version} is champion at {gateway.base_url} (previous: {previous}); "
            f"smoke test {result.smoke_test.rows} rows in {result.smoke_test.latency_ms} ms",
        }
