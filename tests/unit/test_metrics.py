"""/metrics over the fake engine (in process, no sockets): the names, counters that grow by what
the requests did, the key check; the control-plane gauges of one memory-transport node; the
Fetcher's byte counts; and `--log-format json`'s one object a line."""

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from shoal.api.app import create_app
from shoal.api.auth import ApiKeys
from shoal.inference.metrics import InstanceLoad, RequestMetrics
from shoal.inference.pipeline import LocalPipeline, PipelineBroken
from shoal.inference.request import GenerationRequest, SamplingParams
from shoal.inference.scheduler import Scheduler
from shoal.log import JsonFormatter, configure
from shoal.models.catalog import Catalog
from shoal.models.hub import Hub, RepoFile, RepoListing
from shoal.net.files import PeerFiles
from shoal.settings import load_settings
from shoal.types.ids import InstanceId, ModelId, NodeId, RequestId
from shoal.types.model_card import HubWeights, ModelCard
from shoal.worker.fetch import Fetcher
from tests.helpers.cluster import memory_cluster
from tests.helpers.fakes import ByteTokenizer, fake_engine
from tests.helpers.inprocess import OneModelService, SchedulerHandle
from tests.helpers.pipelines import Wrapping

pytestmark = pytest.mark.timeout(30)

MODEL = "smollm2-135m"
KEY = "sk-metrics-user-0123"
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
REQUEST_NAMES = {
    "shoal:num_requests_running",
    "shoal:num_requests_waiting",
    "shoal:prompt_tokens",
    "shoal:generation_tokens",
    "shoal:request_success",
    "shoal:time_to_first_token_seconds",
    "shoal:inter_token_latency_seconds",
    "shoal:request_time_per_output_token_seconds",
    "shoal:e2e_request_latency_seconds",
    "shoal:failovers",
    "shoal:stream_replays",
}
NODE_NAMES = {
    "shoal:node_info",
    "shoal:nodes_connected",
    "shoal:nodes_known",
    "shoal:master_term",
    "shoal:is_master",
    "shoal:log_index_applied",
    "shoal:instances",
}


def scheduler_for(registry: CollectorRegistry | RequestMetrics, **kw: Any) -> Scheduler:
    """A fake-engine scheduler whose instruments are in registry (or are these)."""
    of = registry if isinstance(registry, RequestMetrics) else RequestMetrics(registry)
    metrics = of.model(MODEL)
    pipeline = kw.pop("pipeline", None) or LocalPipeline([fake_engine(delay_s=0.001)])
    return Scheduler(pipeline, ByteTokenizer(), context_length=8192, metrics=metrics, **kw)


def card() -> ModelCard:
    return Catalog().get(MODEL)


@contextlib.asynccontextmanager
async def served(keys: ApiKeys | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the app over one fake-engine scheduler whose instruments are in /metrics."""
    registry = CollectorRegistry()
    scheduler = scheduler_for(registry)
    service = OneModelService(SchedulerHandle(card(), ByteTokenizer(), scheduler, 8192))

    def loads() -> list[InstanceLoad]:
        return [
            InstanceLoad(ModelId(MODEL), InstanceId("i-1"), scheduler.running, scheduler.waiting)
        ]

    app = create_app(service, keys=keys, registry=registry, loads=loads)
    steps = asyncio.create_task(scheduler.run())
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            yield c
    finally:
        steps.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await steps


def parse(text: str) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """family name -> {(sample name, sorted labels): value}."""
    return {
        f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
        for f in text_string_to_metric_families(text)
    }


def value(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    """A sample's value (0 if it is not there yet: a counter no event has touched)."""
    key = (sample, tuple(sorted({"model_name": MODEL, **labels}.items())))
    return families.get(family, {}).get(key, 0.0)


async def scrape(client: httpx.AsyncClient, **headers: str) -> dict[str, Any]:
    r = await client.get("/metrics", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def sse(text: str) -> list[Any]:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    return [json.loads(p) for p in lines if p != "[DONE]"]


async def test_metrics_parse_and_name_every_request_instrument() -> None:
    async with served() as client:
        await client.post(COMPLETIONS, json={"model": MODEL, "prompt": "hi", "max_tokens": 3})
        families = await scrape(client)
        openmetrics = await client.get("/metrics", headers={"accept": OPENMETRICS})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert {f.name for f in openmetrics_families(openmetrics.text)} >= REQUEST_NAMES
    assert set(families) >= REQUEST_NAMES, REQUEST_NAMES - set(families)
    labels = (("instance", "i-1"), ("model_name", MODEL))
    for gauge in ("shoal:num_requests_running", "shoal:num_requests_waiting"):
        assert set(families[gauge]) == {(gauge, labels)}  # read from the scheduler at scrape time


async def test_counters_grow_by_what_streamed_and_whole_requests_did() -> None:
    async with served() as client:
        before = await scrape(client)
        usages, reasons = [], []
        for i in range(2):  # whole chat completions and completions
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi" * (i + 1)}]}
            r = await client.post(CHAT, json={**chat, "temperature": 0, "max_tokens": 5 + i})
            usages.append(r.json()["usage"])
            reasons.append(r.json()["choices"][0]["finish_reason"])
            r = await client.post(
                COMPLETIONS, json={"model": MODEL, "prompt": "abc", "max_tokens": 4}
            )
            usages.append(r.json()["usage"])
            reasons.append(r.json()["choices"][0]["finish_reason"])
        for n in (3, 7):  # streamed, usage in the last chunk
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "stream " * n}],
                "max_tokens": n,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            chunks = sse((await client.post(CHAT, json=body)).text)
            usages.append(chunks[-1]["usage"])
            reasons.append(next(c["choices"][0]["finish_reason"] for c in chunks[-2::-1]))
        after = await scrape(client)

    def grew(family: str, sample: str, **labels: str) -> float:
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    n = len(usages)
    prompt = sum(u["prompt_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    assert grew("shoal:prompt_tokens", "shoal:prompt_tokens_total") == prompt
    assert grew("shoal:generation_tokens", "shoal:generation_tokens_total") == generated > 0
    for reason in ("stop", "length"):
        got = grew("shoal:request_success", "shoal:request_success_total", finished_reason=reason)
        assert got == reasons.count(reason)
    ttft = "shoal:time_to_first_token_seconds"
    assert grew(ttft, f"{ttft}_count") == n
    e2e = "shoal:e2e_request_latency_seconds"
    assert grew(e2e, f"{e2e}_count") == n and grew(e2e, f"{e2e}_sum") > 0
    itl = "shoal:inter_token_latency_seconds"
    assert grew(itl, f"{itl}_count") == sum(max(u["completion_tokens"] - 1, 0) for u in usages)


async def test_metrics_need_a_key_when_keys_are_set_and_a_user_key_reads_them() -> None:
    async with served(ApiKeys.of(user=[KEY])) as client:
        denied = await client.get("/metrics")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert "shoal:prompt_tokens" in await scrape(client, authorization=f"Bearer {KEY}")


def request(rid: str, prompt: str, max_tokens: int) -> GenerationRequest:
    tokens = tuple(ByteTokenizer().encode(prompt, add_special_tokens=True))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return GenerationRequest(RequestId(rid), ModelId(MODEL), tokens, params)


class Breaking(Wrapping):
    """A pipeline that breaks (as a lost stage does) on its nth forward."""

    def __init__(self, at: int) -> None:
        super().__init__(LocalPipeline([fake_engine()]))
        self.at, self.calls = at, 0

    async def forward(self, steps: Any) -> Any:
        self.calls += 1
        if self.calls == self.at:
            raise PipelineBroken("stage 127.0.0.1:9 lost")
        return await self.inner.forward(steps)


async def until(condition: Callable[[], bool]) -> None:
    """Once condition holds (the scheduler steps meanwhile)."""
    async with asyncio.timeout(5):
        while True:
            if condition():
                return
            await asyncio.sleep(0.001)


@contextlib.asynccontextmanager
async def stepping(scheduler: Scheduler) -> AsyncIterator[Scheduler]:
    task = asyncio.create_task(scheduler.run())
    try:
        yield scheduler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_failover_counts_once_with_the_streams_it_replayed() -> None:
    async def recover(exc: PipelineBroken) -> LocalPipeline:
        return LocalPipeline([fake_engine()])

    registry = CollectorRegistry()
    async with stepping(scheduler_for(registry, pipeline=Breaking(at=4), recover=recover)) as s:
        for stream in [s.generate(request(f"r{i}", "abc" * (i + 1), 12)) for i in range(2)]:
            async for _ in stream:
                pass
    got = parse(_text(registry))
    assert value(got, "shoal:failovers", "shoal:failovers_total", outcome="resumed") == 1
    assert value(got, "shoal:failovers", "shoal:failovers_total", outcome="failed") == 0
    assert value(got, "shoal:stream_replays", "shoal:stream_replays_total") == 2
    success = "shoal:request_success_total"
    assert value(got, "shoal:request_success", success, finished_reason="length") == 2


async def test_requests_cancelled_running_or_queued_count_as_cancelled_and_errors_as_error() -> (
    None
):
    async def recover(exc: PipelineBroken) -> LocalPipeline:
        raise PipelineBroken("no capacity came back")

    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)
    async with stepping(scheduler_for(metrics, max_batch=1)) as s:
        running = s.generate(request("running", "hello", 200))
        queued = s.generate(request("queued", "hi", 5))  # behind it: max_batch 1
        await until(lambda: s.running == 1)
        assert s.waiting == 1
        await running.aclose()
        await queued.aclose()
        await until(lambda: s.load == 0)
    broken = Breaking(at=1)
    async with stepping(scheduler_for(metrics, pipeline=broken, recover=recover)) as s:
        with pytest.raises(PipelineBroken):
            async for _ in s.generate(request("failed", "hello", 5)):
                pass
    got = parse(_text(registry))
    success = "shoal:request_success_total"
    assert value(got, "shoal:request_success", success, finished_reason="cancelled") == 2
    assert value(got, "shoal:request_success", success, finished_reason="error") == 1
    assert value(got, "shoal:failovers", "shoal:failovers_total", outcome="failed") == 1


def _text(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


async def test_a_node_reports_its_control_plane(tmp_path: Path) -> None:
    async with memory_cluster(tmp_path, 1) as cluster:
        node = cluster.node("n0")
        await cluster.until(lambda: node.master_id == node.node_id and node.state.index > 0)
        scheduler = scheduler_for(CollectorRegistry())
        service = OneModelService(SchedulerHandle(card(), ByteTokenizer(), scheduler, 8192))
        app = create_app(service, cluster=node)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            families = await scrape(client)
            index, term = node.state.index, node.election.term
    assert set(families) >= NODE_NAMES, NODE_NAMES - set(families)
    one = {k[0]: v for f in families.values() for k, v in f.items() if not k[1]}
    assert one["shoal:nodes_connected"] == one["shoal:nodes_known"] == 1
    assert one["shoal:is_master"] == 1 and one["shoal:master_term"] == term >= 1
    assert one["shoal:log_index_applied"] == index
    info = families["shoal:node_info"]
    assert [dict(k[1])["node_id"] for k in info] == ["n0"]


# --- the Fetcher's byte counts ----------------------------------------------------------------

LISTING = RepoListing("org/tiny", "c" * 40, (RepoFile("config.json", 10, None, "b" * 40),))
CARD = ModelCard(
    id=ModelId("org/tiny"), name="tiny", family="llama", architecture="llama",
    hf_repo="org/tiny", layers=2, hidden_size=64, heads=4, kv_heads=2, head_dim=16,
    vocab_size=128, context_length=256, storage_bytes=10, quantization="bf16",
    license="unknown", weights=(HubWeights(format="safetensors", repo="org/tiny"),),
)  # fmt: skip


class ResumingHub:
    """A Hub whose download resumes a part of 4 bytes: progress reports 4, 7, 10 of 10."""

    def __init__(self, root: Path) -> None:
        self.root, self.held = root, False

    def cached_listing(self, repo: str, revision: str = "main") -> RepoListing:
        return LISTING

    def local(self, listing: RepoListing, path: str) -> Path | None:
        return self.root / path if self.held else None

    def download(self, listing: RepoListing, path: str, progress: Any = None) -> Path:
        for done in (4, 7, 10):
            progress(done, 10)
        self.held = True
        return self.root / path


class Peer:
    """A peer that holds every file; a copy reports 0, 6, 10 of 10."""

    async def listing(self, addr: str, repo: str, rev: str) -> tuple[RepoListing, set[str]]:
        return LISTING, {"config.json"}

    async def fetch(self, addrs: list[str], repo: str, commit: str, file: RepoFile,
                    dest: Path, progress: Any = None) -> Path:  # fmt: skip
        for done in (0, 6, 10):
            progress(done, 10)
        self.local.held = True
        return dest / file.path

    local: ResumingHub


async def test_the_fetcher_counts_bytes_moved_from_the_hub_and_from_peers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("shoal.worker.fetch.repo_dir", lambda root, repo, commit: root / commit)
    from_hub = Fetcher(NodeId("me"), cast(Hub, ResumingHub(tmp_path / "a")))
    await from_hub.stage(CARD, None, None)
    assert (from_hub.hub_bytes, from_hub.peer_bytes) == (6, 0)  # the resumed 4 were not moved
    peer = Peer()
    peer.local = ResumingHub(tmp_path / "b")
    from_peer = Fetcher(
        NodeId("me"),
        cast(Hub, peer.local),
        peers=lambda: [(NodeId("p"), "p:1")],
        files=cast(PeerFiles, peer),
    )
    await from_peer.stage(CARD, None, None)
    assert (from_peer.hub_bytes, from_peer.peer_bytes) == (0, 10)
    registry = CollectorRegistry()
    service = OneModelService(SchedulerHandle(CARD, ByteTokenizer(), scheduler_for(registry), 256))
    app = create_app(service, registry=registry, fetched=from_peer)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as c:
        families = await scrape(c)
    assert families["shoal:peer_copied_bytes"][("shoal:peer_copied_bytes_total", ())] == 10
    assert families["shoal:hub_downloaded_bytes"][("shoal:hub_downloaded_bytes_total", ())] == 0


# --- --log-format json ---------------------------------------------------------------------------


def test_json_log_lines_are_one_object_each_with_extras_and_tracebacks() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("shoal.test_metrics.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("two\nlines %d", 2, extra={"request_id": "r-1", "tokens": 5})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert {k: first[k] for k in ("level", "logger", "message", "request_id", "tokens")} == {
        "level": "WARNING",
        "logger": "shoal.test_metrics.json",
        "message": "two\nlines 2",
        "request_id": "r-1",
        "tokens": 5,
    }
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc_info"]


def test_log_format_comes_from_the_flag_or_shoal_log_format_and_configures_the_root() -> None:
    assert load_settings({}, {}).log_format == "text"
    assert load_settings({}, {"SHOAL_LOG_FORMAT": "json"}).log_format == "json"
    assert load_settings({"log_format": "text"}, {"SHOAL_LOG_FORMAT": "json"}).log_format == "text"
    with pytest.raises(ValueError):
        load_settings({}, {"SHOAL_LOG_FORMAT": "xml"})
    loggers = [logging.getLogger(n) for n in ("", "uvicorn.access", "httpx", "httpcore")]
    root = loggers[0]
    saved = root.handlers[:]
    levels = [lg.level for lg in loggers]
    try:
        configure("DEBUG", "json")
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.DEBUG
    finally:  # the process's logging as it was
        root.handlers[:] = saved
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def test_runner_restarts_and_kv_caches_are_read_from_the_worker_at_each_scrape() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from shoal.api.metrics import RunnersCollector, StageCache

    restarts = [0]
    caches = [StageCache("m", "m-1", 0, 1024, 4096), StageCache("m", "m-1", 1, 6144, 4096)]
    registry = CollectorRegistry()
    registry.register(RunnersCollector(lambda: restarts[0], lambda: caches))
    restarts[0] = 3
    text = generate_latest(registry).decode()
    assert "shoal:runner_restarts_total 3.0" in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    usage = {s.labels["stage"]: s.value for s in families["shoal:kv_cache_usage_perc"].samples}
    assert usage == {"0": 0.25, "1": 1.5}  # over 1: more cached than placement planned
    held = families["shoal:kv_cache_positions"].samples
    assert [(s.labels["instance"], s.value) for s in held] == [("m-1", 1024.0), ("m-1", 6144.0)]
