"""Operator for stage 2 in a pod: the training entry point run by KubernetesPodOperator.

For a model spec with ``training.runner: kubernetes``, ``modelops_training`` runs the task
``train_in_pod``: a pod of ``training.kubernetes.image`` (the ModelOps image) runs
``python -m modelops.operators.training``, the same stage call as ``train_and_register``, with every
credential (the ``AIRFLOW_CONN_*`` of the connections it uses) set from a Kubernetes Secret by
``secretKeyRef``. The pod returns the stage's outcome as XCom; this task records it in the audit log,
fails on a refusal and emits the Asset event, as every stage task does (:class:`ModelOpsBaseOperator`).

A module of its own: importing the provider's KubernetesPodOperator costs ~3 s, which the training DAG
pays only when some spec trains in a pod (:func:`modelops.settings.models_trained_in_pods`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.secret import Secret
from airflow.sdk.exceptions import AirflowSkipException
from kubernetes.client import models as k8s

from modelops import errors
from modelops.operators.base import ModelOpsBaseOperator
from modelops.stages.outcome import AuditEntry, StageOutcome
from modelops.vocabulary import AuditAction, Trigger, model_subject

if TYPE_CHECKING:
    from airflow.sdk import Context

    from modelops.settings import ModelSpec

TRAINING_COMMAND = ["python", "-m", "modelops.operators.training"]
"""The training entry point (``modelops.operators.training.main``), as the pod runs it."""


class TrainInPodOperator(ModelOpsBaseOperator, KubernetesPodOperator):
    """Train one model spec in a pod of its own; skipped for specs that train in the worker."""

    # Nothing is rendered: the model name and the dataset come from the plan task (an Asset event's extra
    # or a trigger-form string) and reach the pod as argv items, never through Jinja or a shell.
    template_fields: Sequence[str] = ()
    ui_color = "#dfe8f6"
    audit_action = AuditAction.MODEL_REGISTERED

    def __init__(
        self,
        *,
        model: str,
        dataset_sha256: str | None = None,
        trigger: str = Trigger.MANUAL.value,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("name", "modelops-train")
        kwargs.setdefault("get_logs", True)
        kwargs.setdefault("on_finish_action", "delete_pod")
        # The outcome comes back through the XCom sidecar (/airflow/xcom/return.json).
        kwargs["do_xcom_push"] = True
        super().__init__(**kwargs)
        self.model = model
        self.dataset_sha256 = dataset_sha256
        self.trigger = trigger

    def audit_subject(self) -> str:
        return model_subject(self.model)

    def configure_pod(self, spec: ModelSpec, *, dag_id: str, run_id: str) -> None:
        """Set the pod from ``spec.training.kubernetes``: image, namespace, command, resources, labels,
        plain env, and every credential as an env var from the Secret (secretKeyRef), never a value."""
        from modelops.serving.kubernetes import (
            AIRFLOW_UID,
            ANNOTATION_MODEL,
            FIELD_MANAGER,
            LABEL_MODEL,
            label_value,
        )

        pod = spec.training.kubernetes
        if spec.training.runner != "kubernetes" or pod is None:
            raise errors.SettingsError(f"{spec.name} does not train in a pod (training.runner is worker)")
        self.kubernetes_conn_id = pod.conn_id
        self.namespace = pod.namespace
        self.image = pod.image
        self.image_pull_policy = pod.image_pull_policy
        self.service_account_name = pod.service_account
        self.cmds = list(TRAINING_COMMAND)
        self.arguments = ["--model", spec.name, "--trigger", Trigger(self.trigger).value]
        self.arguments += ["--dag-id", dag_id, "--run-id", run_id]
        if self.dataset_sha256:
            self.arguments += ["--dataset-sha256", self.dataset_sha256]
        self.env_vars = [k8s.V1EnvVar(name=name, value=value) for name, value in sorted(pod.env.items())]
        self.secrets = [Secret("env", name, pod.secret_name, name) for name in pod.secret_env]
        self.container_resources = k8s.V1ResourceRequirements(
            requests=pod.resources.requests.model_dump(), limits=pod.resources.limits.model_dump()
        )
        self.labels = {
            "app.kubernetes.io/name": "modelops-training",
            "app.kubernetes.io/component": "training",
            "app.kubernetes.io/managed-by": FIELD_MANAGER,
            LABEL_MODEL: label_value(spec.name),
        }
        self.annotations = {ANNOTATION_MODEL: spec.name}
        self.security_context = k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=AIRFLOW_UID,
            run_as_group=0,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        )
        self.container_security_context = k8s.V1SecurityContext(
            allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"])
        )
        self.startup_timeout_seconds = pod.startup_timeout_seconds
        self.schedule_timeout_seconds = pod.startup_timeout_seconds

    def execute(self, context: Context) -> dict[str, Any]:
        spec = self.catalog.model(self.model)
        if spec.training.runner != "kubernetes":
            raise AirflowSkipException(f"{self.model} trains in the worker (train_and_register)")
        dag_run = context["dag_run"]
        self.configure_pod(spec, dag_id=dag_run.dag_id, run_id=dag_run.run_id)
        return ModelOpsBaseOperator.execute(self, context)

    def run_stage(self, context: Context) -> StageOutcome:
        return outcome_from_pod(KubernetesPodOperator.execute(self, context))


def outcome_from_pod(result: Any) -> StageOutcome:
    """The stage outcome the pod wrote (``modelops.operators.training.outcome_document``); an error the
    pod named is raised again here, so the base operator treats it as in the worker."""
    if not isinstance(result, dict):
        raise errors.ModelOpsError(
            f"the training pod returned no outcome (got {type(result).__name__}); see the pod's log above"
        )
    if "error" in result:
        kind = getattr(errors, str(result["error"].get("type")), None)
        if not (isinstance(kind, type) and issubclass(kind, errors.ModelOpsError)):
            kind = errors.ModelOpsError
        raise kind(str(result["error"].get("message")))
    return StageOutcome(
        decision=result["decision"],
        summary=result["summary"],
        details=dict(result.get("details") or {}),
        records=tuple(
            AuditEntry(
                AuditAction(entry["action"]),
                entry["subject"],
                entry["decision"],
                details=dict(entry.get("details") or {}),
                evidence=dict(entry.get("evidence") or {}),
            )
            for entry in result.get("records") or []
        ),
        asset_extra=result.get("asset_extra"),
        refusal=result.get("refusal"),
    )
