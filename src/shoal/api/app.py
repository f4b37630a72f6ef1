"""The FastAPI application: routers by resource, OpenAI-shaped errors, a body-size limit."""

from fastapi import FastAPI

from shoal import __version__
from shoal.api import chat, completions, errors, health, models
from shoal.api.limits import BodyLimit
from shoal.inference.service import InferenceService


def create_app(service: InferenceService, *, max_body_bytes: int = 4 * 1024 * 1024) -> FastAPI:
    """An app serving `service`; the caller runs it (uvicorn) and owns the service's lifetime."""
    app = FastAPI(title="shoal", version=__version__)
    app.state.service = service
    errors.install(app)
    for module in (models, chat, completions, health):
        app.include_router(module.router)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app
