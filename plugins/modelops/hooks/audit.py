"""AuditHook: the audit log behind the Airflow connection ``modelops_audit``, for use inside tasks.

Three connections, so a secrets backend can keep each apart: ``modelops_audit`` (the database),
``modelops_audit_key`` (the signing keys) and ``modelops_audit_anchor`` (write-once storage of the chain's
head, see :mod:`modelops.audit.anchors`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook, get_current_context

from modelops.audit import AuditKeyring, AuditStore
from modelops.audit.anchors import (
    ANCHOR_CONN_ID,
    Anchor,
    AnchorError,
    AnchorStore,
    anchor_store_from_connection_fields,
)
from modelops.errors import ConfigurationError, ModelOpsError
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

    default_key_conn_name = "modelops_audit_key"
    default_anchor_conn_name = ANCHOR_CONN_ID

    def __init__(
        self,
        audit_conn_id: str = default_conn_name,
        audit_key_conn_id: str = default_key_conn_name,
        audit_anchor_conn_id: str = default_anchor_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.audit_conn_id = audit_conn_id
        self.audit_key_conn_id = audit_key_conn_id
        self.audit_anchor_conn_id = audit_anchor_conn_id

    @cached_property
    def url(self) -> str:
        conn = defined_connection(
            self.audit_conn_id,
            what="the audit log",
            example='{"conn_type": "sqlite", "host": "/path/to/audit.db"}',
        )
        return sqlalchemy_url(conn)

    @cached_property
    def keyring(self) -> AuditKeyring:
        """The signing keys, from their own connection so a secrets backend can hold them apart from the
        database's: login = current key id, password = its secret, extra ``retired_keys`` = older keys."""
        conn = defined_connection(
            self.audit_key_conn_id,
            what="the audit log's signing key",
            example='{"conn_type": "generic", "login": "k1", "password": "<32+ random characters>"}',
        )
        return AuditKeyring.from_connection_fields(
            login=conn.login,
            password=conn.password,
            extra=conn.extra_dejson,
            source=f"Airflow connection {self.audit_key_conn_id!r}",
        )

    @cached_property
    def anchor_store(self) -> AnchorStore:
        """Where the chain's head is anchored: connection type ``fs`` (extra ``path``: a local folder) or
        ``aws`` (extra ``anchor_uri`` = ``s3://bucket/prefix``, ``retention_days``; the connection's own
        credentials and ``endpoint_url`` make the S3 client, through the amazon provider's S3Hook)."""
        conn = defined_connection(
            self.audit_anchor_conn_id,
            what="write-once storage of the audit log's anchors",
            example='{"conn_type": "fs", "extra": {"path": "/var/lib/modelops/audit-anchors"}}',
        )
        return anchor_store_from_connection_fields(
            conn_type=conn.conn_type,
            extra=conn.extra_dejson,
            source=f"Airflow connection {self.audit_anchor_conn_id!r}",
            s3_client=self._s3_client,
        )

    def _s3_client(self) -> Any:
        # Imported here: only an S3 anchor store needs the amazon provider (and boto3).
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(aws_conn_id=self.audit_anchor_conn_id).get_conn()

    def anchor_head(self) -> tuple[Anchor, bool] | None:
        """Anchor the log's head now: ``(anchor, written now)``, or None for an empty log."""
        anchored = self.store.anchor_head(self.anchor_store)
        if anchored is not None:
            anchor, written = anchored
            self.log.info(
                "audit head seq=%s %s at %s",
                anchor.seq,
                "anchored" if written else "was already anchored",
                self.anchor_store.uri,
            )
        return anchored

    @cached_property
    def store(self) -> AuditStore:
        return AuditStore(self.url, keyring=self.keyring)

    def get_conn(self) -> AuditStore:
        return self.store

    def run_identity(self, context: Mapping[str, Any] | None = None) -> tuple[str, str, str, str]:
        """``(actor, dag_id, run_id, task_id)`` of the running task, as its audit records name it."""
        if context is None:
            try:
                context = get_current_context()
            except RuntimeError as exc:
                raise ConfigurationError(
                    "an audit record was asked for outside a running Airflow task; pass context= "
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
        return actor, dag_id, run_id, task_id

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
        log it as an ``AUDIT {...}`` line in the task log, anchor the log's head, and return the record as
        a JSON-safe dict.

        If the head cannot be anchored (the anchor store unreachable or misconfigured), this raises
        :class:`~modelops.audit.anchors.AnchorError` naming the store, after the record was written: the
        task fails loudly, and its retry finds the record already written and anchors the head.
        """
        actor, dag_id, run_id, task_id = self.run_identity(context)
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
        try:
            self.anchor_head()
        except ModelOpsError as exc:
            # The anchor store itself may be what failed to build (connection undefined, bucket without
            # Object Lock): then name its connection (a cached_property that is set lives in __dict__).
            where = self.__dict__.get("anchor_store")
            store = where.uri if where is not None else f"the connection {self.audit_anchor_conn_id!r}"
            raise AnchorError(
                f"audit record seq={record.seq} was written, but the log's head could not be anchored to "
                f"{store}: {exc}; fix the anchor store and retry the task (the retry writes no second "
                "record and anchors the head)"
            ) from exc
        return record.to_dict()
