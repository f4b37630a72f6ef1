"""Lifecycle of a runner (one loaded model, or one stage of it): states are classes with data."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _State(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Loading(_State):
    """Reading weights: `done` of `total` units (layers)."""

    kind: Literal["loading"] = "loading"
    done: int = 0
    total: int = 0


class Ready(_State):
    """Loaded and serving."""

    kind: Literal["ready"] = "ready"


class Failed(_State):
    """Could not load or crashed; `reason` says why in one line."""

    kind: Literal["failed"] = "failed"
    reason: str


RunnerStatus = Annotated[Loading | Ready | Failed, Field(discriminator="kind")]
