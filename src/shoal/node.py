"""The composition root: builds every part of a node from Settings and runs them together."""

import asyncio
import logging
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import uvicorn
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from shoal.api.app import create_app
from shoal.errors import ShoalError
from shoal.models.catalog import Catalog
from shoal.models.local_card import card_for_path
from shoal.paths import user_cards_dir
from shoal.settings import Settings
from shoal.types.ids import ModelId
from shoal.worker.local import LocalModels

log = logging.getLogger(__name__)


def _progress_reporter() -> tuple[
    AbstractContextManager[object], Callable[[ModelId, int, int], None]
]:
    """A rich progress bar on a terminal; otherwise a log line at every quarter."""
    if sys.stderr.isatty():
        bar = Progress(
            TextColumn("loading {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=True,
        )
        tasks: dict[str, TaskID] = {}

        def show(model: ModelId, done: int, total: int) -> None:
            if model not in tasks:
                tasks[model] = bar.add_task(model, total=total)
            bar.update(tasks[model], completed=done, total=total)

        return bar, show

    def log_quarters(model: ModelId, done: int, total: int) -> None:
        if total and done * 4 // total != (done - 1) * 4 // total:
            log.info("loading %s: %d/%d layers", model, done, total)

    return nullcontext(), log_quarters


async def serve(settings: Settings) -> None:
    """Run a node until it is told to stop (SIGINT/SIGTERM)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(extra_dirs=[user_cards_dir(settings.data_dir)])
    preload = settings.model
    if settings.model_path is not None:
        card = card_for_path(settings.model_path, model_id=settings.model)
        catalog.add(card)
        preload = card.id
    if preload is not None:
        catalog.get(preload)  # an unknown --model fails now, with suggestions
    display, on_progress = _progress_reporter()
    service = LocalModels(
        catalog,
        engine=settings.engine,
        device=settings.device,
        max_batch=settings.max_batch,
        auto_load=settings.auto_load,
        on_progress=on_progress,
    )
    app = create_app(service, max_body_bytes=settings.max_body_bytes)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    log.info(
        "shoal node on http://%s:%d (data in %s)", settings.host, settings.port, settings.data_dir
    )
    try:
        with display:
            async with asyncio.TaskGroup() as group:
                group.create_task(server.serve(), name="http")
                if preload is not None:
                    group.create_task(_preload(service, preload, server), name="preload")
    finally:
        await service.close()


async def _preload(service: LocalModels, model_id: str, server: uvicorn.Server) -> None:
    """Load the --model at start; a failure is logged and the node serves on."""
    try:
        await service.load(model_id)
    except ShoalError as exc:
        log.error("%s", exc)
