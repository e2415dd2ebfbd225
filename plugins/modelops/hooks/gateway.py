"""The scoring gateway's HTTP API behind an Airflow connection (a deployment target)."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from modelops.errors import ConfigurationError, DeploymentFailed
from modelops.hooks._connections import defined_connection

if TYPE_CHECKING:
    import httpx


class GatewayHook(BaseHook):
    """Admin and scoring calls to the ModelOps scoring gateway.

    Connection: ``http`` with host and port; ``password`` (optional) is the gateway's admin token.
    """

    conn_name_attr = "gateway_conn_id"
    default_conn_name = "modelops_gateway"
    conn_type = "http"
    hook_name = "ModelOps scoring gateway"

    def __init__(
        self, gateway_conn_id: str = default_conn_name, timeout: float = 60.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.gateway_conn_id = gateway_conn_id
        self.timeout = timeout

    @cached_property
    def connection(self):
        return defined_connection(
            self.gateway_conn_id, what="the scoring gateway", example="http://127.0.0.1:8008"
        )

    @cached_property
    def base_url(self) -> str:
        conn = self.connection
        if not conn.host:
            raise ConfigurationError(f"connection {self.gateway_conn_id!r} has no host")
        host = conn.host.split("://", 1)[-1].rstrip("/")
        scheme = conn.schema or "http"
        return f"{scheme}://{host}:{conn.port}" if conn.port else f"{scheme}://{host}"

    @cached_property
    def client(self) -> httpx.Client:
        import httpx

        headers = {"Authorization": f"Bearer {self.connection.password}"} if self.connection.password else {}
        return httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=headers)

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        import httpx

        try:
            return self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DeploymentFailed(
                f"scoring gateway at {self.base_url} did not answer {method} {path}: {exc}; "
                "is it running (make demo starts it)?"
            ) from exc

    def _admin(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._call(method, path, **kwargs)
        if response.status_code >= 400:
            raise DeploymentFailed(
                f"scoring gateway refused {method} {path}: HTTP {response.status_code} {response.text[:500]}"
            )
        return response.json() if response.content else {}

    def stage(self, model: str, version: str) -> dict[str, Any]:
        """Load ``version`` next to the live one; it answers only requests that ask for it by version."""
        return self._admin("POST", f"/admin/models/{model}/stage", json={"version": str(version)})

    def unstage(self, model: str) -> dict[str, Any]:
        return self._admin("DELETE", f"/admin/models/{model}/stage")

    def reload(self, model: str) -> dict[str, Any]:
        """Make the gateway serve whatever the registry's ``champion`` alias points at now."""
        return self._admin("POST", f"/admin/models/{model}/reload")

    def status(self) -> dict[str, Any]:
        return self._admin("GET", "/admin/models")

    def score(self, model: str, payload: dict[str, Any], *, version: str | None = None) -> httpx.Response:
        headers = {"X-Caller-Id": "modelops-deployment-smoke-test"}
        if version is not None:
            headers["X-Model-Version"] = str(version)
        return self._call("POST", f"/models/{model}/invocations", json=payload, headers=headers)
