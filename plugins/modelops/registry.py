"""``ModelRegistry``: the platform's own view of the MLflow registry and tracking server.

Stages take a ``ModelRegistry`` and nothing else of MLflow: versions, aliases, tags, run metrics,
artifacts and the runs the platform logs. It wraps one ``MlflowClient`` created with an explicit
tracking and registry URI, and never sets MLflow's process-wide tracking URI (``mlflow.set_tracking_uri``),
so two registries in one process (a test, a migration) never see each other's state. Results are plain
dataclasses of this module, so no caller depends on MLflow's entity classes. Imports no Airflow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelops.errors import RegistryError

if TYPE_CHECKING:
    from mlflow import MlflowClient

# Errors MLflow raises for a missing model, version or alias (the alias one differs by backend).
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version."""

    name: str
    version: str
    run_id: str | None
    source: str
    tags: dict[str, str]
    aliases: tuple[str, ...]
    created_ms: int | None

    @classmethod
    def from_mlflow(cls, version: Any) -> VersionInfo:
        return cls(
            name=version.name,
            version=str(version.version),
            run_id=version.run_id or None,
            source=version.source,
            tags=dict(version.tags or {}),
            aliases=tuple(getattr(version, "aliases", None) or ()),
            created_ms=version.creation_timestamp,
        )


@dataclass(frozen=True)
class RunInfo:
    """One MLflow run: what the platform reads back of it."""

    run_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    artifact_uri: str


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: its tags (copied from the model spec) and its aliases."""

    name: str
    tags: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)


class ModelRegistry:
    """Versions, aliases, tags, run metrics and artifacts of one MLflow server."""

    def __init__(self, tracking_uri: str, registry_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri

    def __repr__(self) -> str:
        return f"ModelRegistry({self.tracking_uri!r})"

    @cached_property
    def _client(self) -> MlflowClient:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)

    # --- registered models -------------------------------------------------------------------------

    def model(self, name: str) -> ModelInfo | None:
        """The registered model ``name``, or None when nothing is registered under that name yet."""
        from mlflow.exceptions import MlflowException

        try:
            found = self._client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        aliases = {alias: str(version) for alias, version in (found.aliases or {}).items()}
        return ModelInfo(name=found.name, tags=dict(found.tags or {}), aliases=aliases)

    def ensure_model(self, name: str, tags: Mapping[str, str], description: str = "") -> ModelInfo:
        """Register ``name`` if it is new and (re)set its model-level tags; returns it."""
        from mlflow.exceptions import MlflowException

        if self.model(name) is None:
            try:
                self._client.create_registered_model(name, tags=dict(tags), description=description or None)
            except MlflowException as exc:
                # Two first trainings racing: the other one created it, which is what was wanted.
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        for key, value in tags.items():
            self._client.set_registered_model_tag(name, key, str(value))
        if description:
            self._client.update_registered_model(name, description=description)
        info = self.model(name)
        assert info is not None
        return info

    def model_names(self) -> list[str]:
        return sorted(model.name for model in self._client.search_registered_models())

    # --- versions ----------------------------------------------------------------------------------

    def version(self, name: str, version: str | int) -> VersionInfo:
        """One version; a missing model or version is a ``RegistryError`` naming both."""
        from mlflow.exceptions import MlflowException

        try:
            return VersionInfo.from_mlflow(self._client.get_model_version(name, str(version)))
        except MlflowException as exc:
            if exc.error_code not in _NOT_FOUND:
                raise
            known = [v.version for v in self.versions(name)]
            raise RegistryError(
                f"model {name!r} has no version {version!r} in the registry at {self.tracking_uri} "
                f"(versions: {known or 'none'}); give a version that exists"
            ) from exc

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``name``, oldest first (empty when the model is not registered)."""
        found = self._client.search_model_versions(f"name = {_literal(name)}")
        return self._with_aliases(name, sorted(found, key=lambda v: int(v.version)))

    def find_versions(self, name: str, **tags: str) -> list[VersionInfo]:
        """Versions of ``name`` carrying all the given tags, newest first."""
        clauses = [f"name = {_literal(name)}"] + [
            f"tags.`{key}` = {_literal(str(value))}" for key, value in tags.items()
        ]
        found = self._client.search_model_versions(" AND ".join(clauses))
        return self._with_aliases(name, sorted(found, key=lambda v: int(v.version), reverse=True))

    def _with_aliases(self, name: str, found: list[Any]) -> list[VersionInfo]:
        # MLflow's version search returns no aliases; fill them from the registered model.
        by_version: dict[str, list[str]] = {}
        for alias, version in (self.aliases(name) if found else {}).items():
            by_version.setdefault(version, []).append(alias)
        return [
            replace(info, aliases=tuple(sorted(by_version.get(info.version, ()))))
            for info in (VersionInfo.from_mlflow(v) for v in found)
        ]

    def register_version(
        self, name: str, *, run_id: str, artifact_path: str, tags: Mapping[str, str]
    ) -> VersionInfo:
        """Register the model logged at ``artifact_path`` of run ``run_id``, with its tags in the same call,
        so a version never exists without its lineage."""
        run = self._client.get_run(run_id)
        source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
        created = self._client.create_model_version(
            name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}
        )
        return VersionInfo.from_mlflow(created)

    def set_version_tags(self, name: str, version: str | int, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._client.set_model_version_tag(name, str(version), key, str(value))

    # --- aliases -----------------------------------------------------------------------------------

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version of a registered model; empty when nothing is registered under ``name``."""
        info = self.model(name)
        return dict(info.aliases) if info else {}

    def version_by_alias(self, name: str, alias: str) -> VersionInfo | None:
        """The version an alias points at, or None when the alias (or the model) does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return VersionInfo.from_mlflow(self._client.get_model_version_by_alias(name, alias))
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                return None
            raise

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        self._client.set_registered_model_alias(name, alias, str(version))

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``alias``; removing one that is not set is not an error (a retry may do that)."""
        from mlflow.exceptions import MlflowException

        try:
            self._client.delete_registered_model_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code not in _NOT_FOUND:
                raise

    # --- runs --------------------------------------------------------------------------------------

    def run(self, run_id: str) -> RunInfo:
        run = self._client.get_run(run_id)
        return RunInfo(
            run_id=run.info.run_id,
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            tags=dict(run.data.tags),
            artifact_uri=run.info.artifact_uri,
        )

    def run_metrics(self, run_id: str) -> dict[str, float]:
        return dict(self._client.get_run(run_id).data.metrics)

    def experiment_id(self, experiment: str) -> str:
        """The id of experiment ``experiment``, created on first use."""
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self._client.create_experiment(experiment)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self._client.get_experiment_by_name(experiment).experiment_id

    def find_run(self, experiment: str, tags: Mapping[str, str]) -> str | None:
        """The id of a run in ``experiment`` carrying all ``tags``, or None."""
        if not tags:
            raise ValueError("find_run needs at least one tag to match")
        clauses = " and ".join(f"tags.`{key}` = {_literal(str(value))}" for key, value in tags.items())
        found = self._client.search_runs(
            [self.experiment_id(experiment)], filter_string=clauses, max_results=1
        )
        return found[0].info.run_id if found else None

    def log_run(
        self,
        *,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        artifact_dirs: Mapping[str, Path] | None = None,
        artifact_files: Mapping[str, Path] | None = None,
        json_artifacts: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> str:
        """Log one finished run (or add to ``run_id``) and return its id.

        ``artifact_dirs`` maps an artifact path to a local folder logged under it, ``artifact_files``
        an artifact folder to a local file, ``json_artifacts`` an artifact file path to a JSON-safe value.
        """
        from mlflow.entities import Metric, Param, RunTag

        client = self._client
        if run_id is None:
            run_id = client.create_run(
                self.experiment_id(experiment), run_name=run_name, tags=dict(tags)
            ).info.run_id
        else:
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
        )
        for artifact_path, folder in (artifact_dirs or {}).items():
            client.log_artifacts(run_id, str(folder), artifact_path)
        for artifact_path, file in (artifact_files or {}).items():
            client.log_artifact(run_id, str(file), artifact_path)
        for artifact_file, value in (json_artifacts or {}).items():
            client.log_dict(run_id, value, artifact_file)
        client.set_terminated(run_id)
        return run_id

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._client.log_text(run_id, text, artifact_file)

    # --- artifacts ---------------------------------------------------------------------------------

    def download_version(self, name: str, version: str | int, dst: Path) -> Path:
        """Download the model files of a version into ``dst`` and return the model folder."""
        uri = self._client.get_model_version_download_uri(name, str(version))
        from mlflow.artifacts import download_artifacts

        return Path(download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=self.tracking_uri))

    def load_pyfunc(self, name: str, version: str | int, dst: Path) -> Any:
        """The version as an MLflow pyfunc model, loaded from its own download in ``dst`` (kept: a model may
        read its files lazily)."""
        import mlflow.pyfunc

        return mlflow.pyfunc.load_model(str(self.download_version(name, version, dst)))


def _literal(value: str) -> str:
    """A string literal for MLflow's search grammar, which has no escape for a quote inside a literal:
    single quotes, or double quotes when the value holds a single quote."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise RegistryError(f"cannot search the registry for {value!r}: it holds both ' and \"; rename it")


def json_tag(value: Any) -> str:
    """A list or mapping as a tag value (tags are strings)."""
    return json.dumps(value, sort_keys=True)
