"""Airflow plugin: the ModelOps governance view inside the Airflow UI.

Airflow imports every ``.py`` file at the top of the plugins folder (``modelops/`` itself is listed in
``.airflowignore``: it is the shared package, not a plugin). This one mounts the governance app
(:mod:`modelops.governance.web`) on the api-server under ``/modelops`` and adds "Model governance" to the
UI's navigation; the UI shows the page in an iframe at ``/plugin/modelops``.

Authentication: Airflow mounts a plugin's FastAPI app without any auth of its own. The app therefore
checks every request itself, as Airflow's API does: the UI's session cookie (``_token``, sent by the
same-origin iframe) or a bearer token, and the auth manager's permission to see the website; a browser
without a session is sent to the login page. Importing this file builds the app but touches no database:
the connections are resolved on the first request.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from modelops.governance.web import create_app

URL_PREFIX = "/modelops"

governance_app = {
    "app": create_app(require_login=True),
    "url_prefix": URL_PREFIX,
    "name": "ModelOps governance",
}

governance_view = {
    "name": "Model governance",
    # Relative (no leading slash): the UI resolves it against its own base URL, so a deployment under a
    # sub-path keeps working. url_route renders it inside the UI (an iframe at /plugin/modelops).
    "href": URL_PREFIX.lstrip("/") + "/",
    "destination": "nav",
    "url_route": "modelops",
    "category": "browse",
}


class ModelOpsGovernancePlugin(AirflowPlugin):
    name = "modelops_governance"
    fastapi_apps = [governance_app]
    external_views = [governance_view]
