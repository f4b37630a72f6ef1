"""Lifecycle of a runner (one loaded model, or one stage of it): states are classes with data."""

from typing import Annotated, Literal

from pydantic import Field

from shoal.types.message import Message


class Downloading(Message):
    """Fetching the stage's weight files (from peers first, then the Hub): bytes `done` of
    `total`."""

    kind: Literal["downloading"] = "downloading"
    done: int = Field(default=0, ge=0)
    total: int = Field(default=0, ge=0)


class Loading(Message):
    """Reading weights: `done` of `total` units (layers)."""

    kind: Literal["loading"] = "loading"
    done: int = 0
    total: int = 0


class Ready(Message):
    """Loaded and serving; `engine` runs the shard (the runner says: it can differ from the
    stage's planned engine where torch or numpy hand an int8/int4 CPU shard to native, or native
    cannot run a model). None: not said (entries from before it was)."""

    kind: Literal["ready"] = "ready"
    engine: str | None = None


class Failed(Message):
    """Could not load or crashed; `reason` says why in one line."""

    kind: Literal["failed"] = "failed"
    reason: str


RunnerStatus = Annotated[Downloading | Loading | Ready | Failed, Field(discriminator="kind")]
