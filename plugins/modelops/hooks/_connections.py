"""Looking up a hook's Airflow connection, with an error that says how to define a missing one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

from modelops.errors import ConfigurationError

if TYPE_CHECKING:
    from airflow.sdk import Connection


def defined_connection(conn_id: str, *, what: str, example: str) -> Connection:
    """The connection ``conn_id``; a missing one is a ``ConfigurationError`` naming both ways to define it.

    ``example`` is a value for the ``AIRFLOW_CONN_<ID>`` environment variable (URI or JSON).
    """
    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException as exc:
        env_var = f"AIRFLOW_CONN_{conn_id.upper()}"
        raise ConfigurationError(
            f"Airflow connection {conn_id!r} ({what}) is not defined; define it in airflow_settings.yaml "
            f"or set the environment variable {env_var}, e.g. {env_var}='{example}'"
        ) from exc
