"""The worker ↔ runner pipe: one JSON message a line, each a tagged, frozen, strict model.

Down (the runner's stdin): a `RunnerConfig` first, then `Route`, `Revoke`, `Threads` and `Stop`;
EOF also means stop (the parent died). Up (its stdout): `RunnerLoading` per layer, then
`RunnerReady` or `RunnerFailed` (exit 1). A line that is not a message is dropped, logged once per
pipe and then at debug. When the up pipe closes without a failure, the runner exited:
`RunnerExited(code)`.
"""

import logging
from dataclasses import dataclass
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import Field, TypeAdapter, ValidationError, model_validator

from shoal.engines.registry import EngineOptions
from shoal.net.frames import WireDType
from shoal.types.ids import ModelId, NodeId
from shoal.types.message import Message
from shoal.types.shard import Shard
from shoal.types.weights import DType, Quant

# ---- down: the worker to its runner ----


class RunnerConfig(Message):
    """What one runner loads and where it listens."""

    kind: Literal["config"] = "config"
    model_path: str
    model_id: ModelId
    start: int
    end: int
    n_layers: int
    engine: str = "torch"
    device: str | None = None
    cpu_layers: int = Field(default=0, ge=0)  # the last layers on the CPU (engines/split.py)
    gpu_split: tuple[int, ...] = ()  # llamacpp: layers per GPU (tensor_split)
    dtype: DType = "float32"  # torch only
    quant: Quant = "none"  # torch, numpy, native: engines/torch/quant.py, engines/native/
    host: str = "127.0.0.1"
    threads: int | None = None
    wire_dtype: WireDType = "float32"
    # Steps of at most this many tokens run on the loop's thread instead of the engine thread
    # (runner._on_engine). 0: torch's OpenMP pool belongs to the calling thread, and torch work
    # on two threads of one process makes two pools that slow each other down ~2x on 2 cores.
    inline_tokens: int = 0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    cache_dir: str | None = None  # dequantized weights cached here (models/weight_cache.py)
    # What one data-plane peer may ask of the runner (worker/limits.py, stage.StageServer):
    # tokens and items per step (frames larger than the tokens allow are refused from their
    # header), live request caches, open connections; a connection must say HELLO within
    # hello_timeout_s, and a frame that stops arriving midway for frame_timeout_s is dropped.
    max_step_tokens: int = Field(default=8192, gt=0)
    max_items: int = Field(default=256, gt=0)
    max_live_requests: int = Field(default=64, gt=0)
    # finished requests' caches kept for later ones to start from (prefix caching), bytes
    prefix_cache_bytes: int = Field(default=0, ge=0)
    max_connections: int = Field(default=64, gt=0)
    hello_timeout_s: float = Field(default=5.0, gt=0)
    frame_timeout_s: float = Field(default=10.0, gt=0)
    # The data dir whose cluster credentials (net/credentials.py) the data plane runs on: TLS
    # both ways, peers must present a certificate from the cluster CA and not be revoked (Revoke
    # updates the list). Required, so every caller chooses; None is plain TCP, for debugging
    # and the TLS-against-plain benchmark only (bench/data_plane.py).
    credentials: str | None
    revoked: tuple[NodeId, ...] = ()

    @property
    def shard(self) -> Shard:
        return Shard(model_id=self.model_id, start=self.start, end=self.end, n_layers=self.n_layers)

    @property
    def engine_options(self) -> EngineOptions:
        """The options every engine is built from (each takes those it knows: the registry)."""
        gpu_layers = self.end - self.start - self.cpu_layers if self.cpu_layers else None
        return EngineOptions(
            device=self.device,
            dtype=self.dtype,
            quant=self.quant,
            threads=self.threads,
            gpu_layers=gpu_layers,
            gpu_split=self.gpu_split,
        )

    @model_validator(mode="after")
    def _check_shard(self) -> "RunnerConfig":
        self.shard  # noqa: B018 -- Shard checks the layer range
        if self.cpu_layers >= self.end - self.start and self.cpu_layers:
            raise ValueError("cpu_layers must leave at least one layer on the device")
        return self


class Route(Message):
    """Send outputs to `next_addr` ("host:port"); None on the last stage."""

    kind: Literal["route"] = "route"
    next_addr: str | None


class Revoke(Message):
    """Refuse these nodes from now on (every revoked id, not a change): close their connections."""

    kind: Literal["revoke"] = "revoke"
    node_ids: tuple[NodeId, ...]


class Threads(Message):
    """Run the engine's CPU work on this many threads from its next step on: the worker shares
    the node's cores among the runners that compute on them."""

    kind: Literal["threads"] = "threads"
    threads: int = Field(gt=0)


class Stop(Message):
    """Stop serving and exit 0."""

    kind: Literal["stop"] = "stop"


Down = RunnerConfig | Route | Revoke | Threads | Stop
ToRunner = Annotated[Down, Field(discriminator="kind")]


# ---- up: the runner to its worker ----


class RunnerLoading(Message):
    """`done` of `total` layers loaded."""

    kind: Literal["loading"] = "loading"
    done: int = Field(ge=0)
    total: int = Field(ge=0)


class RunnerReady(Message):
    """Serving on `data_addr`; `engine` is the engine that runs the shard (the placed one, or
    native where torch or numpy hand it their int8/int4 CPU shard, or torch or numpy where native
    cannot run the model)."""

    kind: Literal["ready"] = "ready"
    data_addr: str
    engine: str


class RunnerUsage(Message):
    """Positions the shard's KV caches hold now, every request together (sent when it moves)."""

    kind: Literal["usage"] = "usage"
    positions: int = Field(ge=0)


class RunnerFailed(Message):
    """Could not load or listen; `reason` in one line. The runner exits 1."""

    kind: Literal["failed"] = "failed"
    reason: str


FromRunner = Annotated[
    RunnerLoading | RunnerReady | RunnerUsage | RunnerFailed, Field(discriminator="kind")
]


@dataclass(frozen=True)
class RunnerExited:
    """The runner's status pipe closed without a failure: it exited with `code` (None: unknown)."""

    code: int | None

    @property
    def reason(self) -> str:
        return f"runner exited with {self.code}"


# ---- decoding ----

_DOWN: TypeAdapter[Down] = TypeAdapter(ToRunner)
_UP: TypeAdapter[RunnerLoading | RunnerReady | RunnerUsage | RunnerFailed] = TypeAdapter(FromRunner)


T = TypeVar("T")


class LineDecoder(Generic[T]):
    """Lines → messages of one direction; a bad line is logged once at WARNING, then at DEBUG."""

    def __init__(self, adapter: TypeAdapter[T], log: logging.Logger, what: str) -> None:
        self._adapter = adapter
        self._log = log
        self._what = what
        self._warned = False

    def __call__(self, line: bytes) -> T | None:
        """The message on `line`, or None (logged) if it is not one."""
        try:
            return self._adapter.validate_json(line)
        except ValidationError as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            self._log.log(level, "dropped a bad %s line %r: %s", self._what, line[:200], brief(exc))
            return None


def parse_down(line: bytes) -> Down:
    """One message for a runner; ValidationError if the line is none."""
    return _DOWN.validate_json(line)


def down_decoder(log: logging.Logger) -> LineDecoder[Down]:
    """Decodes what the worker sends a runner."""
    return LineDecoder(_DOWN, log, "command")


def up_decoder(
    log: logging.Logger,
) -> LineDecoder[RunnerLoading | RunnerReady | RunnerUsage | RunnerFailed]:
    """Decodes what a runner reports."""
    return LineDecoder(_UP, log, "status")


def brief(exc: ValidationError) -> str:
    """The first error as "field.path: message", the message's tag left out."""
    error = exc.errors()[0]
    loc = error["loc"]
    tags = ("config", "route", "revoke", "threads", "stop", "loading", "ready", "failed")
    if len(loc) > 1 and loc[0] in tags:
        loc = loc[1:]  # the discriminated union's tag
    where = ".".join(str(part) for part in loc) or "line"
    return f"{where}: {error['msg']}"
