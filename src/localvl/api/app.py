"""The HTTP application: middleware, error envelopes, routers, and the engine's lifetime."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from localvl import __version__
from localvl.api.anthropic.batch_worker import BatchWorker
from localvl.api.anthropic.batches import router as batches_router
from localvl.api.anthropic.files import router as files_router
from localvl.api.anthropic.routes import router as anthropic_router
from localvl.api.anthropic.threads import ThreadStore
from localvl.api.models import router as models_router
from localvl.api.openai.routes import router as openai_router
from localvl.api.auth import require_api_key
from localvl.api.errors import install_error_handlers
from localvl.api.middleware import RequestContextMiddleware
from localvl.api.model_names import ModelNames, ServedModel, parse_aliases
from localvl.api.signatures import ThinkingSigner
from localvl.engine.protocol import Engine
from localvl.models.tiny import default_cache_dir
from localvl.observability.access import log_access
from localvl.observability.metrics import Metrics
from localvl.settings import Settings
from localvl.store.lazy import LazyStore


def served_name(settings: Settings, engine: Engine) -> str:
    """The API name of the model: --served-model-name, else a folder's name or the hub id itself."""
    if settings.served_model_name:
        return settings.served_model_name
    source = engine.info.name_or_path
    return Path(source).name if Path(source).is_dir() else source


def model_names(settings: Settings, engine: Engine, created_at: datetime | None = None) -> ModelNames:
    name = served_name(settings, engine)
    served = ServedModel(name, created_at or datetime.now(timezone.utc), engine.info.context_length)
    return ModelNames([served], parse_aliases(settings.alias, name))


def create_app(settings: Settings, engine: Engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        app.state.batch_worker.start()
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            await app.state.batch_worker.stop()
            await engine.stop()
            await app.state.store.stop()

    app = FastAPI(
        title="localvl",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.model_names = model_names(settings, engine)
    app.state.signer = ThinkingSigner.from_settings(settings.thinking_key, settings.cache_dir or default_cache_dir())
    app.state.threads = ThreadStore()
    app.state.store = LazyStore(settings)
    app.state.batch_worker = BatchWorker(app.state)
    app.state.ready = False
    install_error_handlers(app)
    metrics = Metrics(engine)
    app.state.metrics = metrics

    def count_response(scope: Any, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"  # a template: ids never become labels
        metrics.requests.labels(route, str(status)).inc()
        metrics.request_seconds.labels(route).observe(seconds)
        log_access(scope, route, status, seconds)

    app.add_middleware(RequestContextMiddleware, max_request_bytes=settings.max_request_bytes,
                       upload_bytes={"/v1/files": settings.max_file_bytes, "/v1/messages/batches": settings.batch_max_bytes},
                       on_response=count_response)

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Model loaded and the engine running: where a load balancer should send requests."""
        alive = getattr(engine, "alive", True)
        if not request.app.state.ready or not alive:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready", "model": served_name(settings, engine)})

    @app.get("/metrics", dependencies=[Depends(require_api_key)])
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        if not request.app.state.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ok", "model": served_name(settings, engine)})

    app.include_router(anthropic_router)
    app.include_router(files_router)
    app.include_router(batches_router)
    app.include_router(models_router)
    app.include_router(openai_router)
    return app
