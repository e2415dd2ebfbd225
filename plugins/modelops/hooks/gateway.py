"""The scoring gateway (a deployment target) behind an Airflow connection."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

from modelops.errors import ConfigurationError
from modelops.hooks._connections import defined_connection
from modelops.serving.client import GatewayClient


class GatewayHook(BaseHook):
    """Resolves the gateway connection; ``get_conn()`` returns a :class:`GatewayClient`.

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
    def client(self) -> GatewayClient:
        conn = defined_connection(
            self.gateway_conn_id, what="the scoring gateway", example="http://127.0.0.1:8008"
        )
        if not conn.host:
            raise ConfigurationError(f"connection {self.gateway_conn_id!r} has no host")
        host = conn.host.split("://", 1)[-1].rstrip("/")
        scheme = conn.schema or "http"
        base_url = f"{scheme}://{host}:{conn.port}" if conn.port else f"{scheme}://{host}"
        return GatewayClient(base_url, admin_token=conn.password or None, timeout=self.timeout)

    def get_conn(self) -> GatewayClient:
        return self.client
