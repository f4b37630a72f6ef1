"""A stage runner: one engine serving one shard [start, end) over the data plane, as a subprocess.

With its parent (supervisor.py), in JSON lines. stdin: one RunnerConfig, then commands
{"cmd": "route", "next": "host:port" | null} and {"cmd": "stop"}; EOF also means stop (the parent
died). stdout: {"status": "loading", "done", "total"}, then {"status": "ready", "data_addr"} or
{"status": "failed", "reason"} (exit 1). Logs go to stderr: stdout carries only statuses. The
data plane it serves once loaded is worker/stage.py.
"""

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shoal.engines.base import Engine, WeightSource
from shoal.engines.registry import create_engine
from shoal.models.source import open_weights
from shoal.models.weight_cache import CachedWeights
from shoal.net import frames
from shoal.types.model_config import ModelConfig
from shoal.worker.stage import Control, StageServer, one_line, stage_limits
from shoal.worker.supervisor import RunnerConfig

# under `python -m`, __name__ is "__main__"; the spec keeps the module's real name
log = logging.getLogger(__spec__.name if __spec__ is not None else __name__)

# asyncio's default accept queue (100) overflows under a burst of connections, and a client
# whose SYN is dropped waits a second for the retry: 300 connections took 1.1 s to open, 0.08 s
# with this; the stage's connection cap (RunnerConfig.max_connections) then sorts them out.
BACKLOG = 1024


# ---- status lines (stdout) ----

_stdout_lock = threading.Lock()


def emit(status: str, **fields: Any) -> None:
    """One status line for the parent; called from the loading thread too."""
    with _stdout_lock:
        sys.stdout.write(json.dumps({"status": status, **fields}) + "\n")
        sys.stdout.flush()


def load_engine(config: RunnerConfig) -> tuple[Engine, ModelConfig]:
    """Open the weights and load the shard, reporting progress per layer; the model's config."""
    source: WeightSource = open_weights(Path(config.model_path))
    if config.cache_dir is not None:
        source = CachedWeights(source, Path(config.model_path), Path(config.cache_dir))
    options: dict[str, Any]
    if config.engine == "llamacpp":  # offloads every layer it can, unless told to stay on cpu
        options = {"n_threads": config.threads, "n_gpu_layers": 0 if config.device == "cpu" else -1}
    elif config.engine == "torch":
        options = {"device": config.device, "dtype": config.dtype, "quant": config.quant}
    elif config.engine == "numpy":
        options = {"quant": config.quant, "threads": config.threads}
    else:
        options = {}
    engine = create_engine(config.engine, **options)
    if config.threads is not None and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(config.threads)
    engine.load(config.shard, source, lambda done, total: emit("loading", done=done, total=total))
    return engine, source.config


# ---- the process ----


async def read_commands(stdin: asyncio.StreamReader, control: Control) -> None:
    """Apply the parent's commands until stop or EOF."""
    while line := await stdin.readline():
        try:
            cmd = json.loads(line)
            if cmd["cmd"] == "stop":
                break
            if cmd["cmd"] == "route":
                control.next_addr = cmd["next"]
                log.info("routed to %s", control.next_addr or "(the last stage)")
                continue
            raise ValueError(f"unknown command {cmd['cmd']!r}")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a bad command line %r: %s", line[:200], exc)
    control.stopped.set()


async def serve() -> int:
    """Read the config, load, listen, serve until stopped; the process exit code."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    line = await stdin.readline()
    if not line.strip() or line.strip() == b'{"cmd": "stop"}':
        return 0  # stopped before a config: a spare runner that was never needed
    try:
        config = RunnerConfig.model_validate_json(line)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "line"
        emit("failed", reason=f"bad runner config: {where}: {error['msg']}")
        return 1
    logging.getLogger().setLevel(config.log_level)
    control = Control()
    commands = asyncio.create_task(read_commands(stdin, control))
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    emit("loading", done=0, total=config.end - config.start)
    loading = asyncio.ensure_future(loop.run_in_executor(executor, load_engine, config))
    stopped = asyncio.create_task(control.stopped.wait())
    first: list[asyncio.Future[Any]] = [loading, stopped]
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():  # stopped mid-load: the loading thread cannot be interrupted
        log.info("stopped while loading %s", config.shard)
        sys.stdout.flush()
        os._exit(0)
    try:
        engine, model = loading.result()
        stage = StageServer(engine, config, control, executor, stage_limits(config, model))
        server = await asyncio.start_server(stage.handle, config.host, 0, backlog=BACKLOG)
    except Exception as exc:  # any load or bind failure becomes the failed status
        log.error("starting %s failed: %s", config.shard, exc)
        emit("failed", reason=one_line(exc))
        commands.cancel()
        stopped.cancel()
        executor.shutdown(wait=False)
        return 1
    port = server.sockets[0].getsockname()[1]
    addr = frames.format_addr(config.host, port)
    log.info("serving %s on %s", config.shard, addr)
    emit("ready", data_addr=addr)
    await stopped
    server.close()
    await stage.close()
    await loop.run_in_executor(executor, engine.close)
    executor.shutdown(wait=False)
    log.info("stopped %s", config.shard)
    return 0


def main() -> None:
    """Entry point of `python -m shoal.worker.runner [--preload ENGINE]`."""
    if len(sys.argv) == 3 and sys.argv[1] == "--preload":
        # a spare runner: import the engine's framework now, while it waits for a config
        with contextlib.suppress(Exception):
            create_engine(sys.argv[2])
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f"%(asctime)s runner[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    code = asyncio.run(serve())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # nothing left to save: skip joining idle framework threads at exit


if __name__ == "__main__":
    main()
