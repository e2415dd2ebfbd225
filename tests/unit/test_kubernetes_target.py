"""The ``kubernetes`` serving target: its manifests (pure functions), and the HTTP calls the real
``kubernetes`` client makes, configured by the cncf-kubernetes provider's ``KubernetesHook``, against a
stand-in API server on 127.0.0.1 (:class:`FakeCluster`). No cluster is needed.

The stand-in implements only what the target uses: server-side apply (PATCH), read, read status and
delete of Deployments, Services and HorizontalPodAutoscalers in a namespace, with a Deployment's status
computed from whether its pods' version "becomes available". It also answers, under ``/gw/<service>/...``,
for the gateway pods behind each Service (the admin API and scoring), so the deployment stage's whole
path (stage, smoke test, promotion, rollout, verification, unstage) runs against it.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pandas as pd
import pytest

from modelops.errors import DeploymentFailed
from modelops.evidence import CHAMPION_FIELD, champion_record
from modelops.serving import kubernetes as k8s
from modelops.settings import KubernetesServingSpec, ModelSpec
from modelops.vocabulary import Alias, AuditAction, Decision, DeploymentStatus, Tag, model_subject
from tests.support import keyring_for_tests

NAMESPACE = "modelops-test"
ADMIN_TOKEN = "test-admin-token-0123456789"
MODEL = "credit_risk.v2"
FILES = {"MLmodel": "0" * 64, "model.skops": "1" * 64}
"""The hashes a version's promotion record names (the stand-in gateway does not check them)."""
ENVIRONMENT = {"python": "3.11.9", "mlflow": "3.17.2", "sklearn": "1.9.1"}

_OBJECT_PATHS = {
    "Deployment": re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+?)(/status)?$"),
    "Service": re.compile(r"^/api/v1/namespaces/([^/]+)/services/([^/]+)$"),
    "HorizontalPodAutoscaler": re.compile(
        r"^/apis/autoscaling/v2/namespaces/([^/]+)/horizontalpodautoscalers/([^/]+)$"
    ),
}
_GATEWAY_PATH = re.compile(r"^/gw/([^/]+)/([^/]+)/(\d+)(/.*)$")


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    body: Any


@dataclass
class FakeCluster:
    """The API server's state and every request made of it; ``unavailable`` versions never get ready."""

    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    unavailable: set[str] = field(default_factory=set)
    deadline_exceeded: bool = False
    unapproved: set[str] = field(default_factory=set)
    forbidden: bool = False
    staged: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def api_calls(self) -> list[Call]:
        return [call for call in self.calls if not call.path.startswith("/gw/")]

    def get(self, kind: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        return self.objects.get((kind, namespace, name))

    # --- the API server ---------------------------------------------------------------------------

    def status_of(self, deployment: dict[str, Any]) -> dict[str, Any]:
        replicas = deployment["spec"].get("replicas", 1)
        version = deployment["spec"]["template"]["metadata"]["labels"].get(k8s.LABEL_VERSION)
        ready = version not in self.unavailable
        progressing = {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}
        if not ready and self.deadline_exceeded:
            progressing = {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": f'ReplicaSet "{deployment["metadata"]["name"]}-abc" has timed out progressing.',
            }
        return {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas if ready else 0,
            "availableReplicas": replicas if ready else 0,
            "conditions": [progressing],
        }

    @staticmethod
    def _as_applied(obj: dict[str, Any]) -> Any:
        """What an apply sets, without the fields the server fills in."""
        metadata = {key: obj["metadata"].get(key) for key in ("name", "namespace", "labels", "annotations")}
        spec = {key: value for key, value in obj["spec"].items() if key not in ("replicas", "clusterIP")}
        return metadata, spec

    def apply(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        key = (kind, namespace, name)
        old = self.objects.get(key)
        new = json.loads(json.dumps(body))
        metadata = new["metadata"]
        if old is not None and self._as_applied(old) == self._as_applied(new):
            return 200, old  # a no-op apply writes nothing (no new resourceVersion, no new generation)
        if old is None:
            metadata.update(uid=f"uid-{len(self.objects)}", resourceVersion="1", generation=1)
            status = 201
        else:
            metadata.update(
                uid=old["metadata"]["uid"],
                resourceVersion=str(int(old["metadata"]["resourceVersion"]) + 1),
                generation=old["metadata"]["generation"],
            )
            status = 200
        if kind == "Deployment":
            # Server-side apply leaves fields it does not manage: replicas belongs to the autoscaler.
            replicas = (old or {}).get("spec", {}).get("replicas", 2 if "replicas" not in new["spec"] else 1)
            new["spec"].setdefault("replicas", replicas)
        if old is not None and old["spec"] != new["spec"]:
            metadata["generation"] += 1
        if kind == "Service":
            new["spec"]["clusterIP"] = (old or {}).get("spec", {}).get("clusterIP", "10.0.0.10")
        self.objects[key] = new
        return status, new

    def handle_api(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        if self.forbidden:
            return 403, {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403}
        for kind, pattern in _OBJECT_PATHS.items():
            match = pattern.match(path)
            if match is None:
                continue
            namespace, name = match.group(1), match.group(2)
            found = self.objects.get((kind, namespace, name))
            if method == "PATCH":
                # The API server parses booleans with Go's strconv.ParseBool, which takes the client's "True".
                forced = query.get("force", [""])[0] in ("1", "t", "T", "true", "True", "TRUE")
                if query.get("fieldManager") != [k8s.FIELD_MANAGER] or not forced:
                    return 400, {"kind": "Status", "status": "Failure", "reason": "BadRequest", "code": 400}
                if body["kind"] != kind or body["metadata"]["name"] != name:
                    return 400, {"kind": "Status", "status": "Failure", "reason": "BadRequest", "code": 400}
                return self.apply(kind, namespace, name, body)
            if found is None:
                return 404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404}
            if method == "GET":
                if kind == "Deployment":
                    return 200, {**found, "status": self.status_of(found)}
                return 200, found
            if method == "DELETE":
                del self.objects[(kind, namespace, name)]
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        return 404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404}

    # --- the gateway pods behind each Service -----------------------------------------------------

    def handle_gateway(
        self, method: str, service: str, path: str, headers: Any, body: Any
    ) -> tuple[int, Any]:
        if headers.get("Authorization") != f"Bearer {ADMIN_TOKEN}":
            return 401, {"message": "admin token required"}
        live = self.get("Deployment", service)
        pinned = live["spec"]["template"]["metadata"]["labels"].get(k8s.LABEL_VERSION) if live else None
        served = None if pinned in self.unavailable else pinned
        if method == "GET" and path == "/admin/environment":
            return 200, {"environment": ENVIRONMENT}
        match = re.match(r"^/admin/models/([^/]+)/stage$", path)
        if match and method == "POST":
            version = body["version"]
            if version in self.unapproved:
                return 409, {"message": f"{match.group(1)} v{version} is not the version the gate approved"}
            self.staged[service] = version
            return 200, {"model": match.group(1), "staged_version": version, "live_version": served}
        if method == "GET" and path == "/admin/models":
            model = live["metadata"]["annotations"][k8s.ANNOTATION_MODEL] if live else MODEL
            return 200, {"models": {model: {"live_version": served}}}
        match = re.match(r"^/models/([^/]+)/invocations$", path)
        if match and method == "POST":
            asked = headers.get("X-Model-Version")
            answered = asked if asked == self.staged.get(service) else served
            rows = len(body["dataframe_split"]["data"])
            return 200, {"predictions": [0.5] * rows, "_version": answered}
        return 404, {"message": f"no route {method} {path}"}


def _handler(cluster: FakeCluster) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest's output clean
            pass

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            query = parse_qs(parts.query)
            with cluster.lock:
                cluster.calls.append(
                    Call(self.command, parts.path, query, self.headers.get("Content-Type"), body)
                )
                gateway = _GATEWAY_PATH.match(parts.path)
                extra: dict[str, str] = {}
                if gateway:
                    status, answer = cluster.handle_gateway(
                        self.command, gateway.group(1), gateway.group(4), self.headers, body
                    )
                    if isinstance(answer, dict) and "_version" in answer:
                        extra["X-Model-Version"] = str(answer.pop("_version"))
                else:
                    status, answer = cluster.handle_api(self.command, parts.path, query, body)
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PATCH = do_DELETE = do_POST = do_PUT = _serve

    return Handler


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeCluster]:
    """The stand-in API server, and an Airflow connection ``k8s_fake`` (cncf-kubernetes: not in-cluster,
    a kube config naming it) as a user would define one for a real cluster."""
    state = FakeCluster()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    kube_config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": state.url}}],
        "users": [{"name": "airflow", "user": {"token": "service-account-token"}}],
        "contexts": [
            {"name": "fake", "context": {"cluster": "fake", "user": "airflow", "namespace": NAMESPACE}}
        ],
        "current-context": "fake",
    }
    monkeypatch.setenv(
        "AIRFLOW_CONN_K8S_FAKE",
        json.dumps({"conn_type": "kubernetes", "extra": {"in_cluster": False, "kube_config": kube_config}}),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODELOPS_GATEWAY_K8S", json.dumps({"conn_type": "http", "password": ADMIN_TOKEN})
    )
    yield state
    server.shutdown()
    server.server_close()


def serving_settings(cluster: FakeCluster, **overrides: Any) -> KubernetesServingSpec:
    return KubernetesServingSpec.model_validate(
        {
            "conn_id": "k8s_fake",
            "namespace": NAMESPACE,
            "image": "registry.example.com/modelops:1.4.2",
            "min_replicas": 2,
            "max_replicas": 5,
            "target_cpu_utilization": 65,
            "resources": {
                "requests": {"cpu": "250m", "memory": "768Mi"},
                "limits": {"cpu": "1", "memory": "1Gi"},
            },
            "gateway_url": cluster.url + "/gw/{service}/{namespace}/{port}",
            "admin_token_conn_id": "modelops_gateway_k8s",
            "rollout_timeout_seconds": 1.0,
            **overrides,
        }
    )


def model_spec(settings: KubernetesServingSpec) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": MODEL,
            "owner": "risk@example.com",
            "team": "risk",
            "department": "credit",
            "risk_tier": "low",
            "task": "regression",
            "dataset": "loans",
            "target": "loss",
            "numeric_features": ["income", "amount"],
            "estimator": {"class_path": "sklearn.linear_model.Ridge"},
            "serving": {"target": "kubernetes", "kubernetes": settings.model_dump()},
        }
    )


@pytest.fixture
def audit(tmp_path: Path) -> Any:
    from modelops.audit import AuditStore

    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}", keyring=keyring_for_tests())
    yield store
    store.close() if hasattr(store, "close") else None


def record_in(store: Any) -> Any:
    def record(entry: Any) -> dict[str, Any]:
        return store.append(
            actor="test",
            action=entry.action,
            subject=entry.subject,
            decision=entry.decision,
            details=entry.details,
            evidence=entry.evidence,
        ).to_dict()

    return record


def promote(store: Any, version: str) -> None:
    """The promotion record the deployment stage writes before a target reloads."""
    store.append(
        actor="test",
        action=AuditAction.MODEL_DEPLOYED,
        subject=model_subject(MODEL, version),
        decision=Decision.PROMOTED,
        details={CHAMPION_FIELD: version, "artifacts": {}},
    )


def make_target(cluster: FakeCluster, audit: Any, **overrides: Any) -> k8s.KubernetesTarget:
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    settings = serving_settings(cluster, **overrides)
    return k8s.KubernetesTarget(
        k8s.KubernetesApi(KubernetesHook(conn_id=settings.conn_id).api_client),
        audit,
        model=MODEL,
        settings=settings,
        admin_token=ADMIN_TOKEN,
        poll_seconds=0.05,
    )


# --- manifests ----------------------------------------------------------------------------------------


def test_resource_names_are_valid_kubernetes_names_and_distinct() -> None:
    names = {model: k8s.resource_name(model) for model in ("ctr", "CTR", "credit_risk.v2", "a" * 100, "x-")}
    for model, name in names.items():
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name), (model, name)
        staging = k8s.resource_name(model, k8s.STAGING)
        assert staging.endswith("-staging") and len(staging) <= 63
    assert names["ctr"] == "modelops-ctr" and len(set(names.values())) == len(names)
    assert k8s.label_value("credit_risk.v2") == "credit_risk.v2"
    long = k8s.label_value("m" * 100 + ".")
    assert len(long) <= 63 and re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", long)


def test_the_live_deployment_pins_the_champion_and_reads_credentials_only_from_the_secret(
    cluster: FakeCluster,
) -> None:
    settings = serving_settings(cluster)
    manifest = k8s.deployment_manifest(MODEL, settings, version="7")
    name = k8s.resource_name(MODEL)
    assert manifest["apiVersion"] == "apps/v1" and manifest["kind"] == "Deployment"
    assert manifest["metadata"]["name"] == name and manifest["metadata"]["namespace"] == NAMESPACE
    assert manifest["metadata"]["annotations"][k8s.ANNOTATION_MODEL] == MODEL
    spec = manifest["spec"]
    assert "replicas" not in spec, "the autoscaler owns replicas"
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    # The selector never holds the version (it is immutable); the pods' labels do.
    assert spec["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "modelops-gateway",
        "app.kubernetes.io/instance": name,
    }
    pod_labels = spec["template"]["metadata"]["labels"]
    assert pod_labels[k8s.LABEL_MODEL] == MODEL and pod_labels[k8s.LABEL_VERSION] == "7"
    assert pod_labels.items() >= spec["selector"]["matchLabels"].items()
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 50000
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/modelops:1.4.2"
    assert container["command"] == ["python", "-m", "modelops.serving"]
    assert container["args"] == ["--host", "0.0.0.0", "--port", "8008"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"] == {
        "requests": {"cpu": "250m", "memory": "768Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }
    assert container["readinessProbe"]["httpGet"] == {"path": f"/models/{MODEL}/health", "port": "http"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/version"
    env = {item["name"]: item for item in container["env"]}
    assert env["MODELOPS_DEFAULT_MODEL"]["value"] == MODEL
    assert env[k8s.EXPECTED_VERSION_ENV]["value"] == "7"
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    for secret in (
        "MODELOPS_AUDIT_URL",
        "MODELOPS_AUDIT_KEYS",
        "MODELOPS_GATEWAY_ADMIN_TOKEN",
        "MODELOPS_GATEWAY_KEYS",
        "MODELOPS_PREDICTIONS_URL",
        "MLFLOW_TRACKING_PASSWORD",
    ):
        assert env[secret] == {
            "name": secret,
            "valueFrom": {"secretKeyRef": {"name": "modelops-gateway", "key": secret}},
        }
    # A new champion changes only the pins (a rollout); nothing else.
    other = k8s.deployment_manifest(MODEL, settings, version="8")
    assert other["spec"]["selector"] == spec["selector"]
    assert other["spec"]["template"]["metadata"]["labels"][k8s.LABEL_VERSION] == "8"


def test_staging_service_and_autoscaler_manifests(cluster: FakeCluster) -> None:
    settings = serving_settings(cluster)
    staging = k8s.deployment_manifest(MODEL, settings, version=None, role=k8s.STAGING)
    assert staging["spec"]["replicas"] == 1
    assert staging["metadata"]["name"] == k8s.resource_name(MODEL) + "-staging"
    (container,) = staging["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/version"
    assert k8s.LABEL_VERSION not in staging["spec"]["template"]["metadata"]["labels"]

    service = k8s.service_manifest(MODEL, settings)
    assert service["spec"]["selector"] == k8s.selector_labels(MODEL)
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert (
        k8s.service_manifest(MODEL, settings, role=k8s.STAGING)["spec"]["selector"]
        == (staging["spec"]["selector"]["matchLabels"])
    )

    hpa = k8s.autoscaler_manifest(MODEL, settings)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": k8s.resource_name(MODEL),
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    assert hpa["spec"]["metrics"][0]["resource"] == {
        "name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": 65},
    }


def test_settings_refuse_literal_credentials_and_inconsistent_scaling() -> None:
    from pydantic import ValidationError

    base = {"image": "modelops:1"}
    with pytest.raises(ValidationError, match="put them in the Kubernetes Secret"):
        KubernetesServingSpec.model_validate({**base, "env": {"MODELOPS_GATEWAY_ADMIN_TOKEN": "x"}})
    with pytest.raises(ValidationError, match="max_replicas"):
        KubernetesServingSpec.model_validate({**base, "min_replicas": 4, "max_replicas": 2})
    with pytest.raises(ValidationError, match="not a Kubernetes quantity"):
        KubernetesServingSpec.model_validate(
            {**base, "resources": {"requests": {"cpu": "lots", "memory": "1Gi"}}}
        )
    with pytest.raises(ValidationError, match="below requests"):
        KubernetesServingSpec.model_validate(
            {
                **base,
                "resources": {
                    "requests": {"cpu": "2", "memory": "1Gi"},
                    "limits": {"cpu": "1", "memory": "1Gi"},
                },
            }
        )
    with pytest.raises(ValidationError, match="add serving.kubernetes"):
        ModelSpec.model_validate(
            {**model_spec(KubernetesServingSpec(**base)).model_dump(), "serving": {"target": "kubernetes"}}
        )


# --- against the stand-in API server -------------------------------------------------------------------


def test_reload_applies_through_the_providers_hook_and_is_idempotent(
    cluster: FakeCluster, audit: Any
) -> None:
    promote(audit, "1")
    target = make_target(cluster, audit)
    first = target.reload(MODEL)
    name = k8s.resource_name(MODEL)
    assert first["live_version"] == "1" and first["deployment"] == f"{NAMESPACE}/{name}"
    applied = [call for call in cluster.api_calls() if call.method == "PATCH"]
    assert [call.path for call in applied] == [
        f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{name}",
        f"/api/v1/namespaces/{NAMESPACE}/services/{name}",
        f"/apis/autoscaling/v2/namespaces/{NAMESPACE}/horizontalpodautoscalers/{name}",
    ]
    for call in applied:
        assert call.content_type == "application/apply-patch+yaml"
        assert call.query == {"fieldManager": ["modelops"], "force": ["True"]}
    # What the client sent is the manifest, and no credential travels as a literal value.
    assert applied[0].body == k8s.deployment_manifest(MODEL, target.settings, version="1")
    sent = json.dumps([call.body for call in cluster.calls])
    assert ADMIN_TOKEN not in sent
    assert any(
        call.method == "GET" and call.path.endswith(f"/deployments/{name}/status")
        for call in cluster.api_calls()
    )
    assert target.live_version(MODEL) == "1"
    before = {key: json.dumps(value, sort_keys=True) for key, value in cluster.objects.items()}

    # A retried task applies the same manifests again: the same PATCHes, nothing created or changed.
    count = len(cluster.api_calls())
    again = target.reload(MODEL)
    assert again["live_version"] == "1" and again["previous_version"] == "1"
    second = [call for call in cluster.api_calls()[count:] if call.method == "PATCH"]
    assert [call.path for call in second] == [call.path for call in applied]
    assert all(call.method in ("PATCH", "GET") for call in cluster.api_calls())
    assert {key: json.dumps(value, sort_keys=True) for key, value in cluster.objects.items()} == before

    # A new champion is a new rollout of the same Deployment (generation 2), pinned to it.
    promote(audit, "2")
    assert target.reload(MODEL)["previous_version"] == "1"
    deployment = cluster.get("Deployment", name)
    assert deployment["metadata"]["generation"] == 2
    assert deployment["spec"]["template"]["metadata"]["labels"][k8s.LABEL_VERSION] == "2"
    assert target.live_version(MODEL) == "2"


def test_a_rollout_that_never_becomes_available_fails_naming_the_deployment(
    cluster: FakeCluster, audit: Any
) -> None:
    promote(audit, "3")
    cluster.unavailable.add("3")
    target = make_target(cluster, audit, rollout_timeout_seconds=0.3)
    records = audit.count()
    name = k8s.resource_name(MODEL)
    with pytest.raises(DeploymentFailed, match=rf"Deployment {NAMESPACE}/{name} did not become available"):
        target.reload(MODEL)
    assert audit.count() == records, "the target records nothing: the deployment stage does"
    # The rollout's API server deadline ends the wait at once, with the reason.
    cluster.deadline_exceeded = True
    slow = make_target(cluster, audit, rollout_timeout_seconds=30)
    with pytest.raises(DeploymentFailed, match="ProgressDeadlineExceeded"):
        slow.reload(MODEL)


def test_the_deployment_stage_runs_end_to_end_and_a_failed_rollout_rolls_back_on_record(
    cluster: FakeCluster, audit: Any
) -> None:
    """stage -> smoke test through the staging Service -> promotion record -> rollout -> verify -> unstage;
    then a version whose pods never become ready: the stage records the rollback and the Deployment is
    rolled back to the previous champion, with nothing half-recorded."""
    from modelops.stages.deployment import deploy_version

    registry = StubRegistry()
    target = make_target(cluster, audit)
    spec = model_spec(target.settings)
    rows = pd.DataFrame({"income": [1.0, 2.0, 3.0], "amount": [4.0, 5.0, 6.0]})
    name = k8s.resource_name(MODEL)

    assert target.environment() == ENVIRONMENT  # the serving image's, from its staging pod
    first = deploy_version(
        registry=registry,
        gateway=target,
        audit=audit,
        record=record_in(audit),
        spec=spec,
        version="1",
        files=FILES,
        smoke_rows=rows,
    )
    assert first.smoke_test.passed and first.canary is None
    assert registry.aliases[Alias.CHAMPION] == "1"
    assert cluster.get("Deployment", name)["spec"]["template"]["metadata"]["labels"][k8s.LABEL_VERSION] == "1"
    assert (
        cluster.get("Deployment", f"{name}-staging") is None
        and cluster.get("Service", f"{name}-staging") is None
    )
    smoke = [call for call in cluster.calls if call.path.endswith("/invocations")]
    assert len(smoke) == 1 and smoke[0].path.startswith(f"/gw/{name}-staging/")

    cluster.unavailable.add("2")
    with pytest.raises(
        DeploymentFailed, match=rf"did not take it live .*{NAMESPACE}/{name}.*rolled back to v1"
    ):
        deploy_version(
            registry=registry,
            gateway=target,
            audit=audit,
            record=record_in(audit),
            spec=spec,
            version="2",
            files=FILES,
            smoke_rows=rows,
        )
    champion = champion_record(audit, MODEL)
    assert champion is not None and champion.decision == Decision.ROLLED_BACK
    assert champion.details[CHAMPION_FIELD] == "1" and champion.details["failed_version"] == "2"
    assert registry.aliases[Alias.CHAMPION] == "1"
    assert registry.tags["2"][Tag.DEPLOYMENT_STATUS] == DeploymentStatus.ROLLED_BACK
    assert cluster.get("Deployment", name)["spec"]["template"]["metadata"]["labels"][k8s.LABEL_VERSION] == "1"
    assert target.live_version(MODEL) == "1"
    assert cluster.get("Deployment", f"{name}-staging") is None


def test_a_version_the_gate_did_not_approve_is_not_staged(cluster: FakeCluster, audit: Any) -> None:
    cluster.unapproved.add("5")
    target = make_target(cluster, audit)
    with pytest.raises(DeploymentFailed, match="not the version the gate approved"):
        target.stage(MODEL, "5")
    assert target.unstage(MODEL) == {"model": MODEL, "unstaged_version": None}
    assert cluster.get("Deployment", k8s.resource_name(MODEL, k8s.STAGING)) is None


def test_without_a_recorded_champion_nothing_serves(cluster: FakeCluster, audit: Any) -> None:
    promote(audit, "1")
    target = make_target(cluster, audit)
    target.reload(MODEL)
    audit.append(
        actor="test",
        action=AuditAction.MODEL_ROLLED_BACK,
        subject=model_subject(MODEL, "1"),
        decision=Decision.ROLLED_BACK,
        details={CHAMPION_FIELD: None, "failed_version": "1"},
    )
    with pytest.raises(DeploymentFailed, match="no recorded champion"):
        target.reload(MODEL)
    assert cluster.get("Deployment", k8s.resource_name(MODEL)) is None
    assert cluster.get("HorizontalPodAutoscaler", k8s.resource_name(MODEL)) is None
    assert target.live_version(MODEL) is None and target.serving(MODEL)["challenger_version"] is None


def test_refusals_name_the_problem(cluster: FakeCluster, audit: Any) -> None:
    promote(audit, "1")
    target = make_target(cluster, audit)
    with pytest.raises(DeploymentFailed, match="built for model"):
        target.stage("another_model", "1")
    cluster.forbidden = True
    with pytest.raises(DeploymentFailed, match="HTTP 403.*grant it get/patch/delete"):
        target.reload(MODEL)


def test_the_operator_builds_the_target_from_the_spec(cluster: FakeCluster, modelops_home: Path) -> None:
    """ModelOpsBaseOperator.serving_target: the provider's hook from serving.kubernetes.conn_id, the admin
    token from its connection, the audit log from modelops_audit."""
    from modelops.operators.training import TrainModelOperator

    spec = model_spec(serving_settings(cluster))
    operator = TrainModelOperator(task_id="t", model=MODEL)
    target = operator.serving_target(spec)
    assert isinstance(target, k8s.KubernetesTarget)
    promote(operator.audit_hook.store, "4")
    assert target.reload(MODEL)["live_version"] == "4"
    assert target.live_version(MODEL) == "4"
    assert target.invocations_url(MODEL) == (
        f"{cluster.url}/gw/{k8s.resource_name(MODEL)}/{NAMESPACE}/80/models/{MODEL}/invocations"
    )


class StubRegistry:
    """The registry calls the deployment stage makes around a target (aliases and tags), in memory."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.tags: dict[str, dict[str, str]] = {}

    def set_alias(self, model: str, alias: str, version: str) -> None:
        self.aliases[alias] = str(version)

    def delete_alias(self, model: str, alias: str) -> None:
        self.aliases.pop(alias, None)

    def set_version_tags(self, model: str, version: str, tags: dict[str, str]) -> None:
        self.tags.setdefault(str(version), {}).update(tags)
