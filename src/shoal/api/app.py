"""The FastAPI application: routers by resource and dialect (OpenAI, Anthropic Messages, Ollama),
errors in each dialect's shape, a body-size limit, API keys (api/auth.py), CORS for the origins
it is given, /metrics (api/metrics.py) and the dashboard at / (api/dashboard.py)."""

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.middleware.cors import CORSMiddleware

from shoal import __version__
from shoal.api import (
    anthropic,
    chat,
    completions,
    dashboard,
    errors,
    health,
    instances,
    metrics,
    models,
    ollama,
    ollama_models,
    pulls,
    responses,
)
from shoal.api import cluster as cluster_routes
from shoal.api.auth import ApiKeyAuth, ApiKeys
from shoal.api.limits import BodyLimit
from shoal.cluster import ClusterNode
from shoal.inference.metrics import InstanceLoad
from shoal.inference.service import InferenceService
from shoal.serving.pulls import Pulls


def create_app(
    service: InferenceService,
    *,
    cluster: ClusterNode | None = None,
    max_body_bytes: int = 4 * 1024 * 1024,
    body_timeout_s: float = 30.0,
    profile_wait_s: float = 2.0,
    keys: ApiKeys | None = None,  # None, or no key in it: the API is open
    cors_origins: Sequence[str] = (),  # browsers on these origins may call the API
    registry: CollectorRegistry | None = None,  # this app's alone; None: a new one
    loads: Callable[[], Iterable[InstanceLoad]] = tuple,  # requests per instance, for /metrics
    fetched: metrics.FetchedBytes | None = None,  # the node's Fetcher, for /metrics
    hub_root: Path | None = None,  # the node's Hub cache: /v1/models says what runs here
    pull_files: Pulls | None = None,  # fetches models into that cache (POST /v1/pulls)
) -> FastAPI:
    """An app serving `service` (and `cluster`); the caller runs it and owns their lifetimes.

    `registry` holds the request counters the service's schedulers update (inference/metrics.py);
    /metrics serves it with the node's gauges added.
    """
    app = FastAPI(title="shoal", version=__version__)
    app.state.service = service
    app.state.cluster = cluster
    app.state.profile_wait_s = profile_wait_s  # a layout waits this long for a named node
    app.state.models_json = None  # (state index, bytes): see api/models.py
    app.state.hub_root = hub_root
    app.state.pulls = pull_files
    errors.install(app)
    dialects = (responses, anthropic, ollama, ollama_models)
    for module in (models, chat, completions, *dialects, health, cluster_routes, instances, pulls):
        app.include_router(module.router)
    app.include_router(dashboard.router)
    registry = registry if registry is not None else CollectorRegistry()
    metrics.install(app, registry, cluster, loads, fetched)
    # outermost last: CORS answers preflights and marks 401s, the key check runs before a body
    # is buffered
    app.add_middleware(BodyLimit, limit=max_body_bytes, timeout_s=body_timeout_s)
    app.add_middleware(ApiKeyAuth, keys=keys or ApiKeys())
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["*"],
            # every dialect's clients send their own headers (anthropic-version, x-stainless-…);
            # no credentials are allowed, so any header may be
            allow_headers=["*"],
            expose_headers=["retry-after"],
        )
    return app
