"""The MLflow REST calls the demo needs: a registered model's versions and aliases.

The driver tells that a model went through training, the gate and deployment by its ``champion`` alias
moving to a newer version, read here, rather than by guessing which Asset-triggered runs belong to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from modelops.errors import ConfigurationError
from modelops.vocabulary import Alias


@dataclass(frozen=True)
class RegisteredModelFacts:
    name: str
    latest_version: str | None
    aliases: dict[str, str]  # alias -> version

    def version_for(self, alias: str) -> str | None:
        return self.aliases.get(alias)

    @property
    def champion(self) -> str | None:
        return self.aliases.get(Alias.CHAMPION)


def registered_model_facts(answer: Mapping[str, Any]) -> RegisteredModelFacts:
    """From MLflow's ``GET /api/2.0/mlflow/registered-models/get`` answer."""
    model = answer["registered_model"]
    versions = [str(v["version"]) for v in model.get("latest_versions", [])]
    latest = max(versions, key=int) if versions else None
    aliases = {a["alias"]: str(a["version"]) for a in model.get("aliases", [])}
    return RegisteredModelFacts(name=model["name"], latest_version=latest, aliases=aliases)


def is_newer(version: str | None, than: str | None) -> bool:
    """True when ``version`` exists and is a later version number than ``than`` (None: no version)."""
    return version is not None and (than is None or int(version) > int(than))


class MlflowApi:
    """MLflow's tracking server REST API (``/api/2.0/mlflow``): without credentials (the demo's, on
    loopback), or as ``auth`` (user, password) for a server with the basic-auth app (``make stack``)."""

    def __init__(self, base_url: str, auth: tuple[str, str] | None = None) -> None:
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, timeout=30, trust_env=False, auth=auth)

    def model(self, name: str) -> RegisteredModelFacts | None:
        """The registered model ``name``; None while it does not exist (not trained yet)."""
        answer = self._http.get("/api/2.0/mlflow/registered-models/get", params={"name": name})
        if answer.status_code == 404 or (
            answer.status_code >= 400 and "RESOURCE_DOES_NOT_EXIST" in answer.text
        ):
            return None
        if answer.status_code >= 400:
            raise ConfigurationError(
                f"MLflow at {self.base_url} answered {answer.status_code} for model {name!r}: "
                f"{answer.text[:300]}; see .demo/logs/mlflow.log"
            )
        return registered_model_facts(answer.json())

    def champion(self, name: str) -> str | None:
        """The version the ``champion`` alias of ``name`` points at (None: no model or no champion)."""
        facts = self.model(name)
        return facts.champion if facts else None

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        """The tags of ``name`` v``version`` (empty when the version does not exist yet)."""
        answer = self._http.get(
            "/api/2.0/mlflow/model-versions/get", params={"name": name, "version": str(version)}
        )
        if answer.status_code >= 400:
            return {}
        tags = answer.json().get("model_version", {}).get("tags", [])
        return {str(tag["key"]): str(tag.get("value", "")) for tag in tags}
