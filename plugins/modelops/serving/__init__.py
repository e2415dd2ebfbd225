"""Online scoring: the gateway (FastAPI, MLflow scoring protocol), its HTTP client, and the prediction log.

Every name is imported lazily, so that an Airflow task that only needs the gateway's client does not
import pandas (the prediction log) or FastAPI and MLflow's scoring server (the gateway) at DAG parse time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelops.serving.client import GatewayClient
    from modelops.serving.gateway import GatewayConfig, create_app
    from modelops.serving.prediction_log import PredictionLog, PredictionRecord

__all__ = ["GatewayClient", "GatewayConfig", "PredictionLog", "PredictionRecord", "create_app"]

_HOMES = {
    "GatewayClient": "modelops.serving.client",
    "GatewayConfig": "modelops.serving.gateway",
    "create_app": "modelops.serving.gateway",
    "PredictionLog": "modelops.serving.prediction_log",
    "PredictionRecord": "modelops.serving.prediction_log",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
