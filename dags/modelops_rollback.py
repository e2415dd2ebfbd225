"""
### Manual rollback

One trigger form to take a model back: when a **canary** runs, it ends at once (the challenger's share goes
to 0 %, alias `challenger` removed, the champion answers every caller); with none running, the **champion**
goes back to the version before it (`previous_champion`), through the same checks as an automatic rollback:
that version needs an authentic promotion record and unchanged files. Either way the rollback and the share
change are audit records naming who asked and why. Nothing to roll back fails the run, saying so.

**Trigger form**: `model`, `reason` (required: it goes on record).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag

from modelops.operators.deployment import RollbackOperator
from modelops.params import model_param


@dag(
    dag_id="modelops_rollback",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["modelops", "stage-4", "deployment", "rollback"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=30)},
    doc_md=__doc__,
    params={
        "model": model_param("The model to roll back."),
        "reason": Param(
            "", type="string", minLength=3, title="Reason", description="Why: it goes into the audit log."
        ),
    },
)
def modelops_rollback() -> None:
    RollbackOperator(task_id="roll_back")


modelops_rollback()
