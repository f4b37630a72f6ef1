"""/metrics and `--log-format json` on a real `shoal node` serving SmolLM2: one scrape after a
whole and a streamed request, and the node's log read back line by line."""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.nodes import NodeProcess, start_node

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    tmp: Path = tmp_path_factory.mktemp("metrics")
    # no prefix cache: a finished request's caches are freed, not kept (they would count)
    args = ["--model", MODEL, "--log-format", "json", "--no-microbench", "--prefix-cache-mb", "0"]
    proc = start_node(tmp, args)
    try:
        proc.wait_ready(MODEL, timeout=180)
        yield proc
    finally:
        proc.stop()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)]."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found.setdefault(s.name, []).append((s.labels, s.value))
    return found


def total(found: dict[str, Any], name: str, **labels: str) -> float:
    return sum(v for got, v in found.get(name, []) if labels.items() <= got.items())


def test_a_scrape_counts_the_requests_and_reads_the_node(node: NodeProcess) -> None:
    ask = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 8}
    with httpx.Client(base_url=node.url, timeout=120) as client:
        usages = [client.post("/v1/chat/completions", json=ask).json()["usage"]]
        streamed = {**ask, "stream": True, "stream_options": {"include_usage": True}}
        lines = client.post("/v1/chat/completions", json=streamed).text.splitlines()
        last = [json.loads(x[6:]) for x in lines if x.startswith("data: {")][-1]
        usages.append(last["usage"])
        scraped = client.get("/metrics")
    assert scraped.status_code == 200
    found = samples(scraped.text)
    prompt = sum(u["prompt_tokens"] for u in usages)
    assert total(found, "shoal:prompt_tokens_total", model_name=MODEL) == prompt
    generated = sum(u["completion_tokens"] for u in usages)
    assert total(found, "shoal:generation_tokens_total", model_name=MODEL) == generated
    assert total(found, "shoal:request_success_total", model_name=MODEL) == 2
    assert total(found, "shoal:time_to_first_token_seconds_count", model_name=MODEL) == 2
    assert [v for _, v in found["shoal:num_requests_running"]] == [0]  # one instance, idle
    assert total(found, "shoal:instances", model_name=MODEL, state="ready") == 1
    assert total(found, "shoal:nodes_connected") == total(found, "shoal:nodes_known") == 1
    assert total(found, "shoal:is_master") == 1 and total(found, "shoal:log_index_applied") > 0
    assert total(found, "shoal:hub_downloaded_bytes_total") == 0  # packaged weights


def test_the_node_logs_one_json_object_a_line(node: NodeProcess) -> None:
    ask = {"model": MODEL, "messages": QUESTION, "max_tokens": 2}
    assert httpx.post(f"{node.url}/v1/chat/completions", json=ask, timeout=120).status_code == 200
    lines = [line for line in node.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line, the runners' too, is one object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    summaries = [r for r in records if r["logger"] == "shoal.inference.scheduler"]
    assert any("prompt tokens, TTFT" in r["message"] for r in summaries)
    loaded = [r for r in records if r["logger"].startswith("shoal.engines.")]
    assert any(r["message"].startswith("loaded ") for r in loaded)  # the runner's own line


def test_kv_cache_use_follows_a_running_request(node: NodeProcess) -> None:
    def held() -> float:
        found = samples(httpx.get(f"{node.url}/metrics", timeout=10).text)
        return total(found, "shoal:kv_cache_positions", model_name=MODEL)

    def until(check: Any, what: str) -> None:
        for _ in range(100):
            if check():
                return
            time.sleep(0.1)
        raise AssertionError(what)

    story = [{"role": "user", "content": "Write a long story about the sea."}]
    ask = {"model": MODEL, "messages": story, "temperature": 0, "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{node.url}/v1/chat/completions", json=ask, timeout=120) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
        until(lambda: held() > 0, "the runner's caches never showed in /metrics")
        found = samples(httpx.get(f"{node.url}/metrics", timeout=10).text)
        (usage,) = [v for _, v in found["shoal:kv_cache_usage_perc"]]
        assert 0 < usage < 1  # a few hundred positions of the 4096 placement planned
        for _ in lines:
            pass
    until(lambda: held() == 0, "the finished request's caches were not freed")
