"""Lifecycle of a runner (one loaded model, or one stage of it): states are classes with data."""

from typing import Annotated, Literal

from pydantic import Field

from shoal.types.message import Message


class Loading(Message):
    """Reading weights: `done` of `total` units (layers)."""

    kind: Literal["loading"] = "loading"
    done: int = 0
    total: int = 0


class Ready(Message):
    """Loaded and serving."""

    kind: Literal["ready"] = "ready"


class Failed(Message):
    """Could not load or crashed; `reason` says why in one line."""

    kind: Literal["failed"] = "failed"
    reason: str


RunnerStatus = Annotated[Loading | Ready | Failed, Field(discriminator="kind")]
