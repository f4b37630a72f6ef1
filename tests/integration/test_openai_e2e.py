"""The official openai client against a real `shoal node` serving SmolLM2 (the real model)."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.helpers.nodes import NodeProcess, start_node

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
QUESTION: Any = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = start_node(tmp_path_factory.mktemp("e2e"), ["--model", MODEL], threads=2)
    try:
        proc.wait_ready(MODEL, timeout=180)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(node: NodeProcess) -> OpenAI:
    return OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_non_streamed_answer_is_paris(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=24,
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None and reply.usage.prompt_tokens > 5
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_answer_is_paris_with_usage(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens >= 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")


def test_streamed_equals_non_streamed_at_temperature_zero(client: OpenAI) -> None:
    ask = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 16}
    whole = client.chat.completions.create(**ask).choices[0].message.content
    parts = client.chat.completions.create(**ask, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == whole


def test_completions_endpoint(client: OpenAI) -> None:
    reply = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert reply.object == "text_completion"
    assert reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens <= 5


def test_models_lists_every_card_and_marks_the_runnable_one(node: NodeProcess) -> None:
    data = httpx.get(f"{node.url}/v1/models").json()
    assert data["object"] == "list"
    by_id = {m["id"]: m for m in data["data"]}
    assert len(by_id) == 23
    assert by_id[MODEL]["status"] == "ready" and by_id[MODEL]["runnable"] is True
    assert by_id["deepseek-v3.1-4bit"]["runnable"] is False
    assert by_id["deepseek-v3.1-4bit"]["reason"]


def test_cli_chat_streams_from_the_node(node: NodeProcess) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "chat",
            "What is the capital of France?",
            "--api",
            node.url,
            "--temperature",
            "0",
            "--max-tokens",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_cli_against_a_stopped_node_fails_with_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "models", "--api", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("shoal: cannot reach a shoal node at http://127.0.0.1:9")
    assert len(out.stderr.strip().splitlines()) == 1


GOOD = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 4}
BAD_INPUTS = [
    # (name, raw body or JSON, status, words the message must contain)
    ("malformed json", b'{"model": "smollm2-135m", "messages": [', 400, "JSON"),
    ("not an object", b"[1, 2, 3]", 400, ""),
    ("wrong type", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("missing messages", {"model": MODEL}, 400, "messages"),
    ("empty messages", {**GOOD, "messages": []}, 400, "messages"),
    ("bad role", {**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("negative max_tokens", {**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ("n past the batch", {**GOOD, "n": 100}, 400, "n must be"),
    ("presence_penalty 5", {**GOOD, "presence_penalty": 5.0}, 400, "presence_penalty"),
    ("audio", {**GOOD, "audio": {"voice": "alloy"}}, 400, "audio is not supported"),
    ("unknown model", {**GOOD, "model": "no-such-model"}, 404, "no-such-model"),
    ("model not runnable here", {**GOOD, "model": "deepseek-v3.1-4bit"}, 503, "deepseek"),
    (
        "prompt over context",
        {**GOOD, "messages": [{"role": "user", "content": "Paris " * 9000}]},
        400,
        "8192",
    ),
    ("output over context", {**GOOD, "max_tokens": 9000}, 400, "8192"),
    (
        "body over limit",
        {**GOOD, "messages": [{"role": "user", "content": "x" * 5_000_000}]},
        413,
        "limit",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "words"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_gets_an_openai_error_and_the_node_serves_on(
    node: NodeProcess, body: object, status: int, words: str
) -> None:
    url = f"{node.url}/v1/chat/completions"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words.lower() in error["message"].lower()
    good = httpx.post(url, json=GOOD, timeout=60)
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"]


def test_unknown_route_is_an_openai_404(node: NodeProcess) -> None:
    r = httpx.get(f"{node.url}/v1/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_client_disconnect_mid_stream_stops_generation(node: NodeProcess) -> None:
    import time

    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 4000,
        "temperature": 0.8,
        "seed": 1,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
    }
    with httpx.stream("POST", f"{node.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.monotonic() + 15
    while (
        httpx.get(f"{node.url}/healthz").json()["active_requests"] and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert httpx.get(f"{node.url}/healthz").json()["active_requests"] == 0
    assert "cancelled after" in node.log()
