"""The governance view: the model inventory and the audit chain's state, read from the authentic audit
records (:mod:`modelops.governance.inventory`, no Airflow), served as pages inside the Airflow UI
(:mod:`modelops.governance.web`, mounted by ``plugins/modelops_governance_plugin.py``)."""

from __future__ import annotations

from modelops.governance.inventory import (
    ChainStatus,
    Compliance,
    ModelRow,
    OpenAlert,
    ServingVersion,
    TrailEntry,
    Verdict,
    chain_status,
    inventory,
    version_trail,
)

__all__ = [
    "ChainStatus",
    "Compliance",
    "ModelRow",
    "OpenAlert",
    "ServingVersion",
    "TrailEntry",
    "Verdict",
    "chain_status",
    "inventory",
    "version_trail",
]
