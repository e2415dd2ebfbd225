"""The MLflow tracking server and model registry behind an Airflow connection."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

from modelops.errors import ConfigurationError
from modelops.hooks._connections import defined_connection
from modelops.registry import ModelRegistry


class MlflowRegistryHook(BaseHook):
    """Resolves the MLflow connection; ``get_conn()`` returns the platform's :class:`ModelRegistry`.

    The connection is ``http`` (host, port, optional schema ``https``); ``extra.tracking_uri``
    overrides it with any MLflow URI (e.g. ``sqlite:///...`` for an embedded store in tests).
    """

    conn_name_attr = "mlflow_conn_id"
    default_conn_name = "mlflow_default"
    conn_type = "http"
    hook_name = "MLflow registry"

    def __init__(self, mlflow_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mlflow_conn_id = mlflow_conn_id

    @cached_property
    def tracking_uri(self) -> str:
        conn = defined_connection(
            self.mlflow_conn_id, what="the MLflow server", example="http://127.0.0.1:5000"
        )
        extra = conn.extra_dejson
        if extra.get("tracking_uri"):
            return str(extra["tracking_uri"])
        if not conn.host:
            raise ConfigurationError(
                f"connection {self.mlflow_conn_id!r} has no host; set the MLflow server host"
            )
        scheme = conn.schema or "http"
        host = conn.host if "://" not in conn.host else conn.host.split("://", 1)[1]
        return f"{scheme}://{host}:{conn.port}" if conn.port else f"{scheme}://{host}"

    @cached_property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.tracking_uri)

    def get_conn(self) -> ModelRegistry:
        return self.registry
