"""``GatewayClient``: the scoring gateway's admin and scoring API over HTTP, for deployment.

Plain HTTP with httpx and no Airflow: the Airflow hook only resolves the connection and returns one.
"""

from __future__ import annotations

from typing import Any

import httpx

from modelops.errors import DeploymentFailed

CALLER_ID_HEADER = "X-Caller-Id"
MODEL_VERSION_HEADER = "X-Model-Version"


class GatewayClient:
    """Stage, reload, inspect and score models on one scoring gateway."""

    def __init__(
        self,
        base_url: str,
        *,
        admin_token: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        """``admin_token`` authenticates the admin routes and the deployment's smoke tests (logged under
        the smoke-test caller id); ``api_key``, when given, is a team's key that scoring calls use instead."""
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def __repr__(self) -> str:
        return f"GatewayClient({self.base_url!r})"  # never the token or the key

    def invocations_url(self, model: str) -> str:
        return f"{self.base_url}/models/{model}/invocations"

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DeploymentFailed(
                f"scoring gateway at {self.base_url} did not answer {method} {path}: {exc}; "
                "is it running (make demo starts it)?"
            ) from exc

    def _admin(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._call(method, path, **kwargs)
        if response.status_code >= 400:
            raise DeploymentFailed(
                f"scoring gateway refused {method} {path}: HTTP {response.status_code} {response.text[:500]}"
            )
        return response.json() if response.content else {}

    def stage(self, model: str, version: str) -> dict[str, Any]:
        """Load ``version`` next to the live one; it answers only requests that ask for it by version."""
        return self._admin("POST", f"/admin/models/{model}/stage", json={"version": str(version)})

    def unstage(self, model: str) -> dict[str, Any]:
        return self._admin("DELETE", f"/admin/models/{model}/stage")

    def reload(self, model: str) -> dict[str, Any]:
        """Make the gateway serve whatever the registry's ``champion`` alias points at now."""
        return self._admin("POST", f"/admin/models/{model}/reload")

    def status(self) -> dict[str, Any]:
        return self._admin("GET", "/admin/models")

    def live_version(self, model: str) -> str | None:
        live = self.status().get("models", {}).get(model, {}).get("live_version")
        return None if live is None else str(live)

    def environment(self) -> dict[str, str | None]:
        """The gateway's Python and framework versions (``modelops.environment.serving_environment``)."""
        return dict(self._admin("GET", "/admin/environment").get("environment", {}))

    def serving(self, model: str) -> dict[str, Any]:
        """What the gateway serves of ``model``: ``live_version``, ``challenger_version``, ``challenger_share``
        and ``canary_problem`` (empty when it does not know the model)."""
        return dict(self.status().get("models", {}).get(model, {}))

    def score(
        self, model: str, payload: dict[str, Any], *, version: str | None = None, caller_id: str
    ) -> httpx.Response:
        # The caller id the log records is the credential's (the admin token's: the smoke-test caller;
        # a team key's: team:key_id). X-Caller-Id is still sent for gateways that run without an admin token.
        headers = {CALLER_ID_HEADER: caller_id}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if version is not None:
            headers[MODEL_VERSION_HEADER] = str(version)
        return self._call("POST", f"/models/{model}/invocations", json=payload, headers=headers)

    def close(self) -> None:
        self._http.close()
