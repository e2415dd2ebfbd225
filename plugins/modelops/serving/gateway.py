"""The scoring gateway: MLflow's scoring protocol in front of the registry's champion, plus a log.

What is live is whatever the registry's ``champion`` alias points at; the gateway keeps no deployment
state of its own, so a restart resumes serving the champion. A deployment stages a candidate version
(``POST /admin/models/{name}/stage``), smoke-tests it over HTTP with ``X-Model-Version`` while the
previous champion keeps serving everyone else, moves the alias, then calls
``POST /admin/models/{name}/reload``. Every call to an invocations endpoint lands in the prediction log.

Parsing and response formatting are MLflow's own (``mlflow.pyfunc.scoring_server``) so that existing
MLflow clients work unchanged.
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO, StringIO
from typing import Any

import mlflow
import pandas as pd
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel
from mlflow.pyfunc import scoring_server as mlflow_scoring
from mlflow.pyfunc.utils.serving_data_parser import is_unified_llm_input
from mlflow.tracking import MlflowClient
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from modelops.errors import ConfigurationError, ModelOpsError
from modelops.serving.prediction_log import (
    LabelCountMismatch,
    PredictionLog,
    PredictionRecord,
    UnknownRequestError,
)

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
MODEL_VERSION_HEADER = "X-Model-Version"
CALLER_ID_HEADER = "X-Caller-Id"
ANONYMOUS_CALLER = "anonymous"


# --- configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayConfig:
    tracking_uri: str
    predictions_url: str
    default_model: str
    admin_token: str | None = None
    champion_alias: str = "champion"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewayConfig:
        """Read ``MLFLOW_TRACKING_URI``, ``MODELOPS_PREDICTIONS_URL``, ``MODELOPS_SERVED_MODEL``
        (default: ``served_model`` of include/modelops.yaml) and ``MODELOPS_GATEWAY_ADMIN_TOKEN``."""
        env = os.environ if env is None else env

        def required(name: str, example: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise ConfigurationError(
                    f"environment variable {name} is not set; the scoring gateway needs it, "
                    f"e.g. {name}={example}"
                )
            return value

        served_model = env.get("MODELOPS_SERVED_MODEL", "").strip()
        if not served_model:
            from modelops.settings import platform_settings

            served_model = platform_settings().served_model
        return cls(
            tracking_uri=required("MLFLOW_TRACKING_URI", "http://mlflow:5000"),
            predictions_url=required(
                "MODELOPS_PREDICTIONS_URL", "postgresql+psycopg2://user:pass@db/modelops"
            ),
            default_model=served_model,
            admin_token=env.get("MODELOPS_GATEWAY_ADMIN_TOKEN", "").strip() or None,
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


class NotFound(GatewayError):
    status, error_code = 404, "RESOURCE_DOES_NOT_EXIST"


class UnknownModel(NotFound):
    """The model name is not in the registry."""


class VersionNotServed(GatewayError):
    status, error_code = 404, "VERSION_NOT_SERVED"


class UnsupportedMediaType(GatewayError):
    status, error_code = 415, "UNSUPPORTED_MEDIA_TYPE"


class ModelLoadFailed(GatewayError):
    status, error_code = 422, "MODEL_LOAD_FAILED"


class NoDeployedVersion(GatewayError):
    status, error_code = 503, "NO_DEPLOYED_VERSION"


def _error_response(error: GatewayError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error_code": error.error_code, "message": error.message},
        status_code=error.status,
        headers=dict(headers or {}),
    )


# --- the models in memory -------------------------------------------------------------------------


class ServedModels:
    """Loaded models keyed by (name, version), which version is live (the alias) and which is staged.

    Reads of the fast path (already loaded) take no lock; resolving and loading do, so concurrent first
    requests load a model once. All methods block (registry calls, model loading): call them from a
    threadpool.
    """

    def __init__(self, tracking_uri: str, champion_alias: str) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.champion_alias = champion_alias
        self._loaded: dict[tuple[str, str], PyFuncModel] = {}
        self._live: dict[str, str] = {}
        self._staged: dict[str, str] = {}
        self._lock = threading.RLock()

    # registry look-ups

    def _champion_version(self, name: str) -> str:
        try:
            return str(self.client.get_model_version_by_alias(name, self.champion_alias).version)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise self._unknown_model(name) from exc
            # A missing alias is INVALID_PARAMETER_VALUE; tell it apart from other invalid input.
            self._require_registered(name)
            raise NoDeployedVersion(
                f"model {name!r} has no deployed version (no {self.champion_alias!r} alias) in the "
                "registry; deploy a version (the deployment DAG sets the alias) and reload with "
                f"POST /admin/models/{name}/reload"
            ) from exc

    def _require_registered(self, name: str) -> None:
        try:
            self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise self._unknown_model(name) from exc
            raise

    @staticmethod
    def _unknown_model(name: str) -> UnknownModel:
        return UnknownModel(
            f"model {name!r} is not registered in the MLflow registry; check the name "
            "(GET /admin/models lists what this gateway serves)"
        )

    def _load(self, name: str, version: str) -> PyFuncModel:
        key = (name, version)
        if key not in self._loaded:
            try:
                self._loaded[key] = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
            except Exception as exc:  # any loader failure (skops, flavor, import) is reported, not served
                raise ModelLoadFailed(
                    f"version {version} of model {name!r} failed to load: {type(exc).__name__}: {exc}; "
                    "fix the logged model (or its skops trusted types) and register a new version",
                ) from exc
        return self._loaded[key]

    def _evict_unused(self, name: str) -> None:
        keep = {self._live.get(name), self._staged.get(name)}
        for key in [key for key in self._loaded if key[0] == name and key[1] not in keep]:
            del self._loaded[key]

    # serving

    def live(self, name: str) -> tuple[str, PyFuncModel]:
        """The champion, resolved from the registry and loaded on first use."""
        version = self._live.get(name)
        if version is not None and (name, version) in self._loaded:
            return version, self._loaded[(name, version)]
        with self._lock:
            version = self._live.get(name)
            if version is None:
                version = self._champion_version(name)
            model = self._load(name, version)
            self._live[name] = version
            return version, model

    def live_version(self, name: str) -> str | None:
        return self._live.get(name)

    def for_request(self, name: str, requested_version: str | None) -> tuple[str, PyFuncModel]:
        if requested_version is None:
            return self.live(name)
        staged = self._staged.get(name)
        staged_model = self._loaded.get((name, staged)) if staged == requested_version else None
        if staged_model is not None:
            return requested_version, staged_model
        try:
            live_version, model = self.live(name)
        except NoDeployedVersion:
            live_version, model = None, None
        if live_version == requested_version and model is not None:
            return live_version, model
        raise VersionNotServed(
            f"version {requested_version} of model {name!r} is neither live ({live_version or 'none'}) "
            f"nor staged ({staged or 'none'}); stage it with POST /admin/models/{name}/stage "
            "or drop the X-Model-Version header",
        )

    # administration

    def reload(self, name: str) -> dict[str, Any]:
        """Re-read the alias and serve what it points at; on a load failure the old version keeps serving."""
        with self._lock:
            previous = self._live.get(name)
            try:
                version = self._champion_version(name)
            except NoDeployedVersion:
                # The registry is the truth: without an alias nothing is live.
                self._live.pop(name, None)
                self._evict_unused(name)
                raise
            self._load(name, version)
            self._live[name] = version
            self._evict_unused(name)
            return {"model": name, "live_version": version, "previous_version": previous}

    def stage(self, name: str, version: str) -> dict[str, Any]:
        with self._lock:
            try:
                self.client.get_model_version(name, version)
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise
                self._require_registered(name)
                raise NotFound(
                    f"model {name!r} has no version {version!r} in the registry; "
                    "stage a version that exists (see the MLflow UI or registry API)",
                ) from exc
            self._load(name, version)
            self._staged[name] = version
            self._evict_unused(name)
            return {"model": name, "staged_version": version, "live_version": self._live.get(name)}

    def unstage(self, name: str) -> dict[str, Any]:
        with self._lock:
            version = self._staged.pop(name, None)
            self._evict_unused(name)
            return {"model": name, "unstaged_version": version, "live_version": self._live.get(name)}

    def describe(self) -> dict[str, Any]:
        with self._lock:
            names = sorted({*self._live, *self._staged, *(key[0] for key in self._loaded)})
            return {
                name: {
                    "live_version": self._live.get(name),
                    "staged_version": self._staged.get(name),
                    "loaded_versions": sorted((key[1] for key in self._loaded if key[0] == name), key=int),
                }
                for name in names
            }


# --- scoring --------------------------------------------------------------------------------------


@dataclass
class Invocation:
    """What one scoring call did, filled in as it goes so that failures are logged as fully as possible."""

    model_name: str
    model_version: str | None = None
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


def score(model: PyFuncModel, body: bytes, content_type: str | None, invocation: Invocation) -> None:
    """Parse ``body`` with MLflow's scoring-server code, predict and format the response like MLflow.

    MLflow's ``scoring_server.invocations()`` returns only the serialized response, while the log needs
    the parsed inputs and the predictions, so this composes the same parts it is built from.
    """
    mime_type = _parse_content_type(content_type)
    input_schema = model.metadata.get_input_schema()
    params = None
    unwrapped = False
    try:
        if mime_type == mlflow_scoring.CONTENT_TYPE_JSON:
            _require_one_format_key(mlflow_scoring._decode_json_input(body))
            parsed = mlflow_scoring._parse_json_data(body, model.metadata, input_schema)
            data, params, unwrapped = parsed.data, parsed.params, parsed.is_unified_llm_input
        elif mime_type == mlflow_scoring.CONTENT_TYPE_CSV:
            data = mlflow_scoring.parse_csv_input(StringIO(body.decode("utf-8")), schema=input_schema)
        else:
            data = mlflow_scoring.parse_parquet_input(BytesIO(body))
    except MlflowException as exc:
        raise BadScoringRequest(_bounded(exc.message)) from exc
    except UnicodeDecodeError as exc:
        raise BadScoringRequest(f"the body is not valid UTF-8 ({exc}); send UTF-8 text") from exc
    invocation.rows = _logged_rows(data)

    try:
        if "params" in inspect.signature(model.predict).parameters:
            raw_predictions = model.predict(data, params=params)
        else:
            raw_predictions = model.predict(data)
    except MlflowException as exc:
        # Schema enforcement (missing column, wrong type) lands here with MLflow's own message.
        status = exc.get_http_status_code()
        error = BadScoringRequest if status < 500 else GatewayError
        raise error(_bounded(f"{exc.message}{_schema_hint(model)}")) from exc
    except Exception as exc:  # as MLflow's server does: a model that cannot evaluate the input is a 400
        raise BadScoringRequest(
            f"the model could not evaluate the input: {type(exc).__name__}: {exc}; verify that the "
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
    # models:/ URIs resolve through the process-wide tracking and registry URIs (ModelsArtifactRepository
    # ignores any client's), so the gateway process points both at its registry.
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking_uri)
    served = ServedModels(config.tracking_uri, config.champion_alias)
    prediction_log = PredictionLog(config.predictions_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        prediction_log.dispose()

    app = FastAPI(title="ModelOps scoring gateway", version=mlflow.__version__, lifespan=lifespan)
    app.state.config = config
    app.state.models = served
    app.state.prediction_log = prediction_log

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

    # health

    async def health() -> JSONResponse:
        name = config.default_model
        try:
            version, _ = await run_in_threadpool(served.live, name)
        except GatewayError as exc:
            return JSONResponse(
                {"status": "unavailable", "model": name, "message": exc.message}, status_code=503
            )
        return JSONResponse({"status": "ok", "model": name, "model_version": version})

    app.get("/ping")(health)
    app.get("/health")(health)

    @app.get("/version")
    async def version() -> dict[str, Any]:
        return {
            "mlflow": mlflow.__version__,
            "model": config.default_model,
            "model_version": served.live_version(config.default_model),
        }

    # scoring

    async def invoke(name: str, request: Request) -> Response:
        received_at = datetime.now(UTC)
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        caller_id = request.headers.get(CALLER_ID_HEADER) or ANONYMOUS_CALLER
        requested_version = request.headers.get(MODEL_VERSION_HEADER) or None
        invocation = Invocation(model_name=name)
        body = await request.body()

        def run() -> None:
            version, model = served.for_request(name, requested_version)
            invocation.model_version = version
            score(model, body, request.headers.get("content-type"), invocation)

        error: GatewayError | None = None
        try:
            await run_in_threadpool(run)
        except GatewayError as exc:
            error = exc
        except Exception as exc:  # a bug must still be logged and answered, not drop the connection
            logger.exception("scoring request %s failed", request_id)
            error = GatewayError(f"internal error while scoring: {type(exc).__name__}: {exc}")

        headers = {REQUEST_ID_HEADER: request_id}
        if invocation.model_version is not None:
            headers[MODEL_VERSION_HEADER] = invocation.model_version
        status = error.status if error else 200
        await run_in_threadpool(
            prediction_log.record,
            PredictionRecord(
                request_id=request_id,
                received_at=received_at,
                caller_id=caller_id,
                model_name=name,
                model_version=invocation.model_version,
                status_code=status,
                latency_ms=(time.perf_counter() - started) * 1000,
                n_rows=len(invocation.rows),
                inputs=invocation.rows,
                outputs=invocation.outputs if error is None else None,
                error=None if error is None else f"{error.error_code}: {error.message}",
            ),
        )
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

    @app.post("/labels")
    async def labels(body: LabelsRequest) -> dict[str, Any]:
        try:
            accepted = await run_in_threadpool(prediction_log.add_labels, body.request_id, body.labels)
        except UnknownRequestError as exc:
            raise NotFound(str(exc)) from exc
        except LabelCountMismatch as exc:
            raise BadScoringRequest(str(exc)) from exc
        return {"request_id": body.request_id, "accepted": accepted}

    # administration

    admin = [Depends(require_admin)]

    @app.get("/admin/models", dependencies=admin)
    async def list_models() -> dict[str, Any]:
        return {
            "default_model": config.default_model,
            "champion_alias": config.champion_alias,
            "models": await run_in_threadpool(served.describe),
        }

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
