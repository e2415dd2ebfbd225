"""Hook for the prediction log the scoring gateway writes and monitoring reads."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from airflow.sdk import BaseHook

from modelops.hooks._connections import defined_connection
from modelops.hooks._db import sqlalchemy_url

if TYPE_CHECKING:
    from airflow.sdk import Connection

    from modelops.monitoring_history import MonitoringHistory
    from modelops.serving.prediction_log import PredictionLog


class PredictionLogHook(BaseHook):
    """The :class:`~modelops.serving.prediction_log.PredictionLog` behind an Airflow connection.

    conn_type ``sqlite`` (host = database file) is the embedded default, ``postgres`` production;
    ``extra.url`` may hold any SQLAlchemy URL.
    """

    conn_name_attr = "predictions_conn_id"
    default_conn_name = "modelops_predictions"
    conn_type = "sqlite"
    hook_name = "ModelOps prediction log"

    def __init__(self, predictions_conn_id: str = default_conn_name, **kwargs) -> None:
        super().__init__(**kwargs)
        self.predictions_conn_id = predictions_conn_id

    @cached_property
    def connection(self) -> Connection:
        return defined_connection(
            self.predictions_conn_id,
            what="the prediction log",
            example='{"conn_type": "sqlite", "host": "/path/to/predictions.db"}',
        )

    # Named prediction_log, not log: BaseHook's ``log`` is Airflow's task logger, and shadowing it would
    # break every ``self.log.info(...)`` in Airflow's own hook code.
    @cached_property
    def prediction_log(self) -> PredictionLog:
        from modelops.serving.prediction_log import PredictionLog

        return PredictionLog(sqlalchemy_url(self.connection))

    @cached_property
    def monitoring_history(self) -> MonitoringHistory:
        """Monitoring's history table, in the same database as the prediction log it summarises."""
        from modelops.monitoring_history import MonitoringHistory

        return MonitoringHistory(sqlalchemy_url(self.connection))

    def get_conn(self) -> PredictionLog:
        return self.prediction_log
