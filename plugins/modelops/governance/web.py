"""The governance view: server-rendered pages over :mod:`modelops.governance.inventory`.

``create_app()`` returns a FastAPI app; the Airflow plugin (``plugins/modelops_governance_plugin.py``)
mounts it on the api-server under ``/modelops`` and adds "Model governance" to the UI's navigation.

- ``/`` : the model inventory (owner, team, risk tier, champion and challenger with their traffic shares,
  compliance and approver, last verdict, open alerts, links per version) and the chain's verification;
- ``/models/<name>/versions/<version>`` : that version's lineage (:mod:`modelops.lineage`, as
  ``modelops lineage`` prints it: links and whether each verifies, alias moves, traffic) and every audit
  record naming it.

Every value is escaped (Jinja2 autoescape); pages show names, versions, decisions and times only, never a
record's data values (reasons, metrics, file hashes). Links are relative to where the app is mounted
(the request's ``root_path``), so the pages work under the api-server's base URL.

**Authentication.** Airflow does not protect a plugin's FastAPI app: the api-server mounts it as it is.
With ``require_login`` (the plugin's setting) every page resolves the caller as Airflow's own API does
(:func:`airflow.api_fastapi.core_api.security.get_user`: a bearer token, else the UI's ``_token`` session
cookie, which the iframe of the UI's plugin page sends because it is same-origin), and asks the auth
manager whether that user may see the Airflow website (``AccessView.WEBSITE``). A browser without a
session is redirected to the auth manager's login page; a bad token is refused (403).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import DictLoader, Environment, select_autoescape

from modelops.governance.inventory import CachedChainStatus, inventory, lineage_view, version_trail

if TYPE_CHECKING:
    from modelops.audit import AnchorStore, AuditStore
    from modelops.registry import ModelRegistry
    from modelops.settings import Catalog

_VERSION = re.compile(r"[A-Za-z0-9._-]{1,64}")


class AirflowSources:
    """The catalog from ``include/``, the audit log, its anchors and the registry from Airflow's
    connections (``modelops_audit``, ``modelops_audit_key``, ``modelops_audit_anchor``,
    ``mlflow_default``), as the stages resolve them; each made once, on first use."""

    def catalog(self) -> Catalog:
        from modelops.settings import load_catalog

        return load_catalog()

    @cached_property
    def _audit_hook(self) -> Any:
        from modelops.hooks.audit import AuditHook

        return AuditHook()

    def audit(self) -> AuditStore:
        return self._audit_hook.store

    def anchors(self) -> AnchorStore | None:
        from modelops.errors import ModelOpsError

        try:
            return self._audit_hook.anchor_store
        except ModelOpsError:
            return None  # no anchor connection: the page checks the chain alone and says so

    @cached_property
    def _registry(self) -> ModelRegistry:
        from modelops.hooks.registry import MlflowRegistryHook

        return MlflowRegistryHook().registry

    def registry(self) -> ModelRegistry | None:
        return self._registry


_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{% block title %}Model governance{% endblock %}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.2rem; color: #1a202c; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { border: 1px solid #cbd5e0; padding: 0.35rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #edf2f7; }
.ok { color: #22543d; } .bad { color: #9b2c2c; font-weight: 600; } .muted { color: #718096; }
.banner { padding: 0.6rem 0.8rem; border-radius: 4px; margin-bottom: 1rem; }
.banner.ok { background: #f0fff4; border: 1px solid #9ae6b4; }
.banner.bad { background: #fff5f5; border: 1px solid #feb2b2; }
.note { color: #975a16; font-size: 0.85rem; }
</style></head><body>{% block body %}{% endblock %}</body></html>
"""

_INDEX = """{% extends "base.html" %}
{% from "serving.html" import serving %}
{% block body %}
<h1>Model governance</h1>
{% if chain.ok %}
<div class="banner ok" id="chain-status">Audit chain: <strong>INTACT</strong>: {{ chain.records }} records verified
{%- if chain.anchored %}, anchors checked (newest anchored seq={{ chain.newest_anchored_seq }},
{{ chain.unanchored }} not anchored yet){% else %}; anchors not checked{% endif %}.
<span class="muted">Checked at {{ chain.checked_at }} in {{ chain.seconds }} s.</span>
{% if chain.note %}<div class="note">{{ chain.note }}</div>{% endif %}</div>
{% else %}
<div class="banner bad" id="chain-status">Audit chain: <strong>BROKEN</strong>
{%- if chain.first_bad_seq is not none %} at seq={{ chain.first_bad_seq }}{% endif %}: {{ chain.problem }}
<span class="muted">Checked at {{ chain.checked_at }}.</span>
{% if chain.note %}<div class="note">{{ chain.note }}</div>{% endif %}</div>
{% endif %}
<table id="inventory">
<thead><tr><th>Model</th><th>Owner</th><th>Team</th><th>Risk tier</th><th>Champion</th><th>Challenger</th>
<th>Last verdict</th><th>Open alerts</th><th>Versions: lineage and audit trail</th></tr></thead>
<tbody>
{% for row in rows %}
<tr class="model" data-model="{{ row.name }}">
<td><strong>{{ row.name }}</strong></td><td>{{ row.owner }}</td><td>{{ row.team }}</td><td>{{ row.risk_tier }}</td>
<td class="champion">{{ serving(row.champion) }}</td>
<td class="challenger">{{ serving(row.challenger) }}</td>
<td class="verdict">{% if row.last_verdict %}{% set v = row.last_verdict %}
<span class="{{ 'ok' if v.decision == 'ok' else 'bad' }}">{{ v.decision }}</span>
{% if v.version %}(v{{ v.version }}){% endif %}<br>
<span class="muted">window {{ v.window_start | when or '?' }} to {{ v.window_end | when or '?' }}</span>
{% else %}<span class="muted">none yet</span>{% endif %}</td>
<td class="alerts">{% for a in row.open_alerts %}<div class="bad">{{ a.tier }}{% if a.version %} v{{ a.version }}{% endif %}
{% if a.decision != 'sent' %}({{ a.decision }}){% endif %} <span class="muted">{{ a.recorded_at | when }} (seq={{ a.seq }})</span></div>
{% else %}<span class="muted">none</span>{% endfor %}</td>
<td class="versions">{% for version in row.versions %}<a href="{{ root }}/models/{{ row.name | urlquote }}/versions/{{ version | urlquote }}">v{{ version }}</a>{% if not loop.last %}, {% endif %}
{% else %}<span class="muted">none registered</span>{% endfor %}</td>
</tr>
{% if row.notes %}<tr><td colspan="9" class="note">{{ row.name }}: {{ row.notes | join('; ') }}</td></tr>{% endif %}
{% endfor %}
</tbody></table>
<p class="muted">Read from the authentic audit records (the registry's tags and aliases decide nothing); an
alert stays open until an ok verdict or a recovery of its model.</p>
{% endblock %}
"""

_SERVING = """{% macro serving(s) -%}
{%- if s -%}
<strong>v{{ s.version }}</strong> serving {{ '%.0f' | format(s.share * 100) }} %<br>
{%- set c = s.compliance %}
{%- if c.decision %}<span class="{{ 'ok' if c.decision == 'approved' and not c.expired else 'bad' }}">{{ c.decision }}
{%- if c.expired %} (expired){% endif %}</span>{% if c.approved_by %} by {{ c.approved_by }}{% endif %}
{%- else %}<span class="bad">no authentic gate decision</span>{% endif %}
{%- if s.since %}<br><span class="muted">since {{ s.since | when }}</span>{% endif %}
{%- else -%}<span class="muted">none</span>{%- endif -%}
{%- endmacro %}"""

_VERSION_PAGE = """{% extends "base.html" %}
{% block title %}{{ name }} v{{ version }}: audit trail{% endblock %}
{% block body %}
<p><a href="{{ root }}/">&larr; Model governance</a></p>
<h1>{{ name }} v{{ version }}</h1>
<p>Owner {{ spec.owner }}, team {{ spec.team }}, risk tier {{ spec.risk_tier }}.</p>
{% if lineage %}
<h2>Lineage {% if lineage.verifies %}<span class="ok">(every link verifies)</span>{% else %}<span class="bad">(DOES NOT VERIFY)</span>{% endif %}</h2>
<p class="muted">As <code>modelops lineage {{ name }}@{{ version }}</code> prints it, with each link's evidence.</p>
<table id="lineage"><thead><tr><th>stage</th><th>action</th><th>decision</th><th>seq</th><th>recorded at</th><th>verifies</th></tr></thead><tbody>
{% for stage, action, decision, seq, at, ok, problems in lineage.links %}<tr><td>{{ stage }}</td><td>{{ action }}</td><td>{{ decision }}</td>
<td>{{ seq if seq is not none else '' }}</td><td>{{ at | when }}</td>
<td>{% if ok %}<span class="ok">yes</span>{% else %}<span class="bad">NO ({{ problems }} problem{{ 's' if problems != 1 }})</span>{% endif %}</td></tr>
{% endfor %}</tbody></table>
{% if lineage.alias_moves %}<h3>Alias moves</h3><table id="alias-moves"><thead><tr><th>alias</th><th>change</th><th>to</th><th>by</th><th>at</th><th>seq</th></tr></thead><tbody>
{% for alias, change, to, by, at, seq, authentic in lineage.alias_moves %}<tr><td>{{ alias }}</td><td>{{ change }}</td><td>{{ 'v' ~ to if to else '' }}</td>
<td>{{ by }}</td><td>{{ at | when }}</td><td>{{ seq }}{% if not authentic %} <span class="bad">(not authentic)</span>{% endif %}</td></tr>
{% endfor %}</tbody></table>{% endif %}
{% if lineage.traffic %}<h3>Traffic</h3><table id="traffic"><thead><tr><th>arm</th><th>share</th><th>from</th><th>to</th></tr></thead><tbody>
{% for arm, share, start, end in lineage.traffic %}<tr><td>{{ arm }}</td><td>{{ '%.0f' | format(share * 100) }} %</td><td>{{ start | when }}</td><td>{{ (end | when) or 'now' }}</td></tr>
{% endfor %}</tbody></table>{% endif %}
{% endif %}
<h2>Audit trail</h2>
{% if trail %}
<table id="trail"><thead><tr><th>seq</th><th>recorded at</th><th>action</th><th>decision</th><th>actor</th>
<th>DAG run</th><th>facts</th><th>verifies</th></tr></thead><tbody>
{% for e in trail %}<tr data-seq="{{ e.seq }}"><td>{{ e.seq }}</td><td>{{ e.recorded_at | when }}</td><td>{{ e.action }}</td>
<td>{{ e.decision }}</td><td>{{ e.actor }}</td><td>{% if e.dag_id %}{{ e.dag_id }} / {{ e.run_id }}{% endif %}</td>
<td>{% for k, v in e.facts %}{{ k }}={{ v }}{% if not loop.last %}, {% endif %}{% endfor %}</td>
<td>{% if e.authentic %}<span class="ok">yes</span>{% else %}<span class="bad">NO: fails its HMAC check</span>{% endif %}</td></tr>
{% endfor %}</tbody></table>
{% else %}<p class="muted">No audit record names {{ name }} v{{ version }}.</p>{% endif %}
{% endblock %}
"""


def _templates() -> Environment:
    env = Environment(
        loader=DictLoader(
            {
                "base.html": _BASE,
                "serving.html": _SERVING,
                "index.html": _INDEX,
                "version.html": _VERSION_PAGE,
            }
        ),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    env.filters["urlquote"] = lambda value: quote(str(value), safe="")
    env.filters["when"] = _when
    return env


def _when(value: Any) -> str:
    """An ISO time as ``YYYY-MM-DD HH:MM UTC`` (the records keep microseconds; a page needs minutes)."""
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


async def require_airflow_login(request: Request) -> None:
    """The caller must be an Airflow user allowed to see the website (see the module docstring)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi.security import HTTPAuthorizationCredentials

    credentials = None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=token.strip())
    user = await get_user(request, None, credentials)
    if not get_auth_manager().is_authorized_view(access_view=AccessView.WEBSITE, user=user):
        raise HTTPException(status_code=403, detail="Forbidden")


def create_app(
    sources: Any | None = None,
    *,
    require_login: bool = True,
    chain_cache_seconds: float = 60.0,
    login: Callable[..., Any] = require_airflow_login,
) -> FastAPI:
    """The governance app over ``sources`` (an object with ``catalog()``, ``audit()``, ``anchors()`` and
    ``registry()``; default :class:`AirflowSources`, resolved on the first request)."""
    app = FastAPI(title="ModelOps governance", docs_url=None, redoc_url=None, openapi_url=None)
    templates = _templates()
    chain = CachedChainStatus(ttl_seconds=chain_cache_seconds)
    state: dict[str, Any] = {"sources": sources}
    dependencies = [Depends(login)] if require_login else []

    def get_sources() -> Any:
        if state["sources"] is None:
            state["sources"] = AirflowSources()
        return state["sources"]

    def root_of(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.exception_handler(HTTPException)
    async def _login_redirect(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 401 and "text/html" in request.headers.get("accept", ""):
            from airflow.api_fastapi.app import get_auth_manager

            return RedirectResponse(
                get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303
            )
        return HTMLResponse(f"{exc.status_code}: {exc.detail}", status_code=exc.status_code)

    @app.get("/", response_class=HTMLResponse, dependencies=dependencies)
    def index(request: Request) -> HTMLResponse:
        found = get_sources()
        audit = found.audit()
        rows = inventory(found.catalog(), found.registry(), audit)
        status = chain(audit, found.anchors())
        html = templates.get_template("index.html").render(rows=rows, chain=status, root=root_of(request))
        return HTMLResponse(html)

    @app.get("/models/{name}/versions/{version}", response_class=HTMLResponse, dependencies=dependencies)
    def version_page(request: Request, name: str, version: str) -> HTMLResponse:
        found = get_sources()
        catalog = found.catalog()
        if name not in catalog.models or not _VERSION.fullmatch(version):
            raise HTTPException(status_code=404, detail="no such model version")
        html = templates.get_template("version.html").render(
            name=name,
            version=version,
            spec=catalog.models[name],
            trail=version_trail(found.audit(), name, version),
            lineage=lineage_view(found.audit(), found.registry(), name, version),
            root=root_of(request),
        )
        return HTMLResponse(html)

    return app
