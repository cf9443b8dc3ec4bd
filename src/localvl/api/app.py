"""The HTTP application: middleware, error envelopes, routers, and the engine's lifetime."""

from __future__ import annotations

import asyncio
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
from localvl.api.anthropic.files import MULTIPART_ALLOWANCE, router as files_router
from localvl.api.anthropic.routes import router as anthropic_router
from localvl.api.anthropic.threads import ThreadStore
from localvl.api.models import router as models_router
from localvl.api.openai.routes import router as openai_router
from localvl.api.playground import router as playground_router
from localvl.api.auth import require_api_key
from localvl.api.errors import install_error_handlers
from localvl.api.middleware import RequestContextMiddleware, Traffic
from localvl.api.model_names import ModelNames, ServedModel, parse_aliases
from localvl.api.response_cache import MemoryCache, RedisCache, ResponseCache, model_fingerprint
from localvl.api.signatures import ThinkingSigner
from localvl.engine.protocol import Engine
from localvl.models.hub.common import snapshot_repo_id
from localvl.models.tiny import default_cache_dir
from localvl.observability.access import log_access
from localvl.observability.metrics import Metrics
from localvl.security.authenticator import Authenticator
from localvl.security.keys import Limits
from localvl.security.ratelimit import MemoryBuckets, RateLimiter
from localvl.security.tokens import TokenVerifier
from localvl.settings import Settings
from localvl.store.lazy import LazyStore


def served_name(settings: Settings, engine: Engine) -> str:
    """The API name of the model: --served-model-name, else a folder's name or the hub id itself
    (a snapshot folder in a hub's cache is named by its hub id, not its commit hash)."""
    if settings.served_model_name:
        return settings.served_model_name
    source = engine.info.name_or_path
    if not Path(source).is_dir():
        return source
    return snapshot_repo_id(Path(source)) or Path(source).name


def model_names(settings: Settings, engine: Engine, created_at: datetime | None = None) -> ModelNames:
    name = served_name(settings, engine)
    served = ServedModel(name, created_at or datetime.now(timezone.utc), engine.info.context_length)
    # A folder served under its name also answers to the path it was given by, which vLLM serves it
    # under: clients moved from there keep working. Not listed: the path is the host's business.
    given = settings.model if not settings.served_model_name else None
    unlisted = {given: name} if given and given != name and Path(given).is_dir() else {}
    return ModelNames([served], parse_aliases(settings.alias, name), unlisted)


def authenticator(settings: Settings, store: LazyStore | None) -> Authenticator:
    """Static keys, stored keys and JWTs, as configured; ``ValueError`` for unusable JWT settings."""
    limits = Limits(settings.rpm, settings.itpm, settings.otpm, settings.max_streams_per_key)
    verifier = None
    if settings.jwt_secret or settings.jwt_public_key or settings.jwt_jwks_file:
        verifier = TokenVerifier(secret=settings.jwt_secret, public_key=settings.jwt_public_key,
                                 jwks_file=settings.jwt_jwks_file, audience=settings.jwt_audience,
                                 issuer=settings.jwt_issuer, limits=limits)
    return Authenticator(settings.api_key, store, verifier, limits)


def response_cache(settings: Settings) -> ResponseCache | None:
    if not settings.response_cache:
        return None
    if settings.redis_url:
        return RedisCache(settings.redis_url, settings.response_cache_ttl)
    return MemoryCache(settings.response_cache, settings.response_cache_ttl)


def rate_limiter(settings: Settings) -> RateLimiter:
    if settings.redis_url:
        from localvl.security.redis_buckets import RedisBuckets
        from localvl.security.redis_slots import RedisSlots

        return RateLimiter(RedisBuckets(settings.redis_url), RedisSlots(settings.redis_url))
    return RateLimiter(MemoryBuckets())


async def drain(app: FastAPI, timeout: float) -> bool:
    """Stop taking requests (new ones get 503 with retry-after) and wait up to ``timeout`` seconds
    for the running ones to end; whether they all did."""
    traffic: Traffic = app.state.traffic
    traffic.draining = True
    app.state.batch_worker.pause()
    try:
        await asyncio.wait_for(traffic.idle.wait(), timeout)
        return True
    except asyncio.TimeoutError:
        return False


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
            await app.state.limiter.close()
            if app.state.response_cache is not None:
                await app.state.response_cache.close()

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
    app.state.authenticator = authenticator(settings, app.state.store)
    app.state.limiter = rate_limiter(settings)
    app.state.response_cache = response_cache(settings)
    app.state.model_fingerprint = model_fingerprint(engine.info.name_or_path, settings.revision)
    app.state.traffic = Traffic()
    app.state.batch_worker = BatchWorker(app.state)
    app.state.ready = False
    install_error_handlers(app)
    metrics = Metrics(engine)
    app.state.metrics = metrics

    async def count_response(scope: Any, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"  # a template: ids never become labels
        metrics.requests.labels(route, str(status)).inc()
        metrics.request_seconds.labels(route).observe(seconds)
        log_access(scope, route, status, seconds)

    app.add_middleware(RequestContextMiddleware, max_request_bytes=settings.max_request_bytes,
                       upload_bytes={"/v1/files": settings.max_file_bytes + MULTIPART_ALLOWANCE, "/v1/messages/batches": settings.batch_max_bytes},
                       on_response=count_response, traffic=app.state.traffic,
                       body_timeout=settings.body_timeout)

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Model loaded and the engine running and answering: where a load balancer should send
        requests. A hung engine process (``ProcessEngine.responsive``) is not ready until it answers."""
        alive = getattr(engine, "alive", True) and getattr(engine, "responsive", True)
        if not request.app.state.ready or not alive or app.state.traffic.draining:
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
    app.include_router(playground_router)
    return app
