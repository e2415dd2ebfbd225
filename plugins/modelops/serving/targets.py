"""Where a model's approved versions go live: the serving targets behind one interface.

The model spec chooses (``serving.target``):

- ``local``: the scoring gateway (:class:`~modelops.serving.client.GatewayClient`), online, with canaries;
- ``batch``: scored by the ``modelops_batch_scoring`` DAG on Spark (:mod:`modelops.stages.batch_scoring`),
  which reads the recorded champion when it runs. Deploying to it is the smoke test (the version loaded
  here, after its files were checked, scoring rows of its training data) and the promotion record; there
  is no traffic to split, so no canary;
- ``kubernetes``: the gateway image as the model's own Deployment, Service and HorizontalPodAutoscaler
  (:class:`~modelops.serving.kubernetes.KubernetesTarget`), staged and smoke-tested in a staging pod, no
  canary.

The deployment stage talks to a target only through :class:`ServingTarget`. Imports nothing of Airflow.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from modelops.environment import serving_environment
from modelops.errors import DeploymentFailed
from modelops.evidence import (
    CHAMPION_FIELD,
    EvidenceMismatch,
    champion_record,
    check_files,
    download_version_files,
    gate_record,
    hash_tree,
    recorded_files,
)

if TYPE_CHECKING:
    from modelops.audit import AuditStore
    from modelops.registry import ModelRegistry

TARGETS = ("local", "batch", "kubernetes")
"""The kinds of target a model spec may name (``serving.target``)."""


class ServingTarget(Protocol):
    """What deployment needs of a target: stage a version, smoke-test it, make the recorded champion live."""

    def environment(self) -> dict[str, str | None]:
        """The Python and framework versions a version will run with there."""

    def stage(self, model: str, version: str) -> dict[str, Any]:
        """Load ``version`` beside the live one (its files checked against the gate's approval first)."""

    def unstage(self, model: str) -> dict[str, Any]: ...

    def score(
        self, model: str, payload: dict[str, Any], *, version: str | None = None, caller_id: str
    ) -> httpx.Response:
        """Score a payload (MLflow's ``dataframe_split``) with the staged ``version``: the smoke test."""

    def reload(self, model: str) -> dict[str, Any]:
        """Serve the champion the audit log records now."""

    def live_version(self, model: str) -> str | None: ...

    def serving(self, model: str) -> dict[str, Any]:
        """``live_version`` and, where traffic can be split, ``challenger_version`` and its share."""

    def invocations_url(self, model: str) -> str:
        """Where (or how) the model is scored on this target, for the record and the summary."""


class BatchTarget:
    """The ``batch`` target: versions are scored by ``modelops_batch_scoring`` (Spark), which reads the
    recorded champion itself. Staging loads the version in this process after checking its files against
    the gate's approval; the smoke test scores through MLflow's pyfunc, as Spark's UDF does."""

    def __init__(self, registry: ModelRegistry, audit: AuditStore) -> None:
        self.registry = registry
        self.audit = audit
        self._staged: dict[str, tuple[str, Any, Path]] = {}

    def __repr__(self) -> str:
        return "BatchTarget(modelops_batch_scoring)"

    def environment(self) -> dict[str, str | None]:
        # Spark's local mode runs the UDF with this interpreter; a cluster is configured to match it.
        return serving_environment()

    def invocations_url(self, model: str) -> str:
        return f"dag modelops_batch_scoring (model={model})"

    def stage(self, model: str, version: str) -> dict[str, Any]:
        import mlflow.pyfunc

        self.unstage(model)
        try:
            expected = recorded_files(gate_record(self.audit, model, version))
        except EvidenceMismatch as exc:
            raise DeploymentFailed(f"{exc}; version {version} was not loaded") from exc
        folder = Path(tempfile.mkdtemp(prefix="modelops-batch-stage-"))
        try:
            model_dir = download_version_files(self.registry, model, version, folder)
            check_files(
                expected,
                hash_tree(model_dir),
                what=f"{model} v{version} is not the version the gate approved",
            )
            loaded = mlflow.pyfunc.load_model(str(model_dir))
        except EvidenceMismatch as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise DeploymentFailed(f"{exc}; it was not loaded") from exc
        except Exception as exc:  # any loader failure is the stage's failure, named
            shutil.rmtree(folder, ignore_errors=True)
            raise DeploymentFailed(f"{model} v{version} failed to load: {type(exc).__name__}") from exc
        self._staged[model] = (str(version), loaded, folder)
        return {"model": model, "staged_version": str(version), "live_version": self.live_version(model)}

    def unstage(self, model: str) -> dict[str, Any]:
        staged = self._staged.pop(model, None)
        if staged is not None:
            shutil.rmtree(staged[2], ignore_errors=True)
        return {"model": model, "unstaged_version": staged[0] if staged else None}

    def score(
        self, model: str, payload: dict[str, Any], *, version: str | None = None, caller_id: str
    ) -> httpx.Response:
        from mlflow.pyfunc import scoring_server

        staged = self._staged.get(model)
        if staged is None or (version is not None and staged[0] != str(version)):
            return httpx.Response(
                404, json={"message": f"{model} v{version} is not staged on the batch target"}
            )
        loaded = staged[1]
        try:
            # Parsed as the gateway and MLflow's server parse it (the signature's types applied).
            frame = scoring_server._parse_json_data(
                payload, loaded.metadata, loaded.metadata.get_input_schema()
            ).data
            predictions = loaded.predict(frame)
        except Exception as exc:  # the smoke test reports it; its text may quote values, so only the type
            return httpx.Response(
                400, json={"message": f"the model could not score the rows ({type(exc).__name__})"}
            )
        buffer = io.StringIO()
        scoring_server.predictions_to_json(predictions, buffer)
        return httpx.Response(
            200,
            content=buffer.getvalue().encode(),
            headers={"X-Model-Version": staged[0], "Content-Type": "application/json"},
        )

    def live_version(self, model: str) -> str | None:
        record = champion_record(self.audit, model)
        version = None if record is None else record.details.get(CHAMPION_FIELD)
        return None if version is None else str(version)

    def reload(self, model: str) -> dict[str, Any]:
        # Nothing to load: each batch run reads the recorded champion and checks its files itself.
        return {"model": model, "live_version": self.live_version(model)}

    def serving(self, model: str) -> dict[str, Any]:
        return {"live_version": self.live_version(model), "challenger_version": None, "challenger_share": 0.0}

    def close(self) -> None:
        for model in list(self._staged):
            self.unstage(model)
