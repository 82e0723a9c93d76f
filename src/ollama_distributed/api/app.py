"""The FastAPI application: routers, error handlers, CORS, and the model manager's lifecycle."""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .. import __version__
from ..service.models import ExecutorFactory, ModelManager
from ..service.settings import ServerSettings
from ..service.store import ModelStore
from . import distributed, models, observability, ollama, openai
from .auth import APIKeyMiddleware
from .common import AppState
from .errors import install_error_handlers

log = logging.getLogger(__name__)

# Ollama's default allowed origins (envconfig.AllowedOrigins): localhost and loopback on any port and scheme,
# plus app:// and file:// schemes; OLLAMA_ORIGINS adds more. Headers: server/routes.go allows these, including
# what the OpenAI SDK sends.
CORS_HEADERS = ["Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "OpenAI-Beta",
                "x-stainless-arch", "x-stainless-async", "x-stainless-custom-poll-interval",
                "x-stainless-helper-method", "x-stainless-lang", "x-stainless-os", "x-stainless-package-version",
                "x-stainless-poll-helper", "x-stainless-retry-count", "x-stainless-runtime",
                "x-stainless-runtime-version", "x-stainless-timeout"]
_LOCAL_ORIGINS = r"^(https?://(localhost|127\.0\.0\.1|0\.0\.0\.0|\[::1\])(:\d+)?|app://.*|file://.*|tauri://.*|vscode-webview://.*)$"


def create_app(settings: ServerSettings, executor_factory: ExecutorFactory | None = None) -> FastAPI:
    """The server application for `settings` (executor_factory: override how models are run, for embedding)."""
    store = ModelStore(settings.models_dir, settings.ollama_models_dir, include_bundled=settings.include_bundled)
    manager = ModelManager(settings, store, executor_factory)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await manager.start()
        try:
            yield
        finally:
            await manager.close()

    app = FastAPI(title="ollama-distributed", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.od = AppState(settings=settings, store=store, manager=manager)
    if settings.api_key:
        # added before CORS, so CORS stays outermost and a 401 still carries its headers
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    origins = list(settings.origins)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=[o for o in origins if o != "*"],
        allow_origin_regex=".*" if "*" in origins else _LOCAL_ORIGINS,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        allow_headers=CORS_HEADERS,
    )
    install_error_handlers(app)
    for router in (models.router, ollama.router, openai.router, distributed.router):
        app.include_router(router)
    # /metrics, /dashboard and the strategy/history endpoints; the model manager's runners report to its loop.
    manager.learning = observability.install(app)
    return app
