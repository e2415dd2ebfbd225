"""The scoring gateway: MLflow's scoring protocol in front of every deployed model's champion, plus a log.

Every registered model answers at ``POST /models/{name}/invocations``; the platform's default model (env
``MODELOPS_DEFAULT_MODEL``, else ``default_model`` of include/modelops.yaml) also answers at MLflow's own
``POST /invocations``, ``GET /ping``, ``/health`` and ``/version``, so MLflow's payloads work unchanged.
``GET /models/{name}/health`` and ``/models/{name}/version`` speak for one model; ``GET /health`` also
summarises every model the gateway knows (the model specs with serving enabled, and whatever it loaded).

What is live for a model is the champion the audit log authorises: the newest authentic promotion or
rollback record of the model (:mod:`modelops.evidence`) names a version and the sha256 of each of its
files. The registry's ``champion`` alias must agree; when someone moves it outside the pipeline the
gateway logs and reports the mismatch (``alias_mismatch`` in ``/health`` and ``/admin/models``) and keeps
serving the recorded champion. A version is downloaded and its files hashed *before* it is loaded (a
pyfunc runs code on load), and it is loaded only when every file matches the record. The gateway keeps
no deployment state of its own, so a restart resumes serving the recorded champions. A deployment stages
a version the compliance gate approved (``POST /admin/models/{name}/stage``; its files must match the
gate's record), smoke-tests it over HTTP with ``X-Model-Version`` while the previous champion keeps
serving everyone else, records the promotion, moves the alias, then calls
``POST /admin/models/{name}/reload``. Every call to an invocations endpoint lands in the prediction log.

Scoring and ``POST /labels`` need a team's API key (:mod:`modelops.serving.access`): the prediction log
records the key's ``team:key_id`` as the caller, and a model's spec names the teams that may call it
(``serving.allowed_teams``). The admin token scores too, as the deployment's smoke test. Before a model
sees an input, :mod:`modelops.serving.screening` refuses oversized bodies (unread), too many rows,
malformed or deeply nested JSON, columns and values the model's signature does not allow, and PII; every
refusal is a logged failed call whose message quotes no value.

Models are read through :class:`~modelops.registry.ModelRegistry` and downloaded into a temporary folder
the gateway owns (one sub-folder per model version, removed when the version is evicted and the whole
folder at shutdown); MLflow's process-wide tracking and registry URIs are left alone.

Parsing and response formatting are MLflow's own (``mlflow.pyfunc.scoring_server``) so that existing
MLflow clients work unchanged. Imports nothing of Airflow.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO, StringIO
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mlflow
import pandas as pd
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel
from mlflow.pyfunc import scoring_server as mlflow_scoring
from mlflow.pyfunc.utils.serving_data_parser import is_unified_llm_input
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from modelops.audit import AuditKeyring, AuditRecord, AuditStore
from modelops.audit.keys import KEYRING_EXAMPLE, KEYS_ENV
from modelops.environment import serving_environment
from modelops.errors import ConfigurationError, ModelOpsError, RegistryError
from modelops.evidence import (
    CHALLENGER_FIELD,
    CHAMPION_FIELD,
    SHARE_FIELD,
    EvidenceMismatch,
    active_canary,
    champion_record,
    check_files,
    gate_record,
    hash_tree,
    recorded_files,
)
from modelops.registry import ModelRegistry
from modelops.serving.access import KEYS_ENV as API_KEYS_ENV
from modelops.serving.access import KEYS_EXAMPLE as API_KEYS_EXAMPLE
from modelops.serving.access import ApiKeyring, Caller, presented_key
from modelops.serving.log_writer import BatchedPredictionWriter, PredictionLogBacklogged
from modelops.serving.prediction_log import (
    LabelCountMismatch,
    PredictionLog,
    PredictionRecord,
    UnknownRequestError,
    predictions_table,
)
from modelops.serving.ranges import RangesUnreadable, outside_ranges, read_ranges
from modelops.serving.screening import InputRefused, Screening, drop_columns, frame_records, typed_frame
from modelops.serving.telemetry import GatewayMetrics, trace_context
from modelops.vocabulary import ARM_HEADER, ROUTING_KEY_HEADER, SMOKE_TEST_CALLER, Alias, Arm

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
INLINE_SUBMIT_ROWS = 100
"""Calls of up to this many rows are queued for the log on the event loop itself."""
OUT_OF_RANGE_HEADER = "X-Out-Of-Training-Range"
"""On a response: the columns with values outside the version's training range (scored, flagged)."""
UNKNOWN_MODEL_LABEL = "_unknown"
"""The ``model`` label of calls to a model the gateway does not know (see ``invoke``)."""
MODEL_VERSION_HEADER = "X-Model-Version"
ANONYMOUS_CALLER = "anonymous"
SMOKE_CALLER_HEADER = "X-Caller-Id"
"""No longer chooses the caller id (the key does); honoured only as described in ``authenticate``."""
"""The caller id of a call that presented no valid key (it is refused, and logged under this id)."""
AUDIT_URL_ENV = "MODELOPS_AUDIT_URL"
ADMIN_TOKEN_ENV = "MODELOPS_GATEWAY_ADMIN_TOKEN"
PLATFORM_CALLER = Caller(caller_id=SMOKE_TEST_CALLER, team=None, key_id=None, platform=True)
"""Whoever holds the admin token: the deployment DAG, whose only scoring calls are its smoke tests, logged
under the smoke-test caller id that monitoring never counts as traffic."""


def invocations_path(name: str) -> str:
    """The path a model is scored at (``/invocations`` also answers for the default model)."""
    return f"/models/{quote(name, safe='')}/invocations"


# --- configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPolicy:
    """Who may call one model, and what its inputs are screened for (from its spec's ``serving``)."""

    allowed_teams: frozenset[str] = frozenset()
    screening: Screening = field(default_factory=Screening)


NO_SPEC_POLICY = ModelPolicy()
"""A registered model no spec describes: no team may call it (the platform's smoke tests still may)."""


@dataclass(frozen=True)
class GatewayConfig:
    tracking_uri: str
    predictions_url: str
    default_model: str
    """The model ``/invocations``, ``/ping``, ``/health`` and ``/version`` answer for."""
    models: tuple[str, ...] = ()
    """Models the gateway knows besides the default one: listed by ``/health`` and ``/admin/models`` even
    before their first request. Any other registered model is served too, on request."""
    admin_token: str | None = None
    audit_url: str = ""
    """The audit log: a version is served only when an authentic record there authorises its files."""
    audit_keyring: AuditKeyring | None = None
    api_keys: ApiKeyring | None = None
    """The teams' API keys (digests only). None: no team key is accepted; only the admin token scores."""
    policies: Mapping[str, ModelPolicy] = field(default_factory=dict)
    """Per model: the teams that may call it and its input screening. A model not listed gets
    :data:`NO_SPEC_POLICY`."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "policies", dict(self.policies))
        if not self.audit_url or self.audit_keyring is None:
            raise ConfigurationError(
                "the scoring gateway serves a model version only when the audit log holds an authentic "
                f"deployment record of its files, so it needs the audit log's URL and keyring; set "
                f"{AUDIT_URL_ENV} (e.g. postgresql+psycopg2://user:pass@db/audit) and {KEYS_ENV} "
                f"(e.g. {KEYRING_EXAMPLE})"
            )

    @property
    def known_models(self) -> list[str]:
        return sorted({self.default_model, *self.models})

    def policy(self, name: str) -> ModelPolicy:
        return self.policies.get(name, NO_SPEC_POLICY)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewayConfig:
        """Read ``MLFLOW_TRACKING_URI``, ``MODELOPS_PREDICTIONS_URL``, ``MODELOPS_AUDIT_URL``,
        ``MODELOPS_AUDIT_KEYS``, ``MODELOPS_GATEWAY_ADMIN_TOKEN``, ``MODELOPS_GATEWAY_KEYS`` and
        ``MODELOPS_DEFAULT_MODEL`` (default: ``default_model`` of include/modelops.yaml); the known models
        are the model specs of include/models/ with serving enabled, and each spec's ``serving`` block
        says which teams may call it and how its inputs are screened.

        The admin token and the API keys are required: without them the gateway would either serve
        anyone or no one, and neither is a safe thing to start silently."""
        from modelops.settings import load_catalog  # pydantic and YAML only; kept off the import path

        env = os.environ if env is None else env

        def required(name: str, example: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise ConfigurationError(
                    f"environment variable {name} is not set; the scoring gateway needs it, "
                    f"e.g. {name}={example}"
                )
            return value

        tracking_uri = required("MLFLOW_TRACKING_URI", "http://mlflow:5000")
        predictions_url = required("MODELOPS_PREDICTIONS_URL", "postgresql+psycopg2://user:pass@db/modelops")
        catalog = load_catalog()
        default_model = env.get("MODELOPS_DEFAULT_MODEL", "").strip() or catalog.platform.default_model
        if default_model not in catalog.models:
            raise ConfigurationError(
                f"MODELOPS_DEFAULT_MODEL={default_model!r} names no model spec; known models: "
                f"{sorted(catalog.models)}. Set it to one of them, or unset it to use default_model of "
                f"{catalog.root / 'modelops.yaml'}"
            )
        audit_url = required(AUDIT_URL_ENV, "postgresql+psycopg2://user:pass@db/audit")
        keyring = AuditKeyring.from_json(required(KEYS_ENV, KEYRING_EXAMPLE), source=KEYS_ENV)
        admin_token = required(ADMIN_TOKEN_ENV, "<32+ random characters; the deployment DAG's connection>")
        api_keys = ApiKeyring.from_json(
            required(
                API_KEYS_ENV, f"'{API_KEYS_EXAMPLE}' (`modelops gateway create-key --team TEAM` prints one)"
            ),
            source=API_KEYS_ENV,
        )
        policies = {
            name: ModelPolicy(
                allowed_teams=frozenset(spec.serving.allowed_teams or [spec.team]),
                screening=Screening.build(
                    spec.serving.screening,
                    catalog.datasets[spec.dataset].pii_patterns if spec.dataset in catalog.datasets else (),
                ),
            )
            for name, spec in catalog.models.items()
        }
        return cls(
            tracking_uri=tracking_uri,
            audit_url=audit_url,
            audit_keyring=keyring,
            predictions_url=predictions_url,
            default_model=default_model,
            models=tuple(sorted(name for name, spec in catalog.models.items() if spec.serving.enabled)),
            admin_token=admin_token,
            api_keys=api_keys,
            policies=policies,
        )


# --- errors ---------------------------------------------------------------------------------------


class GatewayError(ModelOpsError):
    """A request the gateway refuses; ``status`` and ``error_code`` become the HTTP response."""

    status: int = 500
    error_code: str = "INTERNAL_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadScoringRequest(GatewayError):
    status, error_code = 400, "BAD_REQUEST"


class Unauthorized(GatewayError):
    status, error_code = 401, "UNAUTHENTICATED"


class Forbidden(GatewayError):
    status, error_code = 403, "PERMISSION_DENIED"


class RefusedInput(GatewayError):
    """An input screening refused (:mod:`modelops.serving.screening`): its own status and code."""

    def __init__(self, refusal: InputRefused) -> None:
        super().__init__(refusal.message)
        self.status, self.error_code = refusal.status, refusal.error_code


class NotFound(GatewayError):
    status, error_code = 404, "RESOURCE_DOES_NOT_EXIST"


class ModelNotServed(NotFound):
    """The model name is neither known to the gateway nor registered in the registry."""


class VersionNotServed(GatewayError):
    status, error_code = 404, "VERSION_NOT_SERVED"


class UnsupportedMediaType(GatewayError):
    status, error_code = 415, "UNSUPPORTED_MEDIA_TYPE"


class ModelLoadFailed(GatewayError):
    status, error_code = 422, "MODEL_LOAD_FAILED"


class UnverifiedVersion(GatewayError):
    """The version's files or its authorising record do not check out: it is not loaded."""

    status, error_code = 409, "UNVERIFIED_MODEL_VERSION"


class NoDeployedVersion(GatewayError):
    status, error_code = 503, "NO_DEPLOYED_VERSION"


class RegistryUnavailable(GatewayError):
    status, error_code = 503, "REGISTRY_UNAVAILABLE"


def _error_response(error: GatewayError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error_code": error.error_code, "message": error.message},
        status_code=error.status,
        headers=dict(headers or {}),
    )


# --- what authorises a version ---------------------------------------------------------------------


class DeploymentEvidence:
    """Read-only access to the audit log's decisions, opened on first use (the log may not exist yet when
    the gateway starts: then nothing is authorised). Every record used is checked against the keyring."""

    def __init__(self, url: str, keyring: AuditKeyring | None) -> None:
        self.url = url
        self.keyring = keyring
        self._store: AuditStore | None = None
        self._lock = threading.Lock()

    def _open(self) -> AuditStore | None:
        with self._lock:
            if self._store is None:
                try:
                    self._store = AuditStore(self.url, keyring=self.keyring, create=False)
                except ConfigurationError as exc:
                    logger.warning("audit log not readable yet, so no version is authorised: %s", exc)
                    return None
            return self._store

    def champion(self, name: str) -> AuditRecord | None:
        store = self._open()
        return None if store is None else champion_record(store, name)

    def canary(self, name: str) -> AuditRecord | None:
        """The traffic record of ``name``'s running canary (see :func:`modelops.evidence.active_canary`)."""
        store = self._open()
        return None if store is None else active_canary(store, name)

    def approval(self, name: str, version: str) -> AuditRecord:
        store = self._open()
        if store is None:
            raise EvidenceMismatch(
                f"{name} v{version} has no compliance gate decision: the audit log is empty"
            )
        return gate_record(store, name, version)

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.dispose()
                self._store = None


# --- the models in memory -------------------------------------------------------------------------


@dataclass
class _Slot:
    """One model in memory: its lock, live and staged versions, loaded versions and last failure."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    live: str | None = None
    staged: str | None = None
    loaded: dict[str, PyFuncModel] = field(default_factory=dict)
    ranges: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    """Per loaded version: the numeric ranges it was trained on (from its verified training_ranges.json)."""
    problem: str | None = None
    """Why the champion could not be served at the last attempt (None once it serves)."""
    challenger: str | None = None
    """The canary's version, answering ``share`` of the callers beside the live champion (None: no canary)."""
    share: float = 0.0
    split_problem: str | None = None
    """Why the recorded canary is not served (its files do not check out, it does not load), else None."""
    mismatch: str | None = None
    """Why the registry's alias is not what serves (an alias moved outside the pipeline), else None."""

    @property
    def empty(self) -> bool:
        return self.live is None and self.staged is None and not self.loaded and self.problem is None


def in_challenger_share(split_key: str, name: str, challenger: str, share: float) -> bool:
    """Whether the caller ``split_key`` is one of the ``share`` of callers the challenger answers.

    A hash, not a random draw: the same caller lands on the same arm on every call of one canary (its
    answers stay consistent), and each canary of a model draws its own callers (the version is hashed too).
    """
    digest = hashlib.blake2b(f"{name}\0{challenger}\0{split_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2**64


class ServedModels:
    """Loaded models per name and version, which version is live (the alias) and which is staged.

    Each model has its own lock, so loading one model never holds up another. Reads of the fast path
    (already loaded) take no lock; resolving and loading do, so concurrent first requests load a model
    once. All methods block (registry calls, downloads, model loading): call them from a threadpool.
    """

    def __init__(
        self, registry: ModelRegistry, evidence: DeploymentEvidence, known: Iterable[str] = ()
    ) -> None:
        self.registry = registry
        self.evidence = evidence
        self.known = tuple(sorted(set(known)))
        self._slots: dict[str, _Slot] = {name: _Slot() for name in self.known}
        self._slots_lock = threading.Lock()
        self._workdir: Path | None = None

    # state

    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            with self._slots_lock:
                slot = self._slots.setdefault(name, _Slot())
        return slot

    def _forget_if_empty(self, name: str) -> None:
        # A name nobody registered must not leave a slot behind (request paths are arbitrary strings).
        with self._slots_lock:
            slot = self._slots.get(name)
            if name in self.known or slot is None or not slot.lock.acquire(blocking=False):
                return  # known, gone already, or in use by a request that may yet load it
            try:
                if slot.empty:
                    del self._slots[name]
            finally:
                slot.lock.release()

    def names(self) -> list[str]:
        """Every model the gateway knows: the configured ones and any it has served, staged or tried."""
        return sorted(
            name for name, slot in list(self._slots.items()) if name in self.known or not slot.empty
        )

    @property
    def workdir(self) -> Path:
        """The gateway's own temporary folder for model downloads, created on first use."""
        with self._slots_lock:
            if self._workdir is None:
                self._workdir = Path(tempfile.mkdtemp(prefix="modelops-gateway-"))
            return self._workdir

    def _folder(self, name: str, version: str) -> Path:
        # Quoted, so neither a name nor a version can climb out of the work folder or collide.
        return self.workdir / f"{quote(name, safe='')}@{quote(version, safe='')}"

    def close(self) -> None:
        """Drop every loaded model and remove the download folder (at shutdown)."""
        with self._slots_lock:
            for slot in self._slots.values():
                slot.loaded.clear()
                slot.live = slot.staged = None
            workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    # registry look-ups

    def _registry_call(self, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except RegistryError:
            raise
        except MlflowException as exc:
            raise RegistryUnavailable(
                f"the model registry at {self.registry.tracking_uri} refused a look-up: {exc.message}; "
                "check that the MLflow server is up and retry"
            ) from exc
        except OSError as exc:  # connection errors surface as requests' (OSError) exceptions
            raise RegistryUnavailable(
                f"the model registry at {self.registry.tracking_uri} did not answer: {exc}; "
                "check that the MLflow server is up and retry"
            ) from exc

    def _unknown_model(self, name: str) -> ModelNotServed:
        return ModelNotServed(
            f"model {name!r} is not registered in the model registry and this gateway does not know it; "
            f"known models: {self.names()}. Check the name (GET /admin/models lists what this gateway serves)"
        )

    def _champion_version(self, name: str) -> str:
        found = self._registry_call(self.registry.version_by_alias, name, Alias.CHAMPION)
        if found is not None:
            return found.version
        if self._registry_call(self.registry.model, name) is None:
            if name not in self.known:
                raise self._unknown_model(name)
            raise NoDeployedVersion(
                f"model {name!r} is not registered in the model registry yet; train it, deploy a version "
                f"(the deployment DAG sets the '{Alias.CHAMPION}' alias) and reload with "
                f"POST /admin/models/{name}/reload"
            )
        raise NoDeployedVersion(
            f"model {name!r} has no deployed version (no '{Alias.CHAMPION}' alias) in the registry; "
            "deploy a version (the deployment DAG sets the alias) and reload with "
            f"POST /admin/models/{name}/reload"
        )

    def _load(self, slot: _Slot, name: str, version: str, expected: Mapping[str, str]) -> PyFuncModel:
        """Download, check every file against ``expected`` (the authorising record's hashes), then load.

        Nothing of the version runs before its files check out: loading a pyfunc runs its code.
        """
        model = slot.loaded.get(version)
        if model is not None:
            return model
        folder = self._folder(name, version)
        shutil.rmtree(folder, ignore_errors=True)  # what a failed load may have left
        try:
            model_dir = self._registry_call(self.registry.download_version, name, version, folder)
            check_files(
                expected,
                hash_tree(model_dir),
                what=f"version {version} of model {name!r} is not the one the audit log authorises",
            )
        except EvidenceMismatch as exc:
            shutil.rmtree(folder, ignore_errors=True)
            logger.warning("refused to load %s v%s: %s", name, version, exc)
            raise UnverifiedVersion(
                f"{exc}; it was not loaded. Its files were changed after the decision: register and "
                "deploy a new version through the pipeline"
            ) from exc
        except GatewayError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        try:
            ranges = read_ranges(model_dir)
        except RangesUnreadable as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise ModelLoadFailed(
                f"version {version} of model {name!r}: {exc}; register a new version through training"
            ) from exc
        try:
            model = mlflow.pyfunc.load_model(str(model_dir))
        except Exception as exc:  # any loader failure (skops, flavor, import) is reported, not served
            shutil.rmtree(folder, ignore_errors=True)
            raise ModelLoadFailed(
                f"version {version} of model {name!r} failed to load: {type(exc).__name__}: {exc}; "
                "fix the logged model (or its skops trusted types) and register a new version",
            ) from exc
        slot.loaded[version] = model
        if ranges is not None:
            slot.ranges[version] = ranges
        return model

    def _authorised_champion(self, slot: _Slot, name: str) -> tuple[str, dict[str, str]]:
        """The version to serve and its files, from the newest authentic promotion or rollback record.

        The registry's alias is only cross-checked: an alias moved outside the pipeline is reported
        (``mismatch``, a warning in the log) and never served; the recorded champion serves instead.
        """
        alias_version = self._champion_version(name)
        try:
            record = self.evidence.champion(name)
        except EvidenceMismatch as exc:
            raise UnverifiedVersion(str(exc)) from exc
        recorded = None if record is None else record.details.get(CHAMPION_FIELD)
        if recorded == alias_version:
            slot.mismatch = None
            return alias_version, recorded_files(record)
        where = "no deployment record" if record is None else f"the deployment record seq={record.seq} names "
        where += "" if record is None else (f"v{recorded}" if recorded else "no champion")
        slot.mismatch = (
            f"the registry's '{Alias.CHAMPION}' alias points at v{alias_version} but the audit log has {where}: "
            "the alias was moved outside the pipeline; v" + str(alias_version) + " is not served"
        )
        logger.warning("model %s: %s", name, slot.mismatch)
        if record is None or not recorded:
            raise UnverifiedVersion(
                f"model {name!r}: {slot.mismatch}; deploy a version through the deployment DAG"
            )
        return str(recorded), recorded_files(record)

    def _load_split(self, slot: _Slot, name: str) -> None:
        """Serve the canary the audit log records for the live champion, if any (call with the slot's lock).

        A recorded canary whose files do not check out, or that does not load, is not served: the champion
        answers every caller, the problem is kept for ``/admin/models`` and raised.
        """
        record = self.evidence.canary(name)
        if record is None or str(record.details.get(CHAMPION_FIELD)) != slot.live:
            slot.challenger, slot.share, slot.split_problem = None, 0.0, None
            return
        version, share = str(record.details[CHALLENGER_FIELD]), float(record.details[SHARE_FIELD])
        try:
            try:
                files = recorded_files(record)
            except EvidenceMismatch as exc:
                raise UnverifiedVersion(str(exc)) from exc
            self._load(slot, name, version, files)
        except GatewayError as exc:
            slot.challenger, slot.share = None, 0.0
            slot.split_problem = (
                f"the canary v{version} (traffic record seq={record.seq}) is not served: {exc.message}"
            )
            logger.warning("model %s: %s", name, slot.split_problem)
            raise
        slot.challenger, slot.share, slot.split_problem = version, share, None

    def _evict_unused(self, name: str, slot: _Slot) -> None:
        keep = {slot.live, slot.staged, slot.challenger}
        for version in [version for version in slot.loaded if version not in keep]:
            del slot.loaded[version]
            slot.ranges.pop(version, None)
            shutil.rmtree(self._folder(name, version), ignore_errors=True)

    # serving

    def live(self, name: str) -> tuple[str, PyFuncModel]:
        """The champion, resolved from the registry and loaded on first use."""
        slot = self._slot(name)
        version = slot.live
        model = slot.loaded.get(version) if version is not None else None
        if version is not None and model is not None:
            return version, model
        try:
            with slot.lock:
                try:
                    if slot.live is not None:
                        version = slot.live
                        model = slot.loaded[version]
                    else:
                        version, files = self._authorised_champion(slot, name)
                        model = self._load(slot, name, version, files)
                except ModelNotServed:
                    raise
                except GatewayError as exc:
                    slot.problem = exc.message
                    raise
                first_load, slot.live, slot.problem = slot.live is None, version, None
                if first_load:
                    try:
                        self._load_split(slot, name)
                    except GatewayError:
                        pass  # the champion serves everyone; the problem is reported (split_problem)
                return version, model
        except ModelNotServed:
            self._forget_if_empty(name)
            raise

    def training_ranges(self, name: str, version: str) -> dict[str, tuple[float, float]] | None:
        """The numeric ranges ``version`` of ``name`` was trained on (None: logged without them)."""
        slot = self._slots.get(name)
        return None if slot is None else slot.ranges.get(version)

    def live_version(self, name: str) -> str | None:
        slot = self._slots.get(name)
        return slot.live if slot else None

    def require_known(self, name: str) -> None:
        """Refuse a name that is neither known here nor registered (one registry look-up at most)."""
        if name in self._slots or self._registry_call(self.registry.model, name) is not None:
            return
        raise self._unknown_model(name)

    def for_request(
        self, name: str, requested_version: str | None, split_key: str = ""
    ) -> tuple[str, PyFuncModel, Arm]:
        """The version that answers a call, its model and its arm. Without ``X-Model-Version``: the
        champion, or during a canary the challenger for the callers (``split_key``) in its share."""
        if requested_version is None:
            version, model = self.live(name)
            slot = self._slot(name)
            challenger, share = slot.challenger, slot.share
            if challenger is not None and in_challenger_share(split_key, name, challenger, share):
                challenger_model = slot.loaded.get(challenger)
                if challenger_model is not None:
                    return challenger, challenger_model, Arm.CHALLENGER
            return version, model, Arm.CHAMPION
        slot = self._slot(name)
        staged, challenger = slot.staged, slot.challenger
        staged_model = slot.loaded.get(staged) if staged == requested_version else None
        if staged_model is not None:
            return requested_version, staged_model, Arm.STAGED
        try:
            live_version, model = self.live(name)
        except NoDeployedVersion:
            live_version, model = None, None
        if live_version == requested_version and model is not None:
            return live_version, model, Arm.CHAMPION
        challenger_model = slot.loaded.get(challenger) if challenger == requested_version else None
        if challenger_model is not None:
            return requested_version, challenger_model, Arm.CHALLENGER
        raise VersionNotServed(
            f"version {requested_version} of model {name!r} is neither live ({live_version or 'none'}), "
            f"the canary ({challenger or 'none'}) nor staged ({staged or 'none'}); stage it with "
            f"POST /admin/models/{name}/stage or drop the X-Model-Version header",
        )

    # administration

    def reload(self, name: str) -> dict[str, Any]:
        """Re-read the alias and serve what it points at; on a load failure the old version keeps serving."""
        slot = self._slot(name)
        try:
            with slot.lock:
                previous = slot.live
                try:
                    version, files = self._authorised_champion(slot, name)
                except NoDeployedVersion as exc:
                    # Without an alias nothing is live.
                    slot.live, slot.problem = None, exc.message
                    self._evict_unused(name, slot)
                    raise
                except UnverifiedVersion as exc:
                    # The last verified version (if any) keeps serving; the mismatch is reported.
                    slot.problem = exc.message
                    raise
                self._load(slot, name, version, files)
                slot.live, slot.problem = version, None
                try:
                    self._load_split(slot, name)
                finally:
                    self._evict_unused(name, slot)
                return {
                    "model": name,
                    "live_version": version,
                    "previous_version": previous,
                    "challenger_version": slot.challenger,
                    "challenger_share": slot.share,
                    "alias_mismatch": slot.mismatch,
                }
        except ModelNotServed:
            self._forget_if_empty(name)
            raise

    def stage(self, name: str, version: str) -> dict[str, Any]:
        try:
            found = self._registry_call(self.registry.version, name, version)
        except RegistryError as exc:
            self.require_known(name)  # an unknown model is named as such, with the known ones
            raise NotFound(str(exc)) from exc
        try:
            approval = self.evidence.approval(name, found.version)
        except EvidenceMismatch as exc:
            raise UnverifiedVersion(f"{exc}; version {found.version} was not loaded") from exc
        slot = self._slot(name)
        with slot.lock:
            self._load(slot, name, found.version, recorded_files(approval))
            slot.staged = found.version
            self._evict_unused(name, slot)
            return {"model": name, "staged_version": found.version, "live_version": slot.live}

    def unstage(self, name: str) -> dict[str, Any]:
        self.require_known(name)
        slot = self._slot(name)
        with slot.lock:
            version, slot.staged = slot.staged, None
            self._evict_unused(name, slot)
            return {"model": name, "unstaged_version": version, "live_version": slot.live}

    def describe(self) -> dict[str, Any]:
        """Per model: live and staged version, the versions in memory and where it is scored."""
        described = {}
        for name in self.names():
            slot = self._slot(name)
            with slot.lock:
                described[name] = {
                    "live_version": slot.live,
                    "challenger_version": slot.challenger,
                    "challenger_share": slot.share,
                    "canary_problem": slot.split_problem,
                    "staged_version": slot.staged,
                    "loaded_versions": sorted(slot.loaded, key=_version_order),
                    "alias_mismatch": slot.mismatch,
                    "invocations_url": invocations_path(name),
                }
        return described

    def summary(self) -> dict[str, Any]:
        """Per model, without a registry call: ``ok`` (its champion serves), ``unavailable`` (the last
        attempt to serve it failed; ``message`` says why) or ``not_loaded`` (not asked for since start)."""
        summary: dict[str, Any] = {}
        for name in self.names():
            slot = self._slots.get(name) or _Slot()
            live, problem = slot.live, slot.problem
            if live is not None:
                entry: dict[str, Any] = {"status": "ok", "model_version": live}
                if slot.challenger is not None:
                    entry["canary"] = {"version": slot.challenger, "share": slot.share}
            elif problem is not None:
                entry = {"status": "unavailable", "model_version": None, "message": problem}
            else:
                entry = {"status": "not_loaded", "model_version": None}
            if slot.mismatch is not None:
                entry["alias_mismatch"] = slot.mismatch
            if live is not None and problem is not None:
                # The last reload was refused (e.g. files not matching their record): the previous
                # verified version serves, and the refusal is visible here, not only in the log.
                entry["last_reload_refused"] = problem
            summary[name] = {**entry, "invocations_url": invocations_path(name)}
        return summary


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (0, version)


# --- scoring --------------------------------------------------------------------------------------


@dataclass
class Invocation:
    """What one scoring call did, filled in as it goes so that failures are logged as fully as possible."""

    model_name: str
    model_version: str | None = None
    arm: Arm = Arm.CHAMPION
    out_of_range: dict[str, int] = field(default_factory=dict)
    """Columns with values outside the version's training range, and how many rows (flagged, scored)."""
    rows: list[Any] = field(default_factory=list)
    outputs: list[Any] | None = None
    response_body: str = ""


def _parse_content_type(content_type: str | None) -> str:
    # MLflow's invocations() does this inline (not reusable); same rules: UTF-8 only, no other params.
    # A missing header is taken as JSON rather than failing, as most clients mean JSON.
    parts = [part.strip() for part in (content_type or mlflow_scoring.CONTENT_TYPE_JSON).split(";")]
    mime_type, parameters = parts[0].lower(), dict(part.partition("=")[::2] for part in parts[1:] if part)
    charset = parameters.pop("charset", "utf-8").lower()
    if charset != "utf-8" or parameters:
        raise UnsupportedMediaType(
            f"content type {content_type!r} is not supported: send UTF-8 with no parameters other than "
            "charset, e.g. 'application/json'"
        )
    if mime_type not in mlflow_scoring.CONTENT_TYPES:
        raise UnsupportedMediaType(
            f"content type {content_type!r} is not supported; send one of {mlflow_scoring.CONTENT_TYPES}"
        )
    return mime_type


def _logged_rows(data: Any) -> list[Any]:
    """The parsed input as a list of rows (dicts when columns are named) for the prediction log."""
    if isinstance(data, pd.DataFrame):
        return data.to_dict(orient="records")
    if isinstance(data, dict):
        try:
            return pd.DataFrame(data).to_dict(orient="records")
        except ValueError:  # ragged or scalar-only columns: not a table, log it as one item
            return [data]
    if hasattr(data, "tolist"):
        rows = data.tolist()
        return rows if isinstance(rows, list) else [rows]
    if isinstance(data, list):
        return data
    return [data]


MAX_MESSAGE_CHARS = 4000


def _bounded(message: str) -> str:
    # MLflow's messages may quote the whole input; a large batch must not come back as a huge error.
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[: MAX_MESSAGE_CHARS // 2]} ... (truncated) ... {message[-MAX_MESSAGE_CHARS // 2 :]}"


def _require_one_format_key(payload: dict[str, Any]) -> None:
    # MLflow drops unknown keys before checking, so its own error reports "input fields: []";
    # this check names the keys actually received. LLM payloads (messages/prompt/input) are MLflow's.
    if is_unified_llm_input(payload):
        return
    formats = sorted(mlflow_scoring.SUPPORTED_FORMATS)
    found = [key for key in payload if key in mlflow_scoring.SUPPORTED_FORMATS]
    if len(found) != 1:
        raise BadScoringRequest(
            f"the JSON body must have exactly one of the keys {formats} (plus optional 'params'); "
            f"got keys {sorted(payload)}. Example: "
            '{"dataframe_split": {"columns": [...], "data": [[...]]}} or {"dataframe_records": [{...}]}'
        )


def _schema_hint(model: PyFuncModel) -> str:
    schema = model.metadata.get_input_schema()
    if schema is None or not schema.has_input_names():
        return ""
    return f" (the model expects columns {schema.input_names()})"


@dataclass(frozen=True)
class ScreenedInput:
    """A body that passed the checks needing no model: its type, decoded JSON and rows as sent."""

    mime_type: str
    body: bytes
    payload: dict[str, Any] | None
    frame: pd.DataFrame | None


def screen_input(body: bytes, content_type: str | None, screening: Screening) -> ScreenedInput:
    """The checks that need no model (format, JSON nesting, row count), run before a model is loaded."""
    mime_type = _parse_content_type(content_type)
    payload = None
    if mime_type == mlflow_scoring.CONTENT_TYPE_JSON:
        payload = screening.decode_json(body)
        _require_one_format_key(payload)
    return ScreenedInput(mime_type, body, payload, screening.raw_frame(payload, body, mime_type))


def _without_values(message: str) -> str:
    # MLflow's parse errors append the input ("Input: ...") and the cast's own error, which quotes the
    # offending value ("invalid literal for int(): 'old'"); what comes before says what is wrong.
    for marker in ("\nInput:", " Error: ", "Error: '"):
        message = message.split(marker, 1)[0]
    return _bounded(message.strip())


def score(
    model: PyFuncModel,
    screened: ScreenedInput,
    screening: Screening,
    invocation: Invocation,
    ranges: Mapping[str, tuple[float, float]] | None = None,
) -> None:
    """Screen the input against the model's signature and PII rules, parse it with MLflow's scoring-server
    code, predict and format the response like MLflow.

    MLflow's ``scoring_server.invocations()`` returns only the serialized response, while the log needs
    the parsed inputs and the predictions, so this composes the same parts it is built from.
    """
    input_schema = model.metadata.get_input_schema()
    mime_type, frame = screened.mime_type, screened.frame
    dropped: list[str] = []
    masked_rows: list[Any] | None = None
    if frame is not None:
        # The rows as sent are what a refused call logs; PII in them is masked first, whatever the verdict.
        findings = screening.pii_findings(frame)
        sent = frame_records(frame)
        invocation.rows = screening.masked_rows(sent, findings) if findings else sent
        dropped = screening.check_signature(frame, input_schema)
        findings = {column: names for column, names in findings.items() if column not in dropped}
        if findings:
            if screening.rules.pii == "reject":
                raise screening.refuse_pii(findings)
            masked_rows = screening.masked_rows(
                frame.drop(columns=dropped).to_dict(orient="records"), findings
            )
    params = None
    unwrapped = False
    # The typed frame MLflow's parser would build, built from the screened frame (1 ms less a call);
    # None where the shortcut does not apply, and MLflow's parser runs.
    typed = typed_frame(screened.payload, frame, input_schema) if frame is not None and not dropped else None
    try:
        if typed is not None:
            data = typed
        elif screened.payload is not None:
            payload = screened.payload
            if dropped and frame is not None:
                payload = drop_columns(payload, frame, dropped)
            parsed = mlflow_scoring._parse_json_data(payload, model.metadata, input_schema)
            data, params, unwrapped = parsed.data, parsed.params, parsed.is_unified_llm_input
        elif mime_type == mlflow_scoring.CONTENT_TYPE_CSV:
            data = mlflow_scoring.parse_csv_input(
                StringIO(screened.body.decode("utf-8")), schema=input_schema
            )
        else:
            data = mlflow_scoring.parse_parquet_input(BytesIO(screened.body))
    except MlflowException as exc:
        raise BadScoringRequest(_without_values(exc.message)) from exc
    except UnicodeDecodeError as exc:
        raise BadScoringRequest("the body is not valid UTF-8; send UTF-8 text") from exc
    except RecursionError as exc:
        raise BadScoringRequest("the input is nested too deeply to parse; send a flat table") from exc
    if dropped and isinstance(data, pd.DataFrame):
        data = data.drop(columns=[c for c in dropped if c in data.columns])
    if masked_rows is not None:
        invocation.rows = masked_rows
    elif frame is None or dropped:
        invocation.rows = _logged_rows(data)
    # else: the rows as sent, set above (values as the caller sent them: 5, not 5.0 in a double column)
    if ranges and screening.rules.out_of_range != "off" and isinstance(data, pd.DataFrame):
        outside = outside_ranges(data, ranges)
        if outside and screening.rules.out_of_range == "refuse":
            counts = ", ".join(f"{column} ({rows} rows)" for column, rows in sorted(outside.items()))
            raise RefusedInput(
                InputRefused(
                    422,
                    "OUT_OF_TRAINING_RANGE",
                    f"values outside the range this version was trained on in {counts}; send values within "
                    "the training range (serving.screening.out_of_range: refuse)",
                )
            )
        invocation.out_of_range = outside

    try:
        if _accepts_params(model):
            raw_predictions = model.predict(data, params=params)
        else:
            raw_predictions = model.predict(data)
    except MlflowException as exc:
        # Schema enforcement MLflow does on its own (types screening does not know); its message may
        # quote values, so only its first part is kept.
        status = exc.get_http_status_code()
        error = BadScoringRequest if status < 500 else GatewayError
        raise error(_bounded(f"{_without_values(exc.message)}{_schema_hint(model)}")) from exc
    except RecursionError as exc:
        raise BadScoringRequest("the input is nested too deeply to evaluate; send a flat table") from exc
    except Exception as exc:  # as MLflow's server does: a model that cannot evaluate the input is a 400
        # The exception's text is not returned: estimators quote the offending values (unknown categories).
        logger.info("model could not evaluate an input: %s", type(exc).__name__)
        raise BadScoringRequest(
            f"the model could not evaluate the input ({type(exc).__name__}); verify that the "
            f"input matches the model signature{_schema_hint(model)}"
        ) from exc

    buffer = StringIO()
    if unwrapped:
        mlflow_scoring.unwrapped_predictions_to_json(raw_predictions, buffer)
        invocation.outputs = _as_list(json.loads(buffer.getvalue()))
    else:
        mlflow_scoring.predictions_to_json(raw_predictions, buffer)
        invocation.outputs = _as_list(json.loads(buffer.getvalue())["predictions"])
    invocation.response_body = buffer.getvalue()


_ACCEPTS_PARAMS: dict[int, bool] = {}


def _accepts_params(model: PyFuncModel) -> bool:
    """Whether ``model.predict`` takes ``params`` (asked once per loaded model, not per call).

    Keyed by ``id`` (a PyFuncModel is not hashable); the entry goes when the model is collected.
    """
    key = id(model)
    accepts = _ACCEPTS_PARAMS.get(key)
    if accepts is None:
        accepts = _ACCEPTS_PARAMS[key] = "params" in inspect.signature(model.predict).parameters
        weakref.finalize(model, _ACCEPTS_PARAMS.pop, key, None)
    return accepts


def _as_list(predictions: Any) -> list[Any]:
    if isinstance(predictions, list):
        return predictions
    if isinstance(predictions, dict):  # a DataFrame-like dict of columns
        try:
            return pd.DataFrame(predictions).to_dict(orient="records")
        except ValueError:
            return [predictions]
    return [predictions]


# --- the app --------------------------------------------------------------------------------------


class StageRequest(BaseModel):
    version: str | int


class LabelsRequest(BaseModel):
    request_id: str
    labels: list[int]


def create_app(config: GatewayConfig) -> FastAPI:
    registry = ModelRegistry(config.tracking_uri)
    evidence = DeploymentEvidence(config.audit_url, config.audit_keyring)
    served = ServedModels(registry, evidence, config.known_models)
    prediction_log = PredictionLog(config.predictions_url)
    # Calls are logged off the request path, in batches: a commit per call cost 1.5-5 ms of every answer.
    # The queue is bounded and never drops (a full queue makes callers wait); shutdown drains it.
    prediction_writer = BatchedPredictionWriter(prediction_log)
    metrics = GatewayMetrics()
    known_models = frozenset(config.known_models) | frozenset(config.policies)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(prediction_writer.close)
            served.close()
            evidence.close()
            prediction_log.dispose()

    app = FastAPI(title="ModelOps scoring gateway", version=mlflow.__version__, lifespan=lifespan)
    app.state.config = config
    app.state.models = served
    app.state.prediction_log = prediction_log
    app.state.prediction_writer = prediction_writer
    app.state.metrics = metrics

    @app.exception_handler(GatewayError)
    async def _gateway_error(_request: Request, exc: GatewayError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else {}
        return _error_response(exc, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        return _error_response(BadScoringRequest(f"invalid request body: {problems}"))

    def require_admin(authorization: str | None = Header(default=None)) -> None:
        if config.admin_token is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), config.admin_token):
            raise Unauthorized(
                "admin routes need 'Authorization: Bearer <token>' with the gateway's admin token "
                "(MODELOPS_GATEWAY_ADMIN_TOKEN)"
            )

    # health: 200 when the model's champion is loaded and can serve, 503 (with the reason) otherwise

    async def model_health(name: str) -> tuple[int, dict[str, Any]]:
        try:
            version, _ = await run_in_threadpool(served.live, name)
        except ModelNotServed:
            raise
        except GatewayError as exc:
            return 503, {
                "status": "unavailable",
                "model": name,
                "model_version": None,
                "message": exc.message,
            }
        return 200, {"status": "ok", "model": name, "model_version": version}

    @app.get("/ping")
    async def ping() -> JSONResponse:
        status, body = await model_health(config.default_model)
        return JSONResponse(body, status_code=status)

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = await model_health(config.default_model)
        return JSONResponse({**body, "models": served.summary()}, status_code=status)

    @app.get("/models/{name}/health")
    async def one_model_health(name: str) -> JSONResponse:
        status, body = await model_health(name)
        return JSONResponse(body, status_code=status)

    # version: what is in memory, without a registry call (null until the model's first request)

    @app.get("/version")
    async def version() -> dict[str, Any]:
        name = config.default_model
        return {"mlflow": mlflow.__version__, "model": name, "model_version": served.live_version(name)}

    @app.get("/models/{name}/version")
    async def one_model_version(name: str) -> dict[str, Any]:
        if served.live_version(name) is None:
            await run_in_threadpool(served.require_known, name)
        return {"mlflow": mlflow.__version__, "model": name, "model_version": served.live_version(name)}

    # scoring

    def authenticate(request: Request) -> Caller:
        """The caller a request's key (or the admin token) names; 401 without a known one."""
        key = presented_key(request.headers)
        if key is not None:
            if config.admin_token is not None and hmac.compare_digest(key, config.admin_token):
                return PLATFORM_CALLER
            caller = config.api_keys.authenticate(key) if config.api_keys is not None else None
            if caller is not None:
                return caller
        elif config.admin_token is None and request.headers.get(SMOKE_CALLER_HEADER) == SMOKE_TEST_CALLER:
            # No admin token configured (a test set-up: from_env refuses to start that way): the admin
            # routes are open, so the deployment's smoke test is too, as before.
            return PLATFORM_CALLER
        raise Unauthorized(
            "this call needs a team API key: send 'Authorization: Bearer <key>' or 'X-Api-Key: <key>' "
            "(missing, or not a key this gateway knows). Keys are made with "
            "`modelops gateway create-key --team TEAM` and configured in " + API_KEYS_ENV
        )

    def authorize(caller: Caller, name: str, what: str) -> None:
        allowed = config.policy(name).allowed_teams
        if caller.may_call(allowed):
            return
        if name not in config.policies:
            served.require_known(name)  # a name nobody registered is 404 naming the known models
        teams = sorted(allowed) or "no team (it has no model spec in this gateway's catalog)"
        raise Forbidden(
            f"team {caller.team!r} may not {what} model {name!r}; it may be called by {teams}. Ask the "
            "model's owner to add your team to serving.allowed_teams in its spec"
        )

    async def invoke(name: str, request: Request) -> Response:
        received_at = datetime.now(UTC)
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        requested_version = request.headers.get(MODEL_VERSION_HEADER) or None
        invocation = Invocation(model_name=name)
        caller_id = split_key = ANONYMOUS_CALLER
        screening = config.policy(name).screening
        trace = trace_context(request.headers)

        def run(body: bytes) -> None:
            try:
                screened = screen_input(body, request.headers.get("content-type"), screening)
                version, model, arm = served.for_request(name, requested_version, split_key)
                invocation.model_version, invocation.arm = version, arm
                score(model, screened, screening, invocation, served.training_ranges(name, version))
            except InputRefused as refusal:
                raise RefusedInput(refusal) from refusal

        error: GatewayError | None = None
        try:
            # Who calls, and may they, before a byte of the body is read or a model loaded.
            caller = authenticate(request)
            caller_id = caller.caller_id
            routing_key = request.headers.get(ROUTING_KEY_HEADER)
            split_key = caller_id if not routing_key else f"{caller_id}/{routing_key}"
            if not caller.may_call(config.policy(name).allowed_teams):
                # Only a refusal may need the registry (to tell an unknown model from a forbidden one).
                await run_in_threadpool(authorize, caller, name, "score with")
            try:
                body = await screening.read_body(request.headers, request.stream)
            except InputRefused as refusal:
                raise RefusedInput(refusal) from refusal
            await run_in_threadpool(run, body)
        except GatewayError as exc:
            error = exc
        except Exception as exc:  # a bug must still be logged and answered, not drop the connection
            logger.exception("scoring request %s failed", request_id)
            error = GatewayError(f"internal error while scoring ({type(exc).__name__}); see the gateway log")

        headers = {REQUEST_ID_HEADER: request_id, **trace.response_headers()}
        if invocation.model_version is not None:
            headers[MODEL_VERSION_HEADER] = invocation.model_version
            headers[ARM_HEADER] = invocation.arm.value
        if invocation.out_of_range:
            headers[OUT_OF_RANGE_HEADER] = ",".join(sorted(invocation.out_of_range))
        if isinstance(error, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        status = error.status if error else 200
        seconds = time.perf_counter() - started
        # A path names the model, so anyone could mint a time series per made-up name and grow the
        # metrics without bound: only models the gateway knows or serves get their own label.
        known = name in known_models or invocation.model_version is not None
        metrics.observe(
            name if known else UNKNOWN_MODEL_LABEL, invocation.model_version, invocation.arm, status, seconds
        )
        if error is not None:
            logger.info(
                "request %s to %s refused %d %s (traceparent %s)",
                request_id,
                name,
                status,
                error.error_code,
                trace.traceparent,
            )
        record = PredictionRecord(
            request_id=request_id,
            received_at=received_at,
            caller_id=caller_id,
            model_name=name,
            model_version=invocation.model_version,
            status_code=status,
            latency_ms=seconds * 1000,
            n_rows=len(invocation.rows),
            inputs=invocation.rows,
            outputs=invocation.outputs if error is None else None,
            error=None if error is None else f"{error.error_code}: {error.message}",
            traceparent=trace.traceparent,
            arm=invocation.arm.value,
            flags=(
                ("out_of_training_range:" + ",".join(sorted(invocation.out_of_range)))[:500]
                if invocation.out_of_range
                else None
            ),
        )
        # Queued on the event loop when small and there is room (a thread hop costs 0.1 ms, more under
        # load); a large record (its JSON is serialized in submit) or a full queue waits in a thread.
        try:
            if len(invocation.rows) > INLINE_SUBMIT_ROWS:
                raise PredictionLogBacklogged("large record: serialize it off the event loop")
            prediction_writer.submit(record, timeout=0)
        except PredictionLogBacklogged:
            await run_in_threadpool(prediction_writer.submit, record)
        if error is not None:
            return _error_response(error, headers)
        return Response(invocation.response_body, media_type="application/json", headers=headers)

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        return await invoke(config.default_model, request)

    @app.post("/models/{name}/invocations")
    async def model_invocations(name: str, request: Request) -> Response:
        return await invoke(name, request)

    # labels

    def model_of(request_id: str) -> str | None:
        with prediction_log.engine.connect() as conn:
            return conn.execute(
                sa.select(predictions_table.c.model_name).where(predictions_table.c.request_id == request_id)
            ).scalar_one_or_none()

    # A dependency, so that a call without a key is 401 before its body is even validated.
    @app.post("/labels")
    async def labels(
        body: LabelsRequest,
        caller: Caller = Depends(authenticate),  # noqa: B008 (FastAPI's dependency idiom)
    ) -> dict[str, Any]:
        if prediction_writer.pending(body.request_id):  # scored a moment ago, still in the write queue
            await run_in_threadpool(prediction_writer.flush)
        model = await run_in_threadpool(model_of, body.request_id)
        if model is not None:  # an unknown id is refused (and counted) by the log itself, below
            await run_in_threadpool(authorize, caller, model, "label the predictions of")
        try:
            accepted = await run_in_threadpool(prediction_log.add_labels, body.request_id, body.labels)
        except UnknownRequestError as exc:
            raise NotFound(str(exc)) from exc
        except LabelCountMismatch as exc:
            raise BadScoringRequest(str(exc)) from exc
        return {"request_id": body.request_id, "accepted": accepted}

    # metrics: Prometheus text format, for a scraper; model names and versions, never inputs or keys

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # administration

    admin = [Depends(require_admin)]

    @app.get("/admin/models", dependencies=admin)
    async def list_models() -> dict[str, Any]:
        return {
            "default_model": config.default_model,
            "champion_alias": str(Alias.CHAMPION),
            "models": await run_in_threadpool(served.describe),
        }

    @app.get("/admin/environment", dependencies=admin)
    async def environment() -> dict[str, Any]:
        # What a deployment compares a version's recorded environment with (modelops.environment).
        return {"environment": serving_environment()}

    @app.post("/admin/models/{name}/reload", dependencies=admin)
    async def reload(name: str) -> dict[str, Any]:
        return await run_in_threadpool(served.reload, name)

    @app.post("/admin/models/{name}/stage", dependencies=admin)
    async def stage(name: str, body: StageRequest) -> dict[str, Any]:
        return await run_in_threadpool(served.stage, name, str(body.version))

    @app.delete("/admin/models/{name}/stage", dependencies=admin)
    async def unstage(name: str) -> dict[str, Any]:
        return await run_in_threadpool(served.unstage, name)

    return app
