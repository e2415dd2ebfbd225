"""The MLflow tracking server and model registry behind an Airflow connection."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from modelops.errors import ConfigurationError
from modelops.hooks._connections import defined_connection

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


class MlflowRegistryHook(BaseHook):
    """MLflow tracking and registry client for one server.

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
    def client(self) -> MlflowClient:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def activate(self) -> None:
        """Point MLflow's fluent API (``mlflow.start_run``, ``log_model``) at this server."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)

    def version_by_alias(self, name: str, alias: str) -> ModelVersion | None:
        """The version an alias points at, or None when the alias (or the model) does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def get_version(self, name: str, version: str | int) -> ModelVersion:
        return self.client.get_model_version(name, str(version))

    def aliases_of(self, name: str) -> dict[str, str]:
        """alias -> version of a registered model; empty when nothing is registered under ``name`` yet."""
        from mlflow.exceptions import MlflowException

        try:
            aliases = self.client.get_registered_model(name).aliases
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        return {alias: str(version) for alias, version in aliases.items()}

    def set_tags(self, name: str, version: str | int, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, str(version), key, str(value))

    def find_versions(self, name: str, **tags: str) -> list[ModelVersion]:
        """Versions of ``name`` carrying all the given tags, newest first."""
        clauses = [f"name = '{name}'"] + [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
        versions = self.client.search_model_versions(" AND ".join(clauses))
        return sorted(versions, key=lambda v: int(v.version), reverse=True)
