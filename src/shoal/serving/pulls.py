"""Pulls: a model's files fetched into this node's Hub cache in the background, with progress.

`POST /v1/pulls` (api/pulls.py) starts one per model (a second ask while it runs is the same
pull); its thread runs models/pull.py's `pull` (the Hub, verified, resumed from a `.part`), and
`GET /v1/pulls` reads every pull's bytes done and total, finished or failed with the one-line
reason. A pulled model then runs here without a download (models/availability.py reads the same
cache). Pulls are this node's alone: nothing is replicated, nothing is placed.
"""

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from shoal.errors import ShoalError
from shoal.models.catalog import Catalog
from shoal.models.hub import Hub, RepoListing
from shoal.models.pull import Source, pull, source_of

log = logging.getLogger(__name__)

PullStatus = Literal["starting", "downloading", "done", "failed"]


@dataclass
class PullState:
    """One model's pull as the API reports it."""

    model: str
    status: PullStatus = "starting"
    done: int = 0  # bytes
    total: int = 0  # bytes to fetch (0 until the listing is read)
    files: int = 0  # files to fetch (config and tokenizer files come first, uncounted)
    reason: str | None = None
    started: float = field(default_factory=time.time)
    _moved: dict[str, int] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, object]:
        return {
            "model": self.model,
            "status": self.status,
            "done": self.done,
            "total": self.total,
            "files": self.files,
            "reason": self.reason,
            "started": self.started,
        }


class Pulls:
    """This node's pulls by model id, each on a worker thread."""

    def __init__(self, hub: Hub, catalog: Catalog) -> None:
        self._hub = hub
        self._catalog = catalog
        self._pulls: dict[str, PullState] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.ended = 0  # pulls finished or failed: what the cache holds may have changed

    def start(self, model: str, source: Source | None = None) -> PullState:
        """The model's pull (from `source`, else its card's first Hub source): started now
        unless one is under way (then that one). BadRequest or ModelNotFound at once when the
        model names no Hub source."""
        current = self._pulls.get(model)
        if current is not None and current.status in ("starting", "downloading"):
            return current
        source = source or source_of(model, self._catalog)  # an unknown model fails here
        state = self._pulls[model] = PullState(model)
        task = asyncio.create_task(self._run(state, source), name=f"pull {model}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return state

    def states(self) -> list[PullState]:
        """Every pull this node ran or runs, newest first."""
        return sorted(self._pulls.values(), key=lambda s: -s.started)

    async def close(self) -> None:
        """Stop waiting for the pulls (their threads end with their current file)."""
        for task in self._tasks:
            task.cancel()

    async def _run(self, state: PullState, source: Source) -> None:
        def planned(paths: list[str], listing: RepoListing) -> None:
            state.files = len(paths)
            state.total = sum(listing.file(p).size for p in paths)
            state.status = "downloading"

        def moved(path: str, done: int, _size: int) -> None:
            state._moved[path] = done
            state.done = sum(state._moved.values())

        try:
            result = await asyncio.to_thread(
                pull, self._hub, source, progress=moved, planned=planned
            )
        except asyncio.CancelledError:
            raise
        except ShoalError as exc:
            state.status, state.reason = "failed", str(exc)
            log.warning("pull of %s failed: %s", state.model, exc)
            return
        except Exception as exc:  # a bug: say it, keep serving
            state.status, state.reason = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("pull of %s failed", state.model)
            return
        finally:
            self.ended += 1
        state.status, state.done = "done", state.total
        log.info("pulled %s: %d files (%d fetched now) in %s", state.model, len(result.paths),
                 result.fetched, result.directory)  # fmt: skip
