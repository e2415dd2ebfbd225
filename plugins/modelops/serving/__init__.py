"""Online scoring: the gateway (FastAPI, MLflow scoring protocol) and the prediction log it writes.

The gateway's names are imported lazily so that reading the prediction log (Airflow tasks, hooks) does
not import FastAPI and MLflow's scoring server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelops.serving.prediction_log import PredictionLog, PredictionRecord

if TYPE_CHECKING:
    from modelops.serving.gateway import GatewayConfig, create_app

__all__ = ["GatewayConfig", "PredictionLog", "PredictionRecord", "create_app"]


def __getattr__(name: str) -> Any:
    if name in ("GatewayConfig", "create_app"):
        from modelops.serving import gateway

        return getattr(gateway, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
