"""The local stack behind ``make demo`` / ``make down`` / ``make status``: a development tool, not the product.

It lives outside the runtime package (``plugins/modelops``): the wheel and the Docker image leave it out,
and ``modelops`` never imports it. It imports ``modelops`` for settings, data and storage. Modules, one
job each:

- :mod:`modelops_dev.processes`: process groups: start, health, stop, status, pid files, port checks
- :mod:`modelops_dev.supervision`: the detached supervisor that restarts a service that exits unasked,
  ``restart <service>`` and the restart counts ``status`` shows
- :mod:`modelops_dev.stack`: what the stack is: ports, the ``.demo/`` layout, environment, services
- (the ``airflow_settings.yaml`` loader is :mod:`modelops.airflow_settings`: production compose uses it too)
- :mod:`modelops_dev.airflow_api`: the Airflow REST client, run waiting, XComs and log excerpts
- :mod:`modelops_dev.approvals`: the gate's human approval, answered as the approver it names
- :mod:`modelops_dev.mlflow_api`: the MLflow REST calls (registered model, aliases)
- :mod:`modelops_dev.workload`: what the demo feeds the stack: dataset files, scoring traffic, predictions
- :mod:`modelops_dev.driver`: the lifecycle: ``up`` / ``down`` / ``status`` and the summary

Run it as ``python -m modelops_dev up|down|status|restart <service>`` with ``devstack/`` on
``PYTHONPATH`` (the Makefile does).
"""

from __future__ import annotations

LOOPBACK = "127.0.0.1"


def loopback_hostname() -> str:
    """Airflow's ``[core] hostname_callable`` for the demo: every component says it runs on 127.0.0.1.

    The api-server fetches a running task's log from ``http://<the task's hostname>:<log server port>``;
    the demo's log servers listen on 127.0.0.1 only, which the machine's own name may not resolve to
    (Debian maps it to 127.0.1.1, macOS to a LAN address). Kept free of imports: every Airflow process
    of the stack imports it.
    """
    return LOOPBACK
