"""The ``kubernetes`` serving target: each model is its own Deployment of the scoring gateway image.

A model spec with ``serving.target: kubernetes`` (settings in ``serving.kubernetes``) is served by:

- a **Deployment** ``modelops-<model>`` running the gateway image (``python -m modelops.serving``) with
  ``MODELOPS_DEFAULT_MODEL`` set to the model: one model per Deployment. Its pod template carries the
  recorded champion's version (label ``modelops.io/version``, env ``MODELOPS_EXPECTED_VERSION``), so a new
  champion is a new rollout. The gateway in each pod still decides what it serves from the audit log: it
  loads the newest authentic promotion (or rollback) record's version, and only after that version's files
  hash to the record; the readiness probe (``/models/<model>/health``) is 200 only once that champion
  loads. A rollout therefore completes only when the new pods serve the approved, recorded version, and the
  version the pods report is cross-checked against the pin (``live_version``);
- a **Service** (ClusterIP) in front of it, and a **HorizontalPodAutoscaler** (autoscaling/v2, CPU);
- for a deployment in progress, a one-replica **staging** Deployment and Service ``modelops-<model>-staging``
  of the same image: the version is staged there through the gateway's admin API (which checks its files
  against the compliance gate's approval before loading it) and smoke-tested through that Service, while
  the live Deployment keeps serving. ``unstage`` deletes both.

Manifests are plain dicts built by pure functions (:func:`deployment_manifest`, :func:`service_manifest`,
:func:`autoscaler_manifest`); :class:`KubernetesApi` applies them with server-side apply (one PATCH per
object that creates it or updates it to exactly this, so a retried task converges instead of failing on
"already exists"), through the ``kubernetes`` client the cncf-kubernetes provider's ``KubernetesHook``
configures (the operator builds it; this module imports nothing of Airflow).

Airflow's workers reach the gateway pods through the Services' cluster DNS names (``gateway_url``), with
:class:`~modelops.serving.client.GatewayClient`. Not through the API server's service proxy: the API
server removes the ``Authorization`` header of a request it has authenticated, so the gateway's admin
token could not reach the gateway that way.

No canary: the deployment stage splits traffic only on the ``local`` target; a split here would need two
Deployments weighted behind one Service (or a service mesh), so a version that passes its smoke test
replaces the champion by a rolling update (``maxUnavailable: 0``: old pods serve until new ones are ready).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelops.errors import DeploymentFailed
from modelops.evidence import CHAMPION_FIELD, champion_record
from modelops.serving.client import GatewayClient

if TYPE_CHECKING:
    import httpx
    from kubernetes.client import ApiClient

    from modelops.audit import AuditStore
    from modelops.settings import KubernetesServingSpec

GATEWAY_PORT = 8008
"""Where the gateway listens in its container (the Service maps ``service_port`` to it)."""
FIELD_MANAGER = "modelops"
"""Server-side apply's owner of the fields we set (``kubectl get deploy -o yaml --show-managed-fields``)."""
APP_NAME = "modelops-gateway"
LABEL_MODEL = "modelops.io/model"
LABEL_VERSION = "modelops.io/version"
LABEL_ROLE = "modelops.io/role"
ANNOTATION_MODEL = "modelops.io/model-name"
"""The model's full name (a label value is at most 63 characters and may be shortened)."""
EXPECTED_VERSION_ENV = "MODELOPS_EXPECTED_VERSION"
LIVE = "live"
STAGING = "staging"
AIRFLOW_UID = 50000
"""The non-root user of the apache/airflow image our image builds on."""

_NAME_MAX = 63  # a Service name is an RFC 1035 label
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def resource_name(model: str, role: str = LIVE) -> str:
    """``modelops-<model>`` (``-staging`` for the staging pod): a valid Service name for any model name.

    Model names may hold ``_``, ``.`` and capitals, which Kubernetes names may not; a name that had to be
    changed (or shortened) gets a digest of the real one, so two models never share a Deployment.
    """
    suffix = "" if role == LIVE else f"-{role}"
    slug = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")
    room = _NAME_MAX - len("modelops-") - len(suffix)
    if slug != model or len(slug) > room:
        slug = f"{slug[: room - 9].rstrip('-')}-{_digest(model)}".lstrip("-")
    return f"modelops-{slug}{suffix}"


def label_value(text: str) -> str:
    """``text`` as a label value (63 characters, alphanumeric at both ends), shortened with a digest."""
    if _LABEL_VALUE.match(text):
        return text
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:54].strip("-_.")
    return f"{cleaned}-{_digest(text)}" if cleaned else _digest(text)


def selector_labels(model: str, role: str = LIVE) -> dict[str, str]:
    """What a Deployment selects its pods by and a Service routes to. Immutable once the Deployment
    exists, so it never holds the version."""
    return {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": resource_name(model, role)}


def object_labels(model: str, role: str, version: str | None) -> dict[str, str]:
    labels = {
        **selector_labels(model, role),
        "app.kubernetes.io/component": "serving",
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        LABEL_MODEL: label_value(model),
        LABEL_ROLE: role,
    }
    if version is not None:
        labels[LABEL_VERSION] = label_value(str(version))
    return labels


def _metadata(model: str, role: str, settings: KubernetesServingSpec, version: str | None) -> dict[str, Any]:
    return {
        "name": resource_name(model, role),
        "namespace": settings.namespace,
        "labels": object_labels(model, role, version),
        "annotations": {ANNOTATION_MODEL: model},
    }


def container_env(model: str, settings: KubernetesServingSpec, version: str | None) -> list[dict[str, Any]]:
    """The gateway's environment: plain values from ``env``, every credential from the Secret."""
    env: list[dict[str, Any]] = [{"name": "MODELOPS_DEFAULT_MODEL", "value": model}]
    if version is not None:
        env.append({"name": EXPECTED_VERSION_ENV, "value": str(version)})
    env += [{"name": name, "value": value} for name, value in sorted(settings.env.items())]
    env += [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": settings.secret_name, "key": name}}}
        for name in settings.secret_env
    ]
    return env


def _probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def deployment_manifest(
    model: str, settings: KubernetesServingSpec, *, version: str | None, role: str = LIVE
) -> dict[str, Any]:
    """The Deployment of ``model``'s gateway: the live one pinned to the recorded champion ``version``, or
    the one-replica staging one (``version`` None: the version is staged through the admin API)."""
    labels = object_labels(model, role, version)
    live = role == LIVE
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(model, role)},
        "revisionHistoryLimit": 3,
        "progressDeadlineSeconds": max(int(settings.rollout_timeout_seconds), 1),
        # Old pods serve until new ones are ready: a rollout never lowers the capacity.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {
            "metadata": {"labels": labels, "annotations": {ANNOTATION_MODEL: model}},
            "spec": {
                **({"serviceAccountName": settings.service_account} if settings.service_account else {}),
                # The gateway never calls the Kubernetes API.
                "automountServiceAccountToken": False,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": AIRFLOW_UID,
                    "runAsGroup": 0,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "gateway",
                        "image": settings.image,
                        "imagePullPolicy": settings.image_pull_policy,
                        "command": ["python", "-m", "modelops.serving"],
                        "args": ["--host", "0.0.0.0", "--port", str(GATEWAY_PORT)],
                        "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
                        "env": container_env(model, settings, version),
                        "resources": {
                            "requests": settings.resources.requests.model_dump(),
                            "limits": settings.resources.limits.model_dump(),
                        },
                        # Started: the process answers /version (no registry call; imports take seconds).
                        "startupProbe": _probe("/version", period=5, failures=60),
                        # Alive: the process answers; never the model's health, or a registry outage
                        # would restart every pod instead of only taking them out of the Service.
                        "livenessProbe": _probe("/version", period=15, failures=4),
                        # Ready: live pods only once the recorded champion loaded after its files checked
                        # out (200 from the gateway's health endpoint); a staging pod once it answers.
                        "readinessProbe": _probe(
                            f"/models/{model}/health" if live else "/version", period=10, failures=3
                        ),
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                            # Left writable: the gateway downloads versions under TMPDIR and libraries
                            # write caches under HOME; no test here can list every writer.
                            "readOnlyRootFilesystem": False,
                        },
                    }
                ],
            },
        },
    }
    if not live:
        spec["replicas"] = 1  # the admin call and the smoke test must reach the same process
    # The live Deployment sets no replicas: the autoscaler owns that field, and applying one would
    # reset the scale on every deployment.
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(model, role, settings, version),
        "spec": spec,
    }


def service_manifest(model: str, settings: KubernetesServingSpec, *, role: str = LIVE) -> dict[str, Any]:
    metadata = _metadata(model, role, settings, None)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(model, role),
            "ports": [
                {"name": "http", "port": settings.service_port, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def autoscaler_manifest(model: str, settings: KubernetesServingSpec) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(model, LIVE, settings, None),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": resource_name(model)},
            "minReplicas": settings.min_replicas,
            "maxReplicas": settings.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": settings.target_cpu_utilization,
                        },
                    },
                }
            ],
        },
    }


def live_manifests(model: str, settings: KubernetesServingSpec, version: str) -> list[dict[str, Any]]:
    """What serves ``model``'s champion ``version``, in the order it is applied."""
    return [
        deployment_manifest(model, settings, version=version),
        service_manifest(model, settings),
        autoscaler_manifest(model, settings),
    ]


def staging_manifests(model: str, settings: KubernetesServingSpec) -> list[dict[str, Any]]:
    return [
        deployment_manifest(model, settings, version=None, role=STAGING),
        service_manifest(model, settings, role=STAGING),
    ]


# --- the cluster ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutState:
    """What a Deployment's status says of its rollout (``kubectl rollout status`` reads the same)."""

    name: str
    namespace: str
    generation: int
    observed_generation: int
    desired: int
    replicas: int
    updated: int
    available: int
    conditions: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    """type -> (status, reason, message)."""

    @property
    def deadline_exceeded(self) -> bool:
        return self.conditions.get("Progressing", ("", "", ""))[1] == "ProgressDeadlineExceeded"

    @property
    def complete(self) -> bool:
        # kubectl's rules: the controller saw this spec, every replica is updated, no old one is left,
        # and every updated one is available.
        return (
            self.observed_generation >= self.generation
            and self.updated >= self.desired
            and self.replicas <= self.updated
            and self.available >= self.updated
        )

    def describe(self) -> str:
        problems = "; ".join(
            f"{kind}={status} ({reason}: {message})"
            for kind, (status, reason, message) in sorted(self.conditions.items())
            if status != "True" or reason == "ProgressDeadlineExceeded"
        )
        return f"{self.available} of {self.desired} replicas available, {self.updated} updated" + (
            f"; {problems}" if problems else ""
        )


_RESOURCES = {
    # kind -> (client attribute, method suffix): the client's methods are named after the resource
    "Deployment": ("apps", "namespaced_deployment"),
    "Service": ("core", "namespaced_service"),
    "HorizontalPodAutoscaler": ("autoscaling", "namespaced_horizontal_pod_autoscaler"),
}


class KubernetesApi:
    """The few calls the target makes, on the ``kubernetes`` client's :class:`ApiClient` (from the
    cncf-kubernetes provider's ``KubernetesHook``): apply, read a Deployment's rollout, delete. Every
    refusal of the API server becomes :class:`DeploymentFailed` naming the object and the fix."""

    def __init__(self, api_client: ApiClient) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.autoscaling = client.AutoscalingV2Api(api_client)

    def __repr__(self) -> str:
        return f"KubernetesApi({self.api_client.configuration.host!r})"

    def _refusal(self, what: str, exc: Exception) -> DeploymentFailed:
        status = getattr(exc, "status", None)
        hint = {
            401: "the cluster connection's credentials were refused; check the Airflow connection",
            403: "the cluster connection's service account may not do this; grant it get/patch/delete on "
            "deployments, services and horizontalpodautoscalers in the namespace (see README, Kubernetes)",
            404: "the namespace may not exist; create it (kubectl create namespace ...)",
            422: "the API server rejected the manifest; the message names the field",
        }.get(status or 0, "see the API server's message")
        return DeploymentFailed(
            f"Kubernetes refused to {what}: HTTP {status} {getattr(exc, 'reason', '')}: "
            f"{str(getattr(exc, 'body', ''))[:500]}; {hint}"
        )

    def _call(self, what: str, call: Callable[[], Any], *, missing_ok: bool = False) -> Any:
        """``call()``; an API refusal becomes :class:`DeploymentFailed`, and with ``missing_ok`` a 404 is
        None (reading or deleting what is not there)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return call()
        except ApiException as exc:
            if missing_ok and exc.status == 404:
                return None
            raise self._refusal(what, exc) from exc
        except HTTPError as exc:
            raise DeploymentFailed(
                f"the Kubernetes API server at {self.api_client.configuration.host} did not answer "
                f"({what}): {exc}; check the cluster connection"
            ) from exc

    def apply(self, manifest: dict[str, Any]) -> None:
        """Create ``manifest``'s object or update it to exactly this (server-side apply, forced: the
        fields we manage are ours; fields others own, such as the autoscaler's replicas, are left)."""
        kind, metadata = manifest["kind"], manifest["metadata"]
        api, suffix = _RESOURCES[kind]
        patch = getattr(getattr(self, api), f"patch_{suffix}")
        self._call(
            f"apply {kind} {metadata['namespace']}/{metadata['name']}",
            lambda: patch(
                metadata["name"],
                metadata["namespace"],
                manifest,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
            ),
        )

    def delete(self, kind: str, name: str, namespace: str) -> bool:
        """Delete one object; False when it was not there (a retried delete is not an error)."""
        api, suffix = _RESOURCES[kind]
        delete = getattr(getattr(self, api), f"delete_{suffix}")
        deleted = self._call(
            f"delete {kind} {namespace}/{name}", lambda: delete(name, namespace), missing_ok=True
        )
        return deleted is not None

    def rollout(self, name: str, namespace: str) -> RolloutState | None:
        """The Deployment's rollout, or None when it does not exist."""
        found = self._call(
            f"read Deployment {namespace}/{name}",
            lambda: self.apps.read_namespaced_deployment_status(name, namespace),
            missing_ok=True,
        )
        if found is None:
            return None
        status, spec = found.status, found.spec
        return RolloutState(
            name=name,
            namespace=namespace,
            generation=found.metadata.generation or 0,
            observed_generation=status.observed_generation or 0,
            desired=spec.replicas if spec.replicas is not None else 1,
            replicas=status.replicas or 0,
            updated=status.updated_replicas or 0,
            available=status.available_replicas or 0,
            conditions={
                c.type: (c.status, c.reason or "", c.message or "") for c in (status.conditions or [])
            },
        )

    def pinned_version(self, name: str, namespace: str) -> str | None:
        """The version label of the Deployment's pod template (None: no such Deployment)."""
        found = self._call(
            f"read Deployment {namespace}/{name}",
            lambda: self.apps.read_namespaced_deployment(name, namespace),
            missing_ok=True,
        )
        if found is None:
            return None
        return (found.spec.template.metadata.labels or {}).get(LABEL_VERSION)

    def wait_for_rollout(
        self,
        name: str,
        namespace: str,
        *,
        timeout: float,
        poll: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> RolloutState:
        """Until the Deployment's rollout completes. Hand-written: neither the ``kubernetes`` client nor the
        provider's hook has a rollout waiter (``kubectl rollout status`` is Go, in kubectl)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.rollout(name, namespace)
            if state is None:
                raise DeploymentFailed(
                    f"Deployment {namespace}/{name} disappeared during its rollout; deploy again"
                )
            if state.complete:
                return state
            if state.deadline_exceeded or time.monotonic() >= deadline:
                raise DeploymentFailed(
                    f"Deployment {namespace}/{name} did not become available within {timeout:g} s: "
                    f"{state.describe()}; see `kubectl -n {namespace} describe deployment {name}` and its "
                    "pods' events and logs (an image that does not pull, a Secret key missing, a champion "
                    "whose files do not match its record)"
                )
            sleep(poll)


# --- the target -----------------------------------------------------------------------------------


class KubernetesTarget:
    """The :class:`~modelops.serving.targets.ServingTarget` of one model spec with ``target: kubernetes``.

    ``api`` applies manifests; ``audit`` says which champion the live Deployment must run (the newest
    authentic promotion or rollback record, as the gateway itself reads it); ``admin_token`` is the
    gateway's, for staging and the smoke test. Built per model (the spec's settings): a call about another
    model is refused.
    """

    def __init__(
        self,
        api: KubernetesApi,
        audit: AuditStore,
        *,
        model: str,
        settings: KubernetesServingSpec,
        admin_token: str | None,
        gateway_client: Callable[[str], GatewayClient] | None = None,
        poll_seconds: float = 2.0,
    ) -> None:
        self.api = api
        self.audit = audit
        self.model = model
        self.settings = settings
        self.poll_seconds = poll_seconds
        self._make_client = gateway_client or (
            lambda url: GatewayClient(url, admin_token=admin_token, timeout=60.0)
        )
        self._clients: dict[str, GatewayClient] = {}
        self._staged: str | None = None

    def __repr__(self) -> str:
        return f"KubernetesTarget({self.settings.namespace}/{resource_name(self.model)})"

    def _check(self, model: str) -> None:
        if model != self.model:
            raise DeploymentFailed(
                f"this kubernetes target was built for model {self.model!r}, not {model!r}; build one per "
                "model spec (ModelOpsBaseOperator.serving_target)"
            )

    def service_url(self, role: str = LIVE) -> str:
        return self.settings.gateway_url.format(
            service=resource_name(self.model, role),
            namespace=self.settings.namespace,
            port=self.settings.service_port,
        )

    def _client(self, role: str) -> GatewayClient:
        url = self.service_url(role)
        if url not in self._clients:
            self._clients[url] = self._make_client(url)
        return self._clients[url]

    def _apply_and_wait(self, manifests: list[dict[str, Any]]) -> RolloutState:
        for manifest in manifests:
            self.api.apply(manifest)
        deployment = manifests[0]["metadata"]
        return self.api.wait_for_rollout(
            deployment["name"],
            deployment["namespace"],
            timeout=self.settings.rollout_timeout_seconds,
            poll=self.poll_seconds,
        )

    def _ensure_staging(self) -> RolloutState:
        # Applying an unchanged manifest changes nothing, so a running staging pod is reused.
        return self._apply_and_wait(staging_manifests(self.model, self.settings))

    # --- ServingTarget --------------------------------------------------------------------------

    def environment(self) -> dict[str, str | None]:
        """The image's Python and framework versions, as its gateway reports them: the staging pod is
        started here (the deployment stage asks this first), and its gateway answers. A deployment refused
        after this (an environment mismatch, no validated data) leaves that idle pod until the model's next
        deployment reuses it or :meth:`unstage` deletes it."""
        self._ensure_staging()
        return self._client(STAGING).environment()

    def invocations_url(self, model: str) -> str:
        self._check(model)
        return f"{self.service_url()}/models/{model}/invocations"

    def stage(self, model: str, version: str) -> dict[str, Any]:
        """Start (or reuse) the staging pod and stage ``version`` in its gateway, which loads it only after
        its files match the compliance gate's approval (else 4xx: :class:`DeploymentFailed`)."""
        self._check(model)
        self._ensure_staging()
        answer = self._client(STAGING).stage(model, str(version))
        self._staged = str(version)
        return {
            "model": model,
            "staged_version": answer.get("staged_version", str(version)),
            "live_version": self.live_version(model),
            "staging_deployment": f"{self.settings.namespace}/{resource_name(model, STAGING)}",
        }

    def unstage(self, model: str) -> dict[str, Any]:
        """Delete the staging Deployment and Service (nothing there is not an error)."""
        self._check(model)
        namespace = self.settings.namespace
        for kind in ("Deployment", "Service"):
            self.api.delete(kind, resource_name(model, STAGING), namespace)
        staged, self._staged = self._staged, None
        return {"model": model, "unstaged_version": staged}

    def score(
        self, model: str, payload: dict[str, Any], *, version: str | None = None, caller_id: str
    ) -> httpx.Response:
        """Through the staging Service when ``version`` is the staged one (the smoke test), else the live
        Service."""
        self._check(model)
        role = STAGING if version is not None and str(version) == self._staged else LIVE
        return self._client(role).score(model, payload, version=version, caller_id=caller_id)

    def recorded_champion(self, model: str) -> str | None:
        record = champion_record(self.audit, model)
        version = None if record is None else record.details.get(CHAMPION_FIELD)
        return None if not version else str(version)

    def reload(self, model: str) -> dict[str, Any]:
        """Roll the live Deployment to the recorded champion and wait until every replica serves it.

        No recorded champion (a rollback with nothing before): the live Deployment and its autoscaler are
        deleted, so nothing unverified serves, and :class:`DeploymentFailed` says so (as the gateway's own
        reload refuses). A rollout that does not complete raises :class:`DeploymentFailed` naming the
        Deployment; the deployment stage then records a rollback and reloads the previous champion.
        """
        self._check(model)
        namespace, name = self.settings.namespace, resource_name(model)
        version = self.recorded_champion(model)
        if version is None:
            self.api.delete("HorizontalPodAutoscaler", name, namespace)
            self.api.delete("Deployment", name, namespace)
            raise DeploymentFailed(
                f"{model} has no recorded champion; Deployment {namespace}/{name} was removed and nothing "
                "serves it. Deploy an approved version through modelops_deployment"
            )
        previous = self.api.pinned_version(name, namespace)
        state = self._apply_and_wait(live_manifests(model, self.settings, version))
        return {
            "model": model,
            "live_version": version,
            "previous_version": previous,
            "deployment": f"{namespace}/{name}",
            "available_replicas": state.available,
        }

    def live_version(self, model: str) -> str | None:
        """What the live pods report serving (None: no live Deployment). When it differs from the
        Deployment's pin, the pods' answer is returned, so ``verify_live`` sees the difference."""
        self._check(model)
        if self.api.pinned_version(resource_name(model), self.settings.namespace) is None:
            return None
        return self._client(LIVE).live_version(model)

    def serving(self, model: str) -> dict[str, Any]:
        # One version per Deployment: there is no traffic split (see the module's docstring).
        return {"live_version": self.live_version(model), "challenger_version": None, "challenger_share": 0.0}

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
