"""The `shoal` command: node, chat, models (and bench). Errors are one readable line, exit != 0."""

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, get_args

import httpx
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from shoal import __version__
from shoal.bench.cli import add_bench
from shoal.errors import ShoalError
from shoal.types.weights import QUANTS, DType

DEFAULT_API = "http://127.0.0.1:52415"
DEFAULT_MODEL = "smollm2-135m"


class CliError(Exception):
    """Ends the command with one line on stderr and exit status 1."""


# --- shoal node ----------------------------------------------------------------------------------


def _add_node(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="run a node: serve the OpenAI API and models")
    p.add_argument(
        "--host",
        help="the HTTP API's address (default 127.0.0.1; 0.0.0.0 opens it to the network; "
        "SHOAL_HOST)",
    )
    p.add_argument(
        "--cluster-host",
        help="address runners, the control plane and enrolment listen on and other nodes reach "
        "this one at (default: this machine's address on its default route; SHOAL_CLUSTER_HOST)",
    )
    p.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        help="a key the API takes for inference and reads (repeatable; SHOAL_API_KEYS, commas)",
    )
    p.add_argument(
        "--admin-key",
        dest="admin_keys",
        action="append",
        help="a key that may also place and delete instances (repeatable; SHOAL_ADMIN_KEYS)",
    )
    p.add_argument(
        "--api-keys-file",
        type=Path,
        help="keys, one a line: KEY or KEY user or KEY admin; # comments (SHOAL_API_KEYS_FILE)",
    )
    p.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        help="a browser origin allowed to call the API, e.g. https://chat.example (repeatable)",
    )
    p.add_argument("--port", type=int, help="HTTP port (default 52415; SHOAL_PORT)")
    p.add_argument("--data-dir", type=Path, help="where the node keeps its files (SHOAL_DATA_DIR)")
    p.add_argument("--model", help="model id to load at start, e.g. smollm2-135m (SHOAL_MODEL)")
    p.add_argument("--model-path", type=Path, help="serve a GGUF file or safetensors directory")
    p.add_argument(
        "--engine",
        help="offer only this engine: torch, numpy, mlx, llamacpp (default: all installed)",
    )
    p.add_argument("--device", help="torch device: cpu, cuda, mps (default: best available)")
    p.add_argument(
        "--devices",
        help="GPUs this node offers, by index: 0,2; cpu for none (default: all)",
    )
    p.add_argument(
        "--simulated-gpus",
        metavar="COUNTxGIB",
        help="for tests on a CPU machine: claim COUNT CUDA GPUs of GIB each, run on the CPU",
    )
    p.add_argument(
        "--dtype",
        choices=get_args(DType),
        help="torch activations and KV cache (default float32; SHOAL_DTYPE)",
    )
    p.add_argument(
        "--quant",
        choices=QUANTS,
        help="weight format (default: the model card's, int4 for smollm2; SHOAL_QUANT)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="compute threads of each runner (default: the cores, split evenly among the runners "
        "that compute on them)",
    )
    p.add_argument("--max-batch", type=int, help="requests decoded together (default 8)")
    p.add_argument(
        "--max-queue", type=int, help="requests waiting per instance before a 429 (default 64)"
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        help="prompt tokens per step, run beside the other requests' decode (default 256)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=int,
        help="MiB of finished requests' KV caches each stage keeps, so a prompt that begins the "
        "same way (the chat so far, a system prompt) skips that prefill (default 256; 0: off)",
    )
    p.add_argument(
        "--speculate",
        type=int,
        metavar="N",
        help="speculative decoding: up to N draft tokens (from earlier text: prompt lookup) "
        "verified in one step, for greedy requests; output is unchanged (default 0: off)",
    )
    p.add_argument(
        "--http-timeout",
        dest="http_timeout_s",
        type=float,
        help="seconds a client has to send a request's headers, and its body (default 30)",
    )
    p.add_argument(
        "--no-auto-load",
        dest="auto_load",
        action="store_const",
        const=False,
        help="answer 503 for models not loaded instead of loading them",
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="json: one JSON object a log line (default text; SHOAL_LOG_FORMAT)",
    )
    p.add_argument(
        "--cluster", help="cluster name; separates clusters on one LAN (default: default)"
    )
    p.add_argument("--control-port", type=int, help="control-plane port (default 52416)")
    p.add_argument("--peers", help="static peers HOST:CONTROL_PORT,... (always work, no multicast)")
    p.add_argument(
        "--discovery",
        choices=["static", "multicast"],
        help="multicast: also find peers by zenoh scouting on the LAN",
    )
    p.add_argument("--lease-ms", type=int, help="a hung peer is dropped after this (default 2000)")
    p.add_argument(
        "--profile-interval",
        dest="profile_interval_s",
        type=float,
        help="seconds between profile refreshes (default 5)",
    )
    p.add_argument(
        "--weights-cache",
        type=Path,
        help="where dequantized weights are cached (default <data-dir>/weights-cache)",
    )
    p.add_argument(
        "--no-microbench",
        dest="microbench",
        action="store_const",
        const=False,
        help="skip measuring memory bandwidth and matmul speed",
    )
    p.add_argument(
        "--no-probe-engines",
        dest="probe_engines",
        action="store_const",
        const=False,
        help="offer llama.cpp and MLX untried (default: each runs a tiny model once, cached)",
    )
    p.add_argument("--join", help="join a cluster with a token from `shoal invite` (first start)")
    p.add_argument("--enrol-port", type=int, help="TLS port for joins (default 52417)")
    p.add_argument(
        "--files-port",
        type=int,
        help="mutual-TLS port serving model files to members (default 52418)",
    )
    p.set_defaults(func=_node)


def _node(args: argparse.Namespace) -> None:
    from shoal import log
    from shoal.node import serve
    from shoal.settings import load_settings

    try:
        settings = load_settings(vars(args))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CliError(f"bad setting {first['loc'][0]}: {first['msg']}") from exc
    log.configure(settings.log_level, settings.log_format)
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=_fast_loop()) as run:
        run.run(serve(settings))


def _fast_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (a faster HTTP path), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# --- client commands ---------------------------------------------------------------------------


def _auth(args: argparse.Namespace) -> dict[str, str]:
    """The Authorization header for --api-key / SHOAL_API_KEY, if one is given."""
    from shoal.settings import client_api_key

    key = client_api_key(getattr(args, "api_key", None))
    return {"Authorization": f"Bearer {key}"} if key else {}


def _add_key(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", help="the node's API key, if it wants one (SHOAL_API_KEY)")


def _get(api: str, path: str, headers: dict[str, str]) -> Any:
    try:
        response = httpx.get(f"{api.rstrip('/')}{path}", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach a shoal node at {api}: {exc}") from exc
    return _checked(response)


def _checked(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise CliError(f"HTTP {response.status_code}: {message}")
    return response.json()


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models, and whether each runs here (or why not)")
    p.add_argument("--api", default=DEFAULT_API, help=f"node to ask (default {DEFAULT_API})")
    p.add_argument(
        "--local", action="store_true", help="this machine alone: its engines and RAM, no node"
    )
    p.add_argument("--data-dir", type=Path, help="where downloads are kept (SHOAL_DATA_DIR)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    _add_key(p)
    p.set_defaults(func=_models)


def _models(args: argparse.Namespace) -> None:
    from shoal.models.catalog import Catalog
    from shoal.paths import user_cards_dir
    from shoal.settings import load_settings

    data_dir = load_settings({"data_dir": args.data_dir}).data_dir
    catalog = Catalog([user_cards_dir(data_dir)])
    listed: dict[str, Any] = {}
    profiles = None
    if not args.local:
        listed = {m["id"]: m for m in _get(args.api, "/v1/models", _auth(args))["data"]}
        profiles = _cluster_profiles(args)
    rows = _model_rows(catalog, listed, profiles, data_dir / "hub")
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    where = "this machine" if args.local else args.api
    table = Table(title=f"models ({where})")
    for column in ("id", "architecture", "size", "quantization", "availability"):
        table.add_column(column, overflow="fold")
    for row in rows:
        size = f"{row['storage_bytes'] / 1e9:,.1f} GB"
        table.add_row(
            row["id"], row["architecture"], size, row["quantization"], row["availability"]
        )
    Console().print(table)


def _cluster_profiles(args: argparse.Namespace) -> list[Any] | None:
    """The connected nodes' profiles from the node, or None when it runs without a cluster."""
    from shoal.types.profile import NodeProfile

    try:
        nodes = _get(args.api, "/v1/nodes", _auth(args))["nodes"]
    except CliError:
        return None
    extra = {"id", "connected", "lost_reason", "is_master", "last_seen_s_ago"}
    profiles = []
    for n in nodes:
        if n.get("connected") and "ram_available" in n:
            fields = {k: v for k, v in n.items() if k not in extra} | {"node_id": n["id"]}
            with contextlib.suppress(ValidationError):  # a node of another version: left out
                profiles.append(NodeProfile.model_validate_json(json.dumps(fields)))
    return profiles or None


def _model_rows(
    catalog: Any, listed: dict[str, Any], profiles: list[Any] | None, hub_root: Path
) -> list[dict[str, Any]]:
    """One row per model: the node's status where it runs one, else whether it can run here."""
    from shoal.serving.availability import Answers

    answers = Answers(profiles, hub_root)
    rows = []
    ids = list(listed) or [card.id for card in catalog.all()]
    for model_id in ids:
        node = listed.get(model_id, {})
        if model_id in catalog:
            card = catalog.get(model_id)
            answer = answers(card)
            line = answer.line
            row = {k: getattr(card, k) for k in ("id", "architecture", "quantization")}
            row["storage_bytes"] = card.storage_bytes
        else:  # a card the node made at run time
            line = node.get("reason") or node.get("status", "")
            row = {k: node.get(k, "?") for k in ("id", "architecture", "quantization")}
            row["storage_bytes"] = node.get("storage_size_megabytes", 0) * 2**20
        status = node.get("status")
        if status in ("ready", "loading"):
            line = f"{status} on the cluster"
        elif status == "failed":
            line = f"failed on the cluster: {node.get('reason') or 'a runner failed'}"
        rows.append(row | {"availability": line})
    return rows


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="the cluster as a table: nodes, hardware, engines, master")
    p.add_argument("--api", default=DEFAULT_API, help=f"node to ask (default {DEFAULT_API})")
    _add_key(p)
    p.set_defaults(func=_status)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f}"


def _gpu(g: dict[str, Any]) -> str:
    """One GPU for people: "cuda:1 V100 15.2/16.0 GiB"."""
    where = "mps" if g.get("backend") == "metal" else f"cuda:{g.get('index', 0)}"
    return f"{where} {g['name']} {_gib(g.get('memory_free'))}/{_gib(g['memory_total'])} GiB"


def _where(stage: dict[str, Any]) -> str:
    """A stage's devices: "cuda:0", "cuda:1 + cpu 4 layers", "cuda 12/14" (llamacpp)."""
    text = stage.get("device") or ""
    if stage.get("gpu_split"):
        text += " " + "/".join(str(n) for n in stage["gpu_split"])
    if stage.get("cpu_layers"):
        text += f" + cpu {stage['cpu_layers']} layers"
    return text.strip()


def _status(args: argparse.Namespace) -> None:
    data = _get(args.api, "/v1/nodes", _auth(args))
    table = Table(title=f"cluster at {args.api} (log index {data['index']})")
    for column in ("", "node", "OS/arch", "RAM free/total GiB", "GPUs", "engines", "seen"):
        table.add_column(column)
    for n in data["nodes"]:
        gpus = ", ".join(_gpu(g) for g in n.get("gpus", []))
        ago = n["last_seen_s_ago"]
        seen = (
            "lost: " + (n["lost_reason"] or "")
            if not n["connected"]
            else (
                "now" if ago is not None and ago < 2 else f"{ago}s ago" if ago is not None else "?"
            )
        )
        table.add_row(
            "★" if n["is_master"] else "",
            n["id"],
            f"{n.get('os', '?')}/{n.get('arch', '?')}",
            f"{_gib(n.get('ram_available'))}/{_gib(n.get('ram_total'))}",
            gpus or "-",
            ", ".join(n.get("engines", [])) or "-",
            seen,
        )
    Console().print(table)
    instances = _get(args.api, "/v1/instances", _auth(args))["data"]
    if instances:
        placed = Table(title="instances")
        for column in ("instance", "model", "stages", "status"):
            placed.add_column(column)
        for inst in instances:
            stages = ", ".join(
                f"{s['node_id'][:14]}…[{s['start']},{s['end']})"
                + (f" {where}" if (where := _where(s)) else "")
                for s in inst["stages"]
            )
            placed.add_row(inst["instance_id"], inst["model_id"], stages, _instance_status(inst))
        Console().print(placed)


def _instance_status(inst: dict[str, Any]) -> str:
    """ready, or what its runners are doing: failed (why), downloading x/y GB, loading."""
    if inst["ready"]:
        return "ready"
    statuses = [r["status"] for r in inst["runners"].values()]
    failed = [s for s in statuses if s["kind"] == "failed"]
    if failed:
        return f"failed: {failed[0].get('reason', '')}"
    down = [s for s in statuses if s["kind"] == "downloading"]
    if down:
        done, total = sum(s["done"] for s in down), sum(s["total"] for s in down)
        return f"downloading {done / 1e9:.2f}/{total / 1e9:.2f} GB"
    return "loading"


def _add_place(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("place", help="place an instance of a model on the cluster")
    p.add_argument("model", help="model id (e.g. smollm2-135m) or Hugging Face repo id (org/name)")
    p.add_argument(
        "--policy",
        choices=["latency", "throughput"],
        default="latency",
        help="latency: fewest, fastest nodes (default); throughput: balanced stages",
    )
    p.add_argument("--layers", help="manual split NODE:START-END,... (NODE: id or unique prefix)")
    p.add_argument("--engine", help="force this engine on every stage")
    p.add_argument("--api", default=DEFAULT_API, help=f"node to talk to (default {DEFAULT_API})")
    _add_key(p)
    p.set_defaults(func=_place)


def _place(args: argparse.Namespace) -> None:
    body = {
        "model": args.model,
        "policy": args.policy,
        "layers": args.layers,
        "engine": args.engine,
    }
    try:
        url = f"{args.api.rstrip('/')}/instance"
        r = httpx.post(url, json=body, headers=_auth(args), timeout=60)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach a shoal node at {args.api}: {exc}") from exc
    instance = _checked(r)
    table = Table(title=f"{instance['instance_id']} ({instance['policy']})")
    for column in ("stage", "node", "layers", "engine", "device"):
        table.add_column(column)
    for i, s in enumerate(instance["stages"]):
        layers = f"[{s['start']}, {s['end']})"
        table.add_row(str(i), s["node_id"], layers, s["engine"], _where(s) or "default")
    Console().print(table)
    if instance.get("predicted_tok_s"):
        print(f"predicted decode speed: {instance['predicted_tok_s']:.1f} tok/s")


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="ask a running node and stream the answer")
    p.add_argument("prompt", help="what to ask")
    p.add_argument("--api", default=DEFAULT_API, help=f"node to ask (default {DEFAULT_API})")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model id (default {DEFAULT_MODEL})")
    p.add_argument("--system", help="a system message")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int)
    _add_key(p)
    p.set_defaults(func=_chat)


def _sse_data(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)


def _chat(args: argparse.Namespace) -> None:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    body = {
        "model": args.model,
        "messages": messages,
        "stream": True,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
    }
    url = f"{args.api.rstrip('/')}/v1/chat/completions"
    try:
        timeout = httpx.Timeout(600, connect=10)
        with httpx.stream("POST", url, json=body, headers=_auth(args), timeout=timeout) as r:
            if r.status_code >= 400:
                r.read()
                _checked(r)
            for chunk in _sse_data(r.iter_lines()):
                if "error" in chunk:
                    raise CliError(chunk["error"]["message"])
                for choice in chunk.get("choices", []):
                    print(choice["delta"].get("content") or "", end="", flush=True)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach a shoal node at {args.api}: {exc}") from exc
    print()


# --- shoal pull -----------------------------------------------------------------------------------


def _add_pull(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull", help="download a model's files (or a stage's) from the Hugging Face Hub"
    )
    p.add_argument(
        "model", help="model id (e.g. qwen3-0.6b-8bit) or Hugging Face repo id (org/name)"
    )
    p.add_argument("--layers", help="only the files layers START-END need (half-open, e.g. 0-14)")
    p.add_argument("--revision", help="branch, tag or commit (default main)")
    p.add_argument("--data-dir", type=Path, help="files go to <data-dir>/hub (SHOAL_DATA_DIR)")
    p.set_defaults(func=_pull)


def _pull(args: argparse.Namespace) -> None:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from shoal.models.catalog import Catalog
    from shoal.models.hub import Hub, RepoListing
    from shoal.models.pull import parse_layers, pull, source_of
    from shoal.paths import user_cards_dir
    from shoal.settings import load_settings

    settings = load_settings({"data_dir": args.data_dir})
    hub = Hub(settings.data_dir / "hub")
    source = source_of(args.model, Catalog([user_cards_dir(settings.data_dir)]))
    layers = parse_layers(args.layers) if args.layers else None
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    bars = Progress(*columns, console=Console(stderr=True))
    tasks: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    done: dict[str, int] = {}

    def planned(paths: list[str], listing: RepoListing) -> None:
        if not paths:
            return
        bars.start()
        for path in paths:
            sizes[path] = listing.file(path).size
            tasks[path] = bars.add_task(path, total=sizes[path])
        tasks[""] = bars.add_task("total", total=sum(sizes.values()))

    def moved(path: str, n: int, _size: int) -> None:
        done[path] = n
        bars.update(tasks[path], completed=n)
        bars.update(tasks[""], completed=sum(done.values()))

    try:
        result = pull(hub, source, revision=args.revision, layers=layers, progress=moved,
                      planned=planned)  # fmt: skip
    finally:
        if tasks:  # started: the bars are on the screen
            bars.stop()
    print(
        f"{result.repo} at {result.commit[:12]}: {len(result.paths)} files ({result.fetched} "
        f"fetched now) in {result.directory}"
    )


# --- entry point ----------------------------------------------------------------------------------


# --- shoal init / invite / remove ----------------------------------------------------------------


def _add_trust(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="make a new cluster's credentials (`shoal node` does it too)")
    p.add_argument("--data-dir", type=Path, help="the node's data dir (SHOAL_DATA_DIR)")
    p.add_argument("--cluster", help="cluster name (default 'default'; SHOAL_CLUSTER)")
    p.set_defaults(func=_init)
    p = sub.add_parser("invite", help="print a one-time token another machine joins with")
    p.add_argument("--data-dir", type=Path, help="the first node's data dir (SHOAL_DATA_DIR)")
    p.add_argument("--address", help="HOST:PORT joiners reach enrolment at (default: the node's)")
    p.add_argument("--ttl", type=float, default=24.0, help="hours the token stays valid (24)")
    p.set_defaults(func=_invite)
    p = sub.add_parser("remove", help="revoke a member: its messages are dropped, it cannot rejoin")
    p.add_argument("node", help="the node id to remove")
    p.add_argument("--data-dir", type=Path, help="a running member's data dir (SHOAL_DATA_DIR)")
    p.set_defaults(func=_remove)


def _trust_settings(args: argparse.Namespace) -> Any:
    from shoal.settings import load_settings

    return load_settings({"data_dir": args.data_dir, "cluster": getattr(args, "cluster", None)})


def _init(args: argparse.Namespace) -> None:
    from shoal.net.credentials import Credentials

    settings = _trust_settings(args)
    creds = Credentials.create(settings.data_dir, settings.cluster)
    print(f"cluster {creds.cluster!r}: CA sha256 {creds.fingerprint}")
    print(f"this node: {creds.node_id} (data in {settings.data_dir})")


def _enrol_address(data_dir: Path) -> str:
    path = data_dir / "tls" / "enrol.addr"
    if not path.exists():
        raise CliError(f"no running node wrote {path}: start `shoal node` first, or pass --address")
    return path.read_text().strip()


def _invite(args: argparse.Namespace) -> None:
    from shoal.net.credentials import Credentials
    from shoal.net.enrol import invite

    settings = _trust_settings(args)
    creds = Credentials.load(settings.data_dir)
    address = args.address or _enrol_address(settings.data_dir)
    print(invite(creds, address, ttl_s=args.ttl * 3600).encode())


def _remove(args: argparse.Namespace) -> None:
    from shoal.net.credentials import Credentials
    from shoal.net.enrol import remove
    from shoal.types.ids import NodeId

    settings = _trust_settings(args)
    creds = Credentials.load(settings.data_dir)
    print(asyncio.run(remove(creds, _enrol_address(settings.data_dir), NodeId(args.node))))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shoal", description=__doc__)
    p.add_argument("--version", action="version", version=f"shoal {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_node(sub)
    _add_chat(sub)
    _add_models(sub)
    _add_status(sub)
    _add_place(sub)
    _add_pull(sub)
    _add_trust(sub)
    add_bench(sub)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (CliError, ShoalError) as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
