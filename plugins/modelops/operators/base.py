"""The base of every stage operator: connection ids, cached hooks, and the one way an outcome is acted on."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException
from sqlalchemy.exc import SQLAlchemyError

from modelops.errors import GateFailed, ModelOpsError, MonitoringError, RegistryError, SettingsError
from modelops.hooks.audit import AuditHook
from modelops.hooks.gateway import GatewayHook
from modelops.hooks.prediction_log import PredictionLogHook
from modelops.hooks.registry import MlflowRegistryHook
from modelops.stages.outcome import json_safe
from modelops.vocabulary import AuditAction, Decision

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from modelops.monitoring_history import MonitoringHistory
    from modelops.registry import ModelRegistry
    from modelops.serving.client import GatewayClient
    from modelops.serving.prediction_log import PredictionLog
    from modelops.serving.targets import ServingTarget
    from modelops.settings import Catalog, ModelSpec
    from modelops.stages.outcome import AuditEntry, StageOutcome


class ModelOpsBaseOperator(BaseOperator):
    """Holds the connection ids and the hooks built from them (the ``AwsBaseOperator`` pattern).

    Subclasses implement :meth:`run_stage`: resolve inputs, call one stage function, return its
    :class:`~modelops.stages.outcome.StageOutcome`. :meth:`execute` then records the outcome in the audit
    log, fails the task on a refusal, emits the Asset event and returns the XCom. This is the one place
    where a gate decision (or a settings or registry error that no retry can fix) becomes
    ``AirflowFailException``.
    """

    def __init__(
        self,
        *,
        mlflow_conn_id: str = MlflowRegistryHook.default_conn_name,
        audit_conn_id: str = AuditHook.default_conn_name,
        gateway_conn_id: str = GatewayHook.default_conn_name,
        predictions_conn_id: str = PredictionLogHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.mlflow_conn_id = mlflow_conn_id
        self.audit_conn_id = audit_conn_id
        self.gateway_conn_id = gateway_conn_id
        self.predictions_conn_id = predictions_conn_id

    # --- inputs, resolved once per task run ---------------------------------------------------------

    @cached_property
    def catalog(self) -> Catalog:
        from modelops.settings import load_catalog

        return load_catalog()

    @cached_property
    def audit_hook(self) -> AuditHook:
        return AuditHook(audit_conn_id=self.audit_conn_id)

    @cached_property
    def registry(self) -> ModelRegistry:
        return MlflowRegistryHook(mlflow_conn_id=self.mlflow_conn_id).get_conn()

    @cached_property
    def gateway(self) -> GatewayClient:
        return GatewayHook(gateway_conn_id=self.gateway_conn_id).get_conn()

    def serving_target(self, spec: ModelSpec) -> ServingTarget:
        """Where ``spec``'s versions go live (``serving.target``): the gateway, the batch target, or the
        model's own Deployment on Kubernetes."""
        if spec.serving.target == "batch":
            from modelops.serving.targets import BatchTarget

            return BatchTarget(self.registry, self.audit_hook.store)
        if spec.serving.target == "kubernetes":
            return self.kubernetes_target(spec)
        return self.gateway

    def kubernetes_target(self, spec: ModelSpec) -> ServingTarget:
        """The target on the cluster of ``serving.kubernetes.conn_id``: the provider's hook configures the
        ``kubernetes`` client (in-cluster, or a kube config in the connection); the target gets our typed
        wrapper of it, and the gateway admin token from ``admin_token_conn_id``."""
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        from modelops.hooks._connections import defined_connection
        from modelops.serving.kubernetes import KubernetesApi, KubernetesTarget

        settings = spec.serving.kubernetes
        if settings is None:  # the settings model refuses this; kept for the type checker
            raise SettingsError(
                f"{spec.name}: serving.target is kubernetes but serving.kubernetes is missing"
            )
        token = defined_connection(
            settings.admin_token_conn_id,
            what="the scoring gateway's admin token",
            example='{"conn_type": "http", "password": "<MODELOPS_GATEWAY_ADMIN_TOKEN of the Secret>"}',
        ).password
        return KubernetesTarget(
            KubernetesApi(KubernetesHook(conn_id=settings.conn_id).api_client),
            self.audit_hook.store,
            model=spec.name,
            settings=settings,
            admin_token=token or None,
        )

    @cached_property
    def prediction_log_hook(self) -> PredictionLogHook:
        return PredictionLogHook(predictions_conn_id=self.predictions_conn_id)

    @cached_property
    def prediction_log(self) -> PredictionLog:
        return self.prediction_log_hook.get_conn()

    @cached_property
    def monitoring_history(self) -> MonitoringHistory:
        return self.prediction_log_hook.monitoring_history

    @cached_property
    def storage(self) -> ObjectStoragePath:
        from modelops.storage import storage_root

        return storage_root(self.catalog.platform)

    # --- the stage ----------------------------------------------------------------------------------

    audit_action: AuditAction
    """What this stage's records record; a failure of the stage is recorded under it too."""

    def run_stage(self, context: Context) -> StageOutcome:
        raise NotImplementedError

    def audit_subject(self) -> str:
        """Who or what this task decides about, for the record of its failure."""
        raise NotImplementedError

    def execute(self, context: Context) -> dict[str, Any]:
        return self.act_on(self.decide(lambda: self.run_stage(context), context), context)

    def decide(self, stage: Callable[[], StageOutcome], context: Context) -> StageOutcome:
        """Run one stage function; its failure is recorded, then fails the task (no retry for a refusal,
        a settings mistake or a missing version) or propagates for Airflow to retry."""
        try:
            return stage()
        except (GateFailed, SettingsError, RegistryError, MonitoringError) as exc:
            # A refusal, a settings mistake, a version that does not exist or a window that cannot be
            # assessed: the same inputs give the same answer, so fail now, on record, instead of retrying.
            self.record_failure(exc, context, retried=False)
            raise AirflowFailException(str(exc)) from exc
        except Exception as exc:
            # Recorded, then re-raised unchanged: Airflow retries it as configured.
            self.record_failure(exc, context, retried=True)
            raise

    def record_failure(self, error: BaseException, context: Context, *, retried: bool) -> None:
        """Write the stage's own failure to the audit log, so no failed decision goes unrecorded.

        Our own errors name the problem without quoting data; anything else is recorded by its type
        only (a library's message may quote input values), the traceback stays in the task log.
        """
        message = str(error) if isinstance(error, ModelOpsError) else "see the task log for the traceback"
        try:
            self.audit_hook.record(
                action=self.audit_action,
                subject=self.audit_subject(),
                decision=Decision.ERROR,
                details={
                    "error": type(error).__name__,
                    "message": message[:2000],
                    "retried_by_airflow": retried,
                },
                context=context,
            )
        except (ModelOpsError, SQLAlchemyError, OSError):
            # The audit log itself is failing (its connection undefined, its database down): say so loudly,
            # and let the original error, which is what the task failed of, propagate (the caller re-raises).
            self.log.exception("could not record the failure of %s in the audit log", self.task_id)

    def record_entry(self, entry: AuditEntry, context: Context) -> dict[str, Any]:
        """Write one of the stage's records now (a retry of the same decision returns the first one)."""
        return self.audit_hook.record(
            action=entry.action,
            subject=entry.subject,
            decision=entry.decision,
            details=entry.details,
            evidence=entry.evidence,
            context=context,
        )

    def act_on(self, outcome: StageOutcome, context: Context) -> dict[str, Any]:
        """Record, apply the decision's registry effects, then fail on a refusal, else emit the event and
        return the XCom."""
        for entry in outcome.records:
            self.record_entry(entry, context)
        for effect in outcome.effects:
            effect()
        if outcome.refusal is not None:
            raise AirflowFailException(outcome.refusal)
        if outcome.asset_extra is not None:
            extra = json_safe(outcome.asset_extra)
            for outlet in self.outlets:
                if isinstance(outlet, Asset):
                    context["outlet_events"][outlet].extra = extra
        self.log.info("%s", outcome.summary)
        return json_safe(outcome.xcom())
