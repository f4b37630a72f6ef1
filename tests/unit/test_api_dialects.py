"""The Ollama, Anthropic and Responses dialects, CORS and /health, in this process over the fake
engine: framing, event order, each dialect's error shape, pulls. The official clients against
the real model are in tests/integration/test_dialects_e2e.py."""

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from shoal.api.app import create_app
from shoal.api.auth import ApiKeys
from shoal.inference.request import Finished, GenerationRequest, TextDelta
from shoal.inference.scheduler import RequestStream
from shoal.models.catalog import Catalog
from shoal.models.pull import Source
from shoal.serving.pulls import PullState, PullStatus
from tests.helpers.fakes import ByteTokenizer, fake_scheduler
from tests.helpers.inprocess import OneModelService, SchedulerHandle

pytestmark = pytest.mark.timeout(30)

MODEL = "smollm2-135m"
ALLOWED = "http://allowed.example"


class FakePulls:
    """serving/pulls.py's Pulls without a Hub: a pull reads starting, half done, then done."""

    def __init__(self, fail: str | None = None) -> None:
        self.started: list[tuple[str, Source | None]] = []
        self.fail = fail
        self.state = PullState("")

    def start(self, model: str, source: Source | None = None) -> PullState:
        self.started.append((model, source))
        self.state = PullState(model)
        end: PullStatus = "failed" if self.fail else "done"
        steps: list[tuple[PullStatus, int, int]] = [("downloading", 50, 100), (end, 100, 100)]
        self.steps = iter(steps)
        return self.state

    def states(self) -> list[PullState]:
        step = next(self.steps, None)
        if step is not None:
            self.state.status, self.state.done, self.state.total = step
            self.state.reason = self.fail
        return [self.state]


@contextlib.asynccontextmanager
async def served(**app_args: Any) -> AsyncIterator[tuple[httpx.AsyncClient, OneModelService]]:
    scheduler = fake_scheduler(context_length=8192)
    card = Catalog().get(MODEL)
    service = OneModelService(SchedulerHandle(card, ByteTokenizer(), scheduler, 8192))
    app = create_app(service, **app_args)
    steps = asyncio.create_task(scheduler.run())
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            yield c, service
    finally:
        steps.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await steps


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with served() as (c, _):
        yield c


HI = [{"role": "user", "content": "hi"}]
OLLAMA_CHAT = {"model": MODEL, "messages": HI, "options": {"temperature": 0, "num_predict": 5}}
ANTHROPIC = {"model": MODEL, "messages": HI, "max_tokens": 5, "temperature": 0}
RESPONSES = {"model": MODEL, "input": "hi", "max_output_tokens": 5, "temperature": 0}


async def test_ollama_chat_streams_ndjson_ending_with_done(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/chat", json=OLLAMA_CHAT)  # Ollama streams by default
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert r.text.endswith("\n") and all(lines)
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    last = lines[-1]
    assert last["done_reason"] == "length" and last["eval_count"] == 5
    assert last["prompt_eval_count"] > 0 and last["total_duration"] > 0
    whole = await client.post("/api/chat", json=OLLAMA_CHAT | {"stream": False})
    text = "".join(line["message"]["content"] for line in lines)
    assert whole.json()["message"] == {"role": "assistant", "content": text}


async def test_ollama_generate_and_an_empty_prompt_loads(client: httpx.AsyncClient) -> None:
    body = {"model": f"{MODEL}:latest", "prompt": "hi", "stream": False, "raw": True}
    r = await client.post("/api/generate", json=body | {"options": {"num_predict": 3}})
    assert r.status_code == 200 and r.json()["done"] and r.json()["eval_count"] == 3
    assert "response" in r.json()
    loaded = await client.post("/api/generate", json={"model": MODEL})
    assert loaded.json()["done_reason"] == "load" and loaded.json()["response"] == ""


async def test_ollama_lists_shows_and_versions(client: httpx.AsyncClient) -> None:
    tags = (await client.get("/api/tags")).json()["models"]
    assert [m["name"] for m in tags] == [MODEL]
    assert (await client.get("/api/ps")).json()["models"][0]["model"] == MODEL
    shown = (await client.post("/api/show", json={"model": MODEL})).json()
    assert shown["model_info"]["llama.context_length"] == 8192
    assert (await client.get("/api/version")).json()["version"]


async def test_ollama_pull_fetches_then_reports_until_done() -> None:
    pulls = FakePulls()
    async with served(pull_files=pulls) as (c, _):
        r = await c.post("/api/pull", json={"model": f"{MODEL}:latest"})
        lines = [json.loads(line) for line in r.text.splitlines()]
    assert [(m, s.repo if s else None) for m, s in pulls.started] == [
        (MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct")
    ]
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    assert any(x.get("completed") == 50 and x.get("total") == 100 for x in lines)


async def test_ollama_pull_failure_is_an_error() -> None:
    async with served(pull_files=FakePulls(fail="the Hub said 404")) as (c, _):
        streamed = await c.post("/api/pull", json={"model": MODEL})
        assert json.loads(streamed.text.splitlines()[-1])["error"].endswith("the Hub said 404")
        whole = await c.post("/api/pull", json={"model": MODEL, "stream": False})
        assert whole.status_code == 503 and "404" in whole.json()["error"]
    async with served() as (c, _):  # no Hub cache: nothing to pull into
        r = await c.post("/api/pull", json={"model": MODEL})
        assert r.status_code == 503 and list(r.json()) == ["error"]


OLLAMA_BAD = [
    ("/api/chat", b'{"model": ', 400, "JSON"),
    ("/api/chat", {**OLLAMA_CHAT, "options": {"mirostat": 2}}, 400, "options.mirostat"),
    ("/api/chat", {**OLLAMA_CHAT, "options": {"temperature": "hot"}}, 400, "temperature"),
    ("/api/chat", {**OLLAMA_CHAT, "format": "yaml"}, 400, "format"),
    ("/api/chat", {**OLLAMA_CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/api/chat", {**OLLAMA_CHAT, "surprise": 1}, 400, "surprise"),
    ("/api/chat", {**OLLAMA_CHAT, "model": "no-such-model"}, 404, "no-such-model"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/api/show", {}, 400, "model"),
    ("/api/nothing", {}, 404, "Not Found"),
]


@pytest.mark.parametrize(("path", "body", "status", "words"), OLLAMA_BAD)
async def test_ollama_bad_input_is_ollamas_error(
    client: httpx.AsyncClient, path: str, body: Any, status: int, words: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = await client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and words in r.json()["error"]
    assert (await client.post("/api/chat", json=OLLAMA_CHAT | {"stream": False})).is_success


def sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each named event."""
    frames = [f for f in text.split("\n\n") if f.strip()]
    parsed = []
    for frame in frames:
        name, data = frame.split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: ")
        parsed.append((name[7:], json.loads(data[6:])))
    return parsed


async def test_anthropic_stream_events_in_order(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/messages", json=ANTHROPIC | {"stream": True})
    events = sse(r.text)
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 5
    whole = (await client.post("/v1/messages", json=ANTHROPIC)).json()
    assert whole["type"] == "message" and whole["stop_reason"] == "max_tokens"
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert whole["content"] == [{"type": "text", "text": text}]


ANTHROPIC_BAD = [
    ("missing max_tokens", {"model": MODEL, "messages": HI}, {}, "max_tokens"),
    ("temperature over 1", {**ANTHROPIC, "temperature": 1.5}, {}, "temperature"),
    (
        "an image block",
        {**ANTHROPIC, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
        {},
        "image",
    ),
    (
        "a server tool",
        {**ANTHROPIC, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {},
        "server tools",
    ),
    (
        "tool_use in a user turn",
        {**ANTHROPIC, "messages": [{"role": "user", "content": [{"type": "tool_use"}]}]},
        {},
        "tool_use",
    ),
    ("a nameless tool choice", {**ANTHROPIC, "tool_choice": {"type": "tool"}}, {}, "name"),
    ("unknown field", {**ANTHROPIC, "frobnicate": True}, {}, "frobnicate"),
    ("bad version", ANTHROPIC, {"anthropic-version": "1999-01-01"}, "anthropic-version"),
]


@pytest.mark.parametrize(("name", "body", "headers", "words"), ANTHROPIC_BAD)
async def test_anthropic_bad_input_is_anthropics_error(
    client: httpx.AsyncClient, name: str, body: Any, headers: dict[str, str], words: str
) -> None:
    r = await client.post("/v1/messages", json=body, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert words in r.json()["error"]["message"]
    assert (await client.post("/v1/messages", json=ANTHROPIC)).is_success


async def test_responses_stream_events_in_order(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/responses", json=RESPONSES | {"stream": True})
    events = sse(r.text)
    names = [name for name, _ in events]
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # max_output_tokens reached
    ]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    final = events[-1][1]["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["usage"]["output_tokens"] == 5


RESPONSES_BAD = [
    ("a hosted tool", {**RESPONSES, "tools": [{"type": "web_search"}]}, "web_search"),
    ("a reasoning item", {**RESPONSES, "input": [{"type": "reasoning"}]}, "reasoning"),
    ("previous response", {**RESPONSES, "previous_response_id": "resp_1"}, "previous_response"),
    ("schemaless", {**RESPONSES, "text": {"format": {"type": "json_schema"}}}, "schema"),
    (
        "an image part",
        {**RESPONSES, "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
        "input_image",
    ),
    ("missing input", {"model": MODEL}, "input"),
]


@pytest.mark.parametrize(("name", "body", "words"), RESPONSES_BAD)
async def test_responses_bad_input_is_openais_error(
    client: httpx.AsyncClient, name: str, body: Any, words: str
) -> None:
    r = await client.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"]


@pytest.mark.parametrize("path", ["/v1/messages", "/api/chat", "/v1/responses"])
async def test_cors_preflight_answers_allowed_origins_only(path: str) -> None:
    async with served(cors_origins=[ALLOWED], keys=ApiKeys(user=frozenset({"k"}))) as (c, _):
        ask = {"access-control-request-method": "POST"}
        ask["access-control-request-headers"] = "content-type, x-api-key, anthropic-version"
        allowed = await c.options(path, headers=ask | {"origin": ALLOWED})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ALLOWED
        assert "anthropic-version" in allowed.headers["access-control-allow-headers"]
        denied = await c.options(path, headers=ask | {"origin": "http://evil.example"})
        assert "access-control-allow-origin" not in denied.headers
        # the page may read the dialect's 401
        r = await c.post(path, json={}, headers={"origin": ALLOWED})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ALLOWED


async def test_health_is_open_beside_healthz() -> None:
    async with served(keys=ApiKeys(user=frozenset({"k"}))) as (c, _):
        for path in ("/health", "/healthz"):
            r = await c.get(path)
            assert r.status_code == 200 and r.json()["status"] == "ok"
        assert (await c.get("/api/tags")).status_code == 401
        shown = await c.post("/api/show", json={"model": MODEL}, headers={"x-api-key": "k"})
        assert shown.status_code == 200  # a user key reads by POST, as Ollama's clients do


class Recording(SchedulerHandle):
    """Remembers each request it admits."""

    seen: list[GenerationRequest]

    def generate(self, req: GenerationRequest) -> RequestStream:
        self.seen.append(req)
        return super().generate(req)


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (
            "/api/chat",
            {**OLLAMA_CHAT, "options": {"repeat_penalty": 1.3, "min_p": 0.1, "seed": -1}},
            {"repetition_penalty": 1.3, "min_p": 0.1, "seed": None, "temperature": 0.8},
        ),
        (
            "/api/chat",
            {**OLLAMA_CHAT, "options": {"num_predict": -1, "stop": ["x"], "top_k": 5}},
            {"max_tokens": None, "stop": ("x",), "top_k": 5},
        ),
        (
            "/v1/messages",
            {**ANTHROPIC, "stop_sequences": ["a"], "top_p": 0.5},
            {"max_tokens": 5, "stop": ("a",), "top_p": 0.5, "temperature": 0.0},
        ),
        (
            "/v1/responses",
            {**RESPONSES, "seed": 7, "temperature": 0.5},
            {"max_tokens": 5, "seed": 7, "temperature": 0.5},
        ),
    ],
)
async def test_dialect_fields_reach_sampling(
    path: str, body: dict[str, Any], expected: dict[str, Any]
) -> None:
    scheduler = fake_scheduler(context_length=8192)
    handle = Recording(Catalog().get(MODEL), ByteTokenizer(), scheduler, 8192)
    handle.seen = []
    app = create_app(OneModelService(handle))
    steps = asyncio.create_task(scheduler.run())
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            r = await c.post(path, json=body | {"stream": False})
            assert r.status_code == 200, r.text
    finally:
        steps.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await steps
    sampling = handle.seen[0].sampling
    assert {k: getattr(sampling, k) for k in expected} == expected


CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}}


class Script:
    """A stream that writes a fixed answer, five characters an event."""

    def __init__(self, text: str, prompt_tokens: int) -> None:
        chunks = [text[i : i + 5] for i in range(0, len(text), 5)]
        self.events: list[Any] = [TextDelta(c, ()) for c in chunks]
        self.events.append(Finished("stop", prompt_tokens, len(chunks), 0.0, 0.0))

    def __aiter__(self) -> "Script":
        return self

    async def __anext__(self) -> Any:
        if not self.events:
            raise StopAsyncIteration
        return self.events.pop(0)

    async def aclose(self) -> None:
        self.events.clear()


class Scripted(SchedulerHandle):
    """Answers every request with CALL_TEXT; remembers the prompts."""

    prompts: list[str]

    def generate(self, req: GenerationRequest) -> Any:
        self.prompts.append(ByteTokenizer().decode(req.prompt_tokens))
        return Script(CALL_TEXT, len(req.prompt_tokens))


@contextlib.asynccontextmanager
async def scripted() -> AsyncIterator[tuple[httpx.AsyncClient, Scripted]]:
    handle = Scripted(Catalog().get(MODEL), ByteTokenizer(), fake_scheduler(), 8192)
    handle.prompts = []
    transport = httpx.ASGITransport(app=create_app(OneModelService(handle)))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        yield c, handle


async def test_ollama_tool_calls_whole_streamed_and_in_history() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    body = {"model": MODEL, "messages": HI, "tools": tools}
    async with scripted() as (c, handle):
        whole = (await c.post("/api/chat", json=body | {"stream": False})).json()
        lines = [json.loads(x) for x in (await c.post("/api/chat", json=body)).text.splitlines()]
        call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        history = [*HI, {"role": "assistant", "content": "", "tool_calls": [call]}]
        history.append({"role": "tool", "content": "Sunny, 25 C", "tool_name": "get_weather"})
        assert (await c.post("/api/chat", json=body | {"messages": history})).is_success
    assert whole["message"]["content"] == "" and whole["done_reason"] == "stop"
    assert [c["function"]["arguments"] for c in whole["message"]["tool_calls"]] == [
        {"city": "Paris"}
    ]
    streamed = [c for x in lines for c in x.get("message", {}).get("tool_calls") or ()]
    assert [c["function"]["name"] for c in streamed] == ["get_weather"]
    assert "<tool_call>" not in "".join(x["message"]["content"] for x in lines)
    assert "get_weather" in handle.prompts[0]  # the tools are laid out in the prompt
    assert "<tool_response>\nSunny, 25 C" in handle.prompts[-1] and '"Paris"' in handle.prompts[-1]


async def test_anthropic_and_responses_read_calls_out_of_the_text() -> None:
    anthropic_tools = [{"name": "get_weather", "input_schema": WEATHER}]
    openai_tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    async with scripted() as (c, _):
        message = (await c.post("/v1/messages", json=ANTHROPIC | {"tools": anthropic_tools})).json()
        stream = await c.post(
            "/v1/messages", json=ANTHROPIC | {"tools": anthropic_tools, "stream": True}
        )
        response = (await c.post("/v1/responses", json=RESPONSES | {"tools": openai_tools})).json()
    assert message["stop_reason"] == "tool_use"
    assert [(b["type"], b["input"]) for b in message["content"]] == [
        ("tool_use", {"city": "Paris"})
    ]
    names = [name for name, _ in sse(stream.text)]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert sse(stream.text)[2][1]["delta"] == {
        "type": "input_json_delta",
        "partial_json": '{"city": "Paris"}',
    }
    assert [(o["type"], o["arguments"]) for o in response["output"]] == [
        ("function_call", '{"city": "Paris"}')
    ]


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        (
            "/v1/messages",
            lambda j: j["type"] == "error" and j["error"]["type"] == "request_too_large",
        ),
        ("/api/chat", lambda j: list(j) == ["error"] and "limit" in j["error"]),
        ("/v1/responses", lambda j: j["error"]["type"] == "invalid_request_error"),
    ],
)
async def test_an_oversized_body_is_refused_in_the_dialects_shape(path: str, shape: Any) -> None:
    async with served(max_body_bytes=1000) as (c, _):
        r = await c.post(path, json={"model": MODEL, "pad": "x" * 2000})
        assert r.status_code == 413 and shape(r.json()), r.text


async def test_a_missing_key_is_refused_in_the_dialects_shape() -> None:
    async with served(keys=ApiKeys(user=frozenset({"k"}))) as (c, _):
        anthropic = (await c.post("/v1/messages", json=ANTHROPIC)).json()
        ollama = (await c.post("/api/chat", json=OLLAMA_CHAT)).json()
        openai = (await c.post("/v1/responses", json=RESPONSES)).json()
        answered = await c.post("/v1/messages", json=ANTHROPIC, headers={"x-api-key": "k"})
    assert anthropic["type"] == "error" and anthropic["error"]["type"] == "authentication_error"
    assert list(ollama) == ["error"] and "API key" in ollama["error"]
    assert openai["error"]["code"] == "invalid_api_key"
    assert answered.status_code == 200


# --- usage: prompt tokens the prefix cache held ---------------------------------------------------


class Cached(SchedulerHandle):
    """Answers "Fine." as if the prefix cache held the first 8 tokens of every prompt."""

    def generate(self, req: GenerationRequest) -> Any:
        script = Script("Fine.", len(req.prompt_tokens))
        script.events[-1] = dataclasses.replace(script.events[-1], cached_tokens=8)
        return script


async def test_every_dialect_reports_the_prompt_tokens_the_cache_held() -> None:
    handle = Cached(Catalog().get(MODEL), ByteTokenizer(), fake_scheduler(), 8192)
    transport = httpx.ASGITransport(app=create_app(OneModelService(handle)))
    chat = {"model": MODEL, "messages": HI, "max_tokens": 5}
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        whole = (await c.post("/v1/chat/completions", json=chat)).json()["usage"]
        assert whole["prompt_tokens_details"] == {"cached_tokens": 8}
        assert whole["prompt_tokens"] > 8  # OpenAI counts cached tokens in prompt_tokens
        streamed = chat | {"stream": True, "stream_options": {"include_usage": True}}
        text = (await c.post("/v1/chat/completions", json=streamed)).text
        chunks = [json.loads(f[6:]) for f in text.split("\n\n") if f.startswith("data: {")]
        assert chunks[-1]["usage"] == whole
        done = (await c.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})).json()
        assert done["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}
        # Anthropic counts cache reads apart from input_tokens
        usage = (await c.post("/v1/messages", json=ANTHROPIC)).json()["usage"]
        assert usage["cache_read_input_tokens"] == 8 and usage["cache_creation_input_tokens"] == 0
        assert usage["input_tokens"] + 8 == whole["prompt_tokens"]
        events = sse((await c.post("/v1/messages", json=ANTHROPIC | {"stream": True})).text)
        assert dict(events)["message_delta"]["usage"] == usage
        usage = (await c.post("/v1/responses", json=RESPONSES)).json()["usage"]
        assert usage["input_tokens_details"] == {"cached_tokens": 8}
        # Ollama counts the whole prompt in prompt_eval_count, the cached part apart
        last = (await c.post("/api/chat", json=OLLAMA_CHAT | {"stream": False})).json()
        assert last["prompt_eval_cached_count"] == 8
        assert last["prompt_eval_count"] == whole["prompt_tokens"]
