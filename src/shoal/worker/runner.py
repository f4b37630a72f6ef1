"""A stage runner: one engine serving one shard [start, end) over the data plane, as a subprocess.

With its parent (supervisor.py), one typed message a line (worker/pipe.py). stdin: a RunnerConfig,
then Route and Stop; EOF also means stop (the parent died). stdout: RunnerLoading per layer, then
RunnerReady (with the engine that runs the shard) or RunnerFailed (exit 1). Logs go to stderr:
stdout carries only statuses. The data plane it serves once loaded is worker/stage.py.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import ssl
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shoal.engines.args import ModelArgs
from shoal.engines.base import Engine, WeightSource
from shoal.engines.registry import available_engines, build_engine, create_engine
from shoal.engines.split import SplitEngine
from shoal.log import configure as configure_logging
from shoal.models.source import open_weights
from shoal.models.weight_cache import CachedWeights
from shoal.net import frames
from shoal.net.credentials import Credentials
from shoal.types.message import Message
from shoal.types.model_config import ModelConfig
from shoal.worker.pipe import (
    Revoke,
    Route,
    RunnerConfig,
    RunnerFailed,
    RunnerLoading,
    RunnerReady,
    RunnerUsage,
    Stop,
    Threads,
    brief,
    down_decoder,
    parse_down,
)
from shoal.worker.stage import Control, StageServer, one_line, stage_limits

# under `python -m`, __name__ is "__main__"; the spec keeps the module's real name
log = logging.getLogger(__spec__.name if __spec__ is not None else __name__)

# asyncio's default accept queue (100) overflows under a burst of connections, and a client
# whose SYN is dropped waits a second for the retry: 300 connections took 1.1 s to open, 0.08 s
# with this; the stage's connection cap (RunnerConfig.max_connections) then sorts them out.
BACKLOG = 1024


# ---- status lines (stdout) ----

_stdout_lock = threading.Lock()


def emit(status: Message) -> None:
    """One status line for the parent; called from the loading thread too."""
    with _stdout_lock:
        sys.stdout.write(status.model_dump_json() + "\n")
        sys.stdout.flush()


# ---- the engine ----


def build(config: RunnerConfig, model: ModelConfig) -> Engine:
    """The placed engine; but a native shard that native cannot run here (a width not in whole
    blocks of 32, kernels that did not compile, a node --quant that is no block format) runs on
    torch on the CPU, or numpy, which the ready status then names."""
    options = config.engine_options
    if options.device is not None and options.device.startswith("cuda:"):
        # the placed GPU is the process's current device, so anything torch makes without
        # naming one (CUDA graphs' pools and streams among them) lands there too
        import torch

        torch.cuda.set_device(torch.device(options.device))
    if config.cpu_layers and config.engine != "llamacpp":  # llama.cpp offloads layers itself
        # the first layers on the device, the rest on the CPU in the same engine (torch there
        # hands an int8/int4 part to native, as any CPU shard)
        on_device = build_engine(config.engine, options)
        on_cpu = build_engine(config.engine, dataclasses.replace(options, device="cpu"))
        layers = config.end - config.start
        return SplitEngine([(on_device, layers - config.cpu_layers), (on_cpu, config.cpu_layers)])

        fallback = "torch" if "torch" in available_engines() else "numpy"
        log.warning("native cannot run %s in %s here: running it on %s", model.architecture,
                    config.quant, fallback)  # fmt: skip
        return build_engine(fallback, dataclasses.replace(options, device="cpu"))
    return build_engine(config.engine, options)


def _native_runs(quant: str, model: ModelConfig) -> bool:
    from shoal.engines.native.engine import runs  # numpy and the kernels: only when asked

    return runs(quant, ModelArgs.from_config(model))


def running(engine: Engine) -> str:
    """The engine that runs the shard: torch and numpy hand an int8/int4 CPU shard to native.
    A GPU + CPU split names its device part's."""
    if isinstance(engine, SplitEngine):
        return running(engine.engines[0])
    # their handle on it is private (engines/torch/engine.py, numpy/engine.py `_native`)
    return "native" if getattr(engine, "_native", None) is not None else engine.name


def load_engine(config: RunnerConfig) -> tuple[Engine, ModelConfig]:
    """Open the weights and load the shard, reporting progress per layer; the model's config."""
    source: WeightSource = open_weights(Path(config.model_path))
    # GGUF only: dequantizing one costs seconds per load; a safetensors directory (bf16, or
    # MLX's packed blocks, which engines take as they are) reads as fast as the cache would
    if config.cache_dir is not None and Path(config.model_path).is_file():
        source = CachedWeights(source, Path(config.model_path), Path(config.cache_dir))
    engine = build(config, source.config)
    if config.threads is not None and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(config.threads)
    engine.load(
        config.shard, source, lambda done, total: emit(RunnerLoading(done=done, total=total))
    )
    return engine, source.config


def tls_contexts(config: RunnerConfig) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """The data plane's server and client TLS contexts from the node's credentials: mutual TLS
    against the cluster CA. (None, None) without credentials: plain TCP."""
    if config.credentials is None:
        log.warning("no credentials: the data plane is plain TCP and takes any peer")
        return None, None
    creds = Credentials.load(Path(config.credentials))
    return creds.server_ssl_context(), creds.client_ssl_context()


# ---- the process ----


USAGE_EVERY_S = 1.0  # how often the KV caches' use is looked at (sent only when it moved)


async def report_usage(engine: Engine, every_s: float = USAGE_EVERY_S) -> None:
    """Tell the worker the positions the caches hold whenever it moves (for /metrics)."""
    last = -1
    while True:
        await asyncio.sleep(every_s)
        try:
            positions = engine.cached_positions()
        except RuntimeError:  # the caches changed while they were counted: next time
            continue
        if positions != last:
            emit(RunnerUsage(positions=positions))
            last = positions


class EngineThreads:
    """The engine's CPU threads as the worker last asked. Applied on the engine thread, between
    steps (torch's and OpenMP's thread counts are the calling thread's); asked during the load,
    once it is done."""

    def __init__(self, executor: ThreadPoolExecutor, loaded_with: int | None) -> None:
        self._executor = executor
        self._engine: Engine | None = None
        self.wanted = loaded_with

    def set(self, threads: int) -> None:
        changed, self.wanted = threads != self.wanted, threads
        if changed and self._engine is not None:
            self._apply(self._engine, threads)

    def attach(self, engine: Engine, loaded_with: int | None) -> None:
        self._engine = engine
        if self.wanted is not None and self.wanted != loaded_with:
            self._apply(engine, self.wanted)

    def _apply(self, engine: Engine, threads: int) -> None:
        def apply() -> None:
            engine.set_threads(threads)
            log.info("the engine runs on %d threads", threads)

        def failed(done: "Future[None]") -> None:
            if done.exception() is not None:
                log.warning("could not set the engine's threads: %s", done.exception())

        with contextlib.suppress(RuntimeError):  # the executor is shut down: stopping
            self._executor.submit(apply).add_done_callback(failed)


async def read_commands(
    stdin: asyncio.StreamReader, control: Control, threads: EngineThreads
) -> None:
    """Apply the parent's commands until stop or EOF; bad lines are dropped (logged once)."""
    decode = down_decoder(log)
    while line := await stdin.readline():
        match decode(line):
            case Stop():
                break
            case Route(next_addr=next_addr):
                control.next_addr = next_addr
                log.info("routed to %s", next_addr or "(the last stage)")
            case Revoke(node_ids=node_ids):
                control.revoke(node_ids)
                log.info("refusing %d revoked nodes", len(node_ids))
            case Threads(threads=count):
                threads.set(count)
            case RunnerConfig():
                log.warning("ignoring a second runner config")
    control.stopped.set()


async def serve() -> int:
    """Read the config, load, listen, serve until stopped; the process exit code."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    line = await stdin.readline()
    if not line.strip():
        return 0  # stdin closed before a config: a spare runner that was never needed
    try:
        message = parse_down(line)
    except ValidationError as exc:
        emit(RunnerFailed(reason=f"bad runner config: {brief(exc)}"))
        return 1
    if isinstance(message, Stop):
        return 0  # stopped before a config: a spare runner that was never needed
    if not isinstance(message, RunnerConfig):
        emit(RunnerFailed(reason=f"bad runner config: a {message.kind} before the config"))
        return 1
    config = message
    logging.getLogger().setLevel(config.log_level)
    control = Control(revoked=frozenset(config.revoked))
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    threads = EngineThreads(executor, config.threads)
    commands = asyncio.create_task(read_commands(stdin, control, threads))
    emit(RunnerLoading(done=0, total=config.end - config.start))
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
        threads.attach(engine, config.threads)
        server_ssl, client_ssl = tls_contexts(config)
        limits = stage_limits(config, model)
        stage = StageServer(engine, config, control, executor, limits, client_ssl=client_ssl)
        server = await asyncio.start_server(
            stage.handle,
            config.host,
            0,
            backlog=BACKLOG,
            ssl=server_ssl,
            # a peer that never finishes its handshake is dropped like one that never says HELLO
            ssl_handshake_timeout=config.hello_timeout_s if server_ssl is not None else None,
        )
    except Exception as exc:  # any load or bind failure becomes the failed status
        log.error("starting %s failed: %s", config.shard, exc)
        emit(RunnerFailed(reason=one_line(exc)))
        commands.cancel()
        stopped.cancel()
        executor.shutdown(wait=False)
        return 1
    port = server.sockets[0].getsockname()[1]
    addr = frames.format_addr(config.host, port)
    how = "mutual TLS, members only" if server_ssl is not None else "plain TCP"
    log.info("serving %s on %s (%s)", config.shard, addr, how)
    runs = running(engine)
    if runs != config.engine:
        log.warning("placed on %s, %s runs on %s", config.engine, config.shard, runs)
    emit(RunnerReady(data_addr=addr, engine=runs))
    usage = asyncio.create_task(report_usage(engine))
    await stopped
    usage.cancel()
    server.close()
    await stage.close()
    await loop.run_in_executor(executor, engine.close)
    executor.shutdown(wait=False)
    log.info("stopped %s", config.shard)
    return 0


def main() -> None:
    """Entry point of `python -m shoal.worker.runner [--preload ENGINE] [--log-format json]`."""
    parser = argparse.ArgumentParser(prog="shoal.worker.runner")
    parser.add_argument("--preload", metavar="ENGINE")
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    args = parser.parse_args()
    if args.preload:
        # a spare runner: import the engine's framework now, while it waits for a config
        with contextlib.suppress(Exception):
            create_engine(args.preload)
    if args.log_format == "json":
        configure_logging("INFO", "json")
    else:
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
