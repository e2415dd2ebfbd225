"""AuditHook: the audit log behind the Airflow connection ``modelops_audit``, for use inside tasks."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook, get_current_context

from modelops.audit import AuditStore
from modelops.errors import ConfigurationError
from modelops.hooks._connections import defined_connection
from modelops.hooks._db import sqlalchemy_url


class AuditHook(BaseHook):
    """Append records to the audit log, stamped with the task run that made the decision.

    The connection is ``sqlite`` (host = database file) by default or ``postgres`` in production; see
    :func:`modelops.hooks._db.sqlalchemy_url`.
    """

    conn_name_attr = "audit_conn_id"
    default_conn_name = "modelops_audit"
    conn_type = "sqlite"
    hook_name = "ModelOps audit log"

    def __init__(self, audit_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.audit_conn_id = audit_conn_id

    @cached_property
    def url(self) -> str:
        conn = defined_connection(
            self.audit_conn_id,
            what="the audit log",
            example='{"conn_type": "sqlite", "host": "/path/to/audit.db"}',
        )
        return sqlalchemy_url(conn)

    @cached_property
    def store(self) -> AuditStore:
        return AuditStore(self.url)

    def get_conn(self) -> AuditStore:
        return self.store

    def record(
        self,
        *,
        action: str,
        subject: str,
        decision: str,
        details: Mapping[str, Any] | None = None,
        evidence: Mapping[str, str] | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append one record for the running task (a retry of the same decision writes nothing new),
        log it as an ``AUDIT {...}`` line in the task log and return it as a JSON-safe dict."""
        if context is None:
            try:
                context = get_current_context()
            except RuntimeError as exc:
                raise ConfigurationError(
                    "AuditHook.record() was called outside a running Airflow task; pass context= "
                    "explicitly, or use modelops.audit.AuditStore directly outside Airflow"
                ) from exc
        dag_run = context["dag_run"]
        task_instance = context.get("ti") or context.get("task_instance")
        if task_instance is None:
            raise ConfigurationError(
                "the Airflow context has no 'ti' or 'task_instance'; pass the task's context"
            )
        dag_id, run_id, task_id = dag_run.dag_id, dag_run.run_id, task_instance.task_id
        actor = f"airflow:{dag_id}.{task_id}"
        # The runtime DagRun of Airflow 3.3 (task SDK) carries who triggered the run, if anyone did.
        triggering_user = getattr(dag_run, "triggering_user_name", None)
        if triggering_user:
            actor += f" (triggered by {triggering_user})"
        record = self.store.append(
            actor=actor,
            action=action,
            subject=subject,
            decision=decision,
            details=details,
            evidence=evidence,
            dag_id=dag_id,
            run_id=run_id,
            task_id=task_id,
        )
        self.log.info("%s", record.to_log_line())
        return record.to_dict()
