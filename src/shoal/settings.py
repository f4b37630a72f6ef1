"""One frozen Settings: command-line flags first, SHOAL_* environment variables as fallback.

Every environment variable shoal reads is listed here and nowhere else: the node's settings
(ENV), a client's API key (SHOAL_API_KEY), the engines' process-wide knobs (RUNTIME_ENV); the XDG
directories are read in paths.py.
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shoal.paths import default_data_dir
from shoal.types.weights import DType, Quant

LogFormat = Literal["text", "json"]

# field name -> environment variable
ENV: dict[str, str] = {
    "host": "SHOAL_HOST",
    "cluster_host": "SHOAL_CLUSTER_HOST",
    "api_keys": "SHOAL_API_KEYS",
    "admin_keys": "SHOAL_ADMIN_KEYS",
    "api_keys_file": "SHOAL_API_KEYS_FILE",
    "cors_origins": "SHOAL_CORS_ORIGINS",
    "port": "SHOAL_PORT",
    "data_dir": "SHOAL_DATA_DIR",
    "model": "SHOAL_MODEL",
    "model_path": "SHOAL_MODEL_PATH",
    "engine": "SHOAL_ENGINE",
    "device": "SHOAL_DEVICE",
    "devices": "SHOAL_DEVICES",
    "simulated_gpus": "SHOAL_SIMULATED_GPUS",
    "dtype": "SHOAL_DTYPE",
    "quant": "SHOAL_QUANT",
    "threads": "SHOAL_THREADS",
    "max_batch": "SHOAL_MAX_BATCH",
    "max_queue": "SHOAL_MAX_QUEUE",
    "prefill_chunk": "SHOAL_PREFILL_CHUNK",
    "prefix_cache_mb": "SHOAL_PREFIX_CACHE_MB",
    "speculate": "SHOAL_SPECULATE",
    "http_timeout_s": "SHOAL_HTTP_TIMEOUT_S",
    "max_body_bytes": "SHOAL_MAX_BODY_BYTES",
    "auto_load": "SHOAL_AUTO_LOAD",
    "log_level": "SHOAL_LOG_LEVEL",
    "log_format": "SHOAL_LOG_FORMAT",
    "cluster": "SHOAL_CLUSTER",
    "control_port": "SHOAL_CONTROL_PORT",
    "peers": "SHOAL_PEERS",
    "discovery": "SHOAL_DISCOVERY",
    "lease_ms": "SHOAL_LEASE_MS",
    "join": "SHOAL_JOIN",
    "enrol_port": "SHOAL_ENROL_PORT",
    "files_port": "SHOAL_FILES_PORT",
    "profile_interval_s": "SHOAL_PROFILE_INTERVAL_S",
    "microbench": "SHOAL_MICROBENCH",
    "probe_engines": "SHOAL_PROBE_ENGINES",
    "weights_cache": "SHOAL_WEIGHTS_CACHE",
}

# what the client commands (`shoal chat`, `status`, `place`, `bench`, …) send as their API key
CLIENT_API_KEY_ENV = "SHOAL_API_KEY"


class Settings(BaseModel):
    """Everything a node is configured with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"  # the HTTP API's address: loopback unless told (0.0.0.0: every one)
    # where runners, zenoh and enrolment listen, and what other nodes reach this one at;
    # None: this machine's address on its default route (node.py), so a LAN cluster just works
    cluster_host: str | None = None
    api_keys: tuple[str, ...] = ()  # user keys: inference and reads (api/auth.py)
    admin_keys: tuple[str, ...] = ()  # also place and delete instances
    api_keys_file: Path | None = None  # `KEY [user|admin]` a line
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API
    port: int = Field(default=52415, ge=0, le=65535)
    data_dir: Path = Field(default_factory=default_data_dir)
    model: str | None = None  # preload this model id at start
    model_path: Path | None = None  # a GGUF file or safetensors directory to serve
    engine: str | None = None  # offer only this engine; None = every engine installed here
    device: str | None = None  # torch device; None = best available
    # the GPUs this node offers: "0,2" (indexes as CUDA counts them), "cpu" (none), None: all
    devices: str | None = None
    # for tests on a CPU machine: "2x4" claims two 4 GiB CUDA GPUs; their stages run on the CPU
    simulated_gpus: str | None = Field(default=None, pattern=r"^\d+x\d+(\.\d+)?$")
    dtype: DType = "float32"  # torch activations and caches
    quant: Quant | None = None  # torch weights; None = the card's
    threads: int | None = Field(default=None, ge=1)  # compute threads; None = all cores
    # a step carries at most max_batch decodes + one prefill chunk: runners take up to 256 items
    # and 8192 tokens a step (worker/limits.py)
    max_batch: int = Field(default=8, ge=1, le=256)  # requests decoded together per step
    max_queue: int = Field(default=64, ge=1)  # requests waiting per instance; then 429
    # prompt tokens per step, run beside the decodes
    prefill_chunk: int = Field(default=256, ge=1, le=4096)
    # finished requests' KV caches each stage keeps for later prompts that begin the same way
    # (inference/prefix.py); 0: none kept
    prefix_cache_mb: int = Field(default=256, ge=0)
    # draft tokens a greedy request's decode step verifies at once (prompt lookup); 0: off
    speculate: int = Field(default=0, ge=0, le=16)
    http_timeout_s: float = Field(default=30.0, gt=0)  # to send a request's headers, its body
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    auto_load: bool = True  # a request for a model not loaded loads it
    log_level: str = "INFO"
    log_format: LogFormat = "text"  # json: one object a line (log.py)
    cluster: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    control_port: int = Field(default=52416, ge=0, le=65535)  # zenoh listens here
    peers: tuple[str, ...] = ()  # other nodes' HOST:CONTROL_PORT, always tried
    discovery: Literal["static", "multicast"] = "static"  # multicast: zenoh scouting on the LAN
    lease_ms: int = Field(default=2000, ge=100)  # a hung peer is dropped after this
    join: str | None = None  # a join token from `shoal invite`; used once, on first start
    enrol_port: int = Field(default=52417, ge=0, le=65535)  # joins and removals (TLS) come here
    files_port: int = Field(default=52418, ge=0, le=65535)  # model files for members (mTLS)
    profile_interval_s: float = Field(default=5.0, gt=0)
    microbench: bool = True  # measure bandwidth and matmul speed once (cached)
    probe_engines: bool = True  # offer llama.cpp and MLX only once they ran a tiny model here
    weights_cache: Path | None = None  # dequantized weights; None = <data-dir>/weights-cache

    @field_validator("peers", "api_keys", "admin_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        if isinstance(v, str):
            return tuple(p.strip() for p in v.split(",") if p.strip())
        return v

    @field_validator("peers")
    @classmethod
    def _host_port(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for peer in v:
            host, _, port = peer.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"peer {peer!r} is not HOST:PORT")
        return v


def client_api_key(flag: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The key a client command sends: --api-key, else SHOAL_API_KEY, else none."""
    env = os.environ if environ is None else environ
    return flag or env.get(CLIENT_API_KEY_ENV) or None


def load_settings(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Flags that were given win; else the SHOAL_* variable; else the default."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        flag = flags.get(name)
        if flag is not None:
            values[name] = flag
        elif (var := ENV.get(name)) and var in env:
            values[name] = env[var]
    return Settings.model_validate(values)


# The engines' process-wide knobs: environment only (a runner inherits its node's), read here.
RUNTIME_ENV = {"native_kernels": "SHOAL_NATIVE", "cuda_graphs": "SHOAL_CUDA_GRAPHS", "cc": "CC"}


class Runtime(BaseModel):
    """How this process's engines run: the native block kernels (SHOAL_NATIVE=0 turns them off)
    compiled with CC (else cc, gcc); decode steps on CUDA as graphs (SHOAL_CUDA_GRAPHS=0: off)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    native_kernels: bool = True
    cuda_graphs: bool = True
    cc: str | None = None


def runtime(environ: Mapping[str, str] | None = None) -> Runtime:
    """The Runtime the environment asks for."""
    env = os.environ if environ is None else environ
    given = {name: env[var] for name, var in RUNTIME_ENV.items() if env.get(var)}
    return Runtime.model_validate(given)
