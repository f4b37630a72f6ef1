"""The official `ollama`, `anthropic` and `openai` (Responses API) clients, and litellm, against a
real `shoal node` serving SmolLM2: chat and streaming in each dialect, NDJSON and event framing,
CORS preflights, /health, a character cut by max_tokens, each dialect's errors."""

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from shoal.models.gguf import GGUFSource
from tests.helpers.nodes import NodeProcess, start_node
from tests.helpers.smollm2 import SMOLLM

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
MODEL = "smollm2-135m"
ASK = "What is the capital of France?"
QUESTION: Any = [{"role": "user", "content": ASK}]
GREEDY = {"temperature": 0, "num_predict": 24}  # Ollama's options
ALLOWED = "http://allowed.example"
CUT = "中文：我爱你。日文："  # SmolLM2's greedy answer starts with 你, two tokens


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    args = ["--model", MODEL, "--cors-origin", ALLOWED]
    proc = start_node(tmp_path_factory.mktemp("dialects"), args, threads=2)
    try:
        proc.wait_ready(MODEL, timeout=180)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def ollama_client(node: NodeProcess) -> ollama.Client:
    return ollama.Client(host=node.url, timeout=120)


@pytest.fixture
def claude(node: NodeProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=node.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=120)


# --- Ollama ----------------------------------------------------------------------------------


def test_ollama_chat_and_stream_say_paris(ollama_client: ollama.Client) -> None:
    reply = ollama_client.chat(model=MODEL, messages=QUESTION, options=GREEDY, stream=False)
    assert "Paris" in (reply.message.content or "")
    assert reply.done and reply.done_reason in ("stop", "length") and reply.eval_count
    parts = list(ollama_client.chat(model=MODEL, messages=QUESTION, options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content or "" for p in parts) == reply.message.content


def test_ollama_generate_streams_ndjson(node: NodeProcess) -> None:
    body = {"model": MODEL, "prompt": ASK, "options": GREEDY}  # streamed: Ollama's default
    with httpx.stream("POST", f"{node.url}/api/generate", json=body, timeout=120) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        raw = r.read().decode()
    assert raw.endswith("\n") and "\n\n" not in raw  # one JSON object a line, nothing else
    lines = [json.loads(line) for line in raw.splitlines()]
    assert len(lines) > 2 and lines[-1]["done"] and not any(x["done"] for x in lines[:-1])
    assert "Paris" in "".join(x["response"] for x in lines)
    assert lines[-1]["prompt_eval_count"] > 5 and lines[-1]["eval_count"] == len(lines) - 1


def test_ollama_lists_shows_and_pulls_a_running_model(ollama_client: ollama.Client) -> None:
    assert MODEL in [m.model for m in ollama_client.list().models]
    assert MODEL in [m.model for m in ollama_client.ps().models]
    info = ollama_client.show(f"{MODEL}:latest").modelinfo
    assert info is not None and info["llama.block_count"] == 30
    assert ollama_client.pull(MODEL).status == "success"  # it runs already: nothing to fetch
    progress = list(ollama_client.pull(MODEL, stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"


@pytest.mark.parametrize(
    ("call", "status", "words"),
    [
        ({"options": {"mirostat": 2}}, 400, "options.mirostat"),
        ({"options": {"repeat_last_n": 32, "repeat_penalty": 1.2}}, 400, "repeat_last_n"),
        ({"think": True}, 400, "think"),
        ({"model": "no-such-model"}, 404, "no-such-model"),
    ],
)  # fmt: skip
def test_ollama_bad_input_is_a_response_error(
    ollama_client: ollama.Client, call: dict[str, Any], status: int, words: str
) -> None:
    ask: dict[str, Any] = {"model": MODEL, "messages": QUESTION} | call
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.chat(**ask, stream=False)
    assert caught.value.status_code == status and words in caught.value.error
    assert "Paris" in (
        ollama_client.chat(model=MODEL, messages=QUESTION, options=GREEDY).message.content or ""
    )


def test_ollama_repeat_penalty_reaches_the_sampler(ollama_client: ollama.Client) -> None:
    plain = ollama_client.generate(
        model=MODEL, prompt="Count: 1 1 1 1 1 1", raw=True, options=GREEDY
    )
    options = GREEDY | {"repeat_penalty": 3.0}
    penalized = ollama_client.generate(
        model=MODEL, prompt="Count: 1 1 1 1 1 1", raw=True, options=options
    )
    assert penalized.response != plain.response


# --- Anthropic -------------------------------------------------------------------------------

# newer `anthropic` releases no longer take temperature as an argument; the API still does
ZERO = {"temperature": 0}


def test_anthropic_message_says_paris(claude: anthropic.Anthropic) -> None:
    reply = claude.messages.create(
        model=MODEL, max_tokens=24, messages=QUESTION, system="Be brief.", extra_body=ZERO
    )
    assert reply.type == "message" and reply.role == "assistant"
    assert "Paris" in reply.content[0].text  # type: ignore[union-attr]
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.usage.input_tokens > 5


def test_anthropic_stream_says_paris_in_event_order(
    claude: anthropic.Anthropic, node: NodeProcess
) -> None:
    with claude.messages.stream(
        model=MODEL, max_tokens=24, messages=QUESTION, extra_body=ZERO
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "Paris" in text and final.content[0].text == text  # type: ignore[union-attr]
    assert final.usage.output_tokens > 0
    body = {"model": MODEL, "max_tokens": 24, "messages": QUESTION, "stream": True} | ZERO
    raw = httpx.post(f"{node.url}/v1/messages", json=body, timeout=120).text
    names = [line[7:] for line in raw.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}


def test_anthropic_stop_sequence_is_reported(claude: anthropic.Anthropic) -> None:
    reply = claude.messages.create(
        model=MODEL, max_tokens=24, messages=QUESTION, stop_sequences=["Paris"], extra_body=ZERO
    )
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "Paris"
    assert "Paris" not in reply.content[0].text  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("call", "words"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
        ({"extra_body": {"temperature": 1.5}}, "temperature"),
        ({"extra_headers": {"anthropic-version": "1999-01-01"}}, "anthropic-version"),
    ],
)
def test_anthropic_bad_input_is_an_anthropic_error(
    claude: anthropic.Anthropic, call: dict[str, Any], words: str
) -> None:
    ask: dict[str, Any] = {"model": MODEL, "max_tokens": 8, "messages": QUESTION} | call
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(**ask)
    body: Any = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert words in body["error"]["message"]
    assert claude.messages.create(model=MODEL, max_tokens=4, messages=QUESTION).content


# --- the Responses API -----------------------------------------------------------------------


def test_responses_create_says_paris(client: openai.OpenAI) -> None:
    reply = client.responses.create(
        model=MODEL, input=ASK, instructions="Be brief.", temperature=0, max_output_tokens=24
    )
    assert reply.object == "response" and reply.status in ("completed", "incomplete")
    assert "Paris" in reply.output_text
    assert reply.usage is not None and reply.usage.input_tokens > 5


def test_responses_stream_says_paris(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model=MODEL, input=QUESTION, temperature=0, max_output_tokens=24, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert "Paris" in text and events[-1].response.output_text == text  # type: ignore[union-attr]
    with client.responses.stream(model=MODEL, input=ASK, temperature=0, max_output_tokens=24) as s:
        assert s.get_final_response().output_text == text  # the SDK's own accumulator agrees


def test_responses_bad_input_is_an_openai_error(client: openai.OpenAI) -> None:
    tool: Any = {"type": "web_search"}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input=ASK, tools=[tool])
    assert caught.value.param == "tools.0.type" and "web_search" in caught.value.message
    assert client.responses.create(model=MODEL, input=ASK, max_output_tokens=4).output_text


# --- litellm, CORS, /health, a cut character -------------------------------------------------


def test_litellm_speaks_ollama_and_anthropic(node: NodeProcess) -> None:
    litellm = pytest.importorskip("litellm")
    for model in (f"ollama_chat/{MODEL}", f"anthropic/{MODEL}"):
        reply = litellm.completion(
            model=model,
            messages=QUESTION,
            api_base=node.url,
            api_key="unused",
            temperature=0,
            max_tokens=24,
        )
        assert "Paris" in reply.choices[0].message.content, model


@pytest.mark.parametrize("path", ["/v1/messages", "/api/chat", "/v1/responses"])
def test_cors_preflight_of_allowed_origin_only(node: NodeProcess, path: str) -> None:
    ask = {"access-control-request-method": "POST"}
    ask["access-control-request-headers"] = "content-type, x-api-key, anthropic-version"
    allowed = httpx.options(f"{node.url}{path}", headers=ask | {"origin": ALLOWED})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED
    assert "anthropic-version" in allowed.headers["access-control-allow-headers"]
    denied = httpx.options(f"{node.url}{path}", headers=ask | {"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in denied.headers


def test_health_answers(node: NodeProcess) -> None:
    for path in ("/health", "/healthz"):
        r = httpx.get(f"{node.url}{path}")
        assert r.status_code == 200 and r.json()["status"] == "ok"


def test_a_character_cut_by_max_tokens_is_not_a_replacement(
    client: openai.OpenAI, ollama_client: ollama.Client, claude: anthropic.Anthropic
) -> None:
    tokenizer = GGUFSource(SMOLLM).tokenizer()
    first = tokenizer.encode("你")[:1]
    assert tokenizer.decode(first) == "\ufffd"  # half of 你 alone decodes to U+FFFD
    whole = client.completions.create(model=MODEL, prompt=CUT, max_tokens=2, temperature=0)
    assert whole.choices[0].text == "你"
    cut = client.completions.create(model=MODEL, prompt=CUT, max_tokens=1, temperature=0)
    assert cut.choices[0].text == "" and cut.choices[0].finish_reason == "length"
    streamed = client.completions.create(
        model=MODEL, prompt=CUT, max_tokens=1, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ""
    raw = ollama_client.generate(
        model=MODEL, prompt=CUT, raw=True, options={"temperature": 0, "num_predict": 1}
    )
    assert raw.response == "" and raw.done_reason == "length"


# --- tools -----------------------------------------------------------------------------------

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
WEATHER_ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_anthropic_tool_use_forced_whole_and_streamed(claude: anthropic.Anthropic) -> None:
    tools: Any = [
        {"name": "get_weather", "description": "A city's weather", "input_schema": WEATHER_SCHEMA}
    ]
    ask: Any = {"model": MODEL, "max_tokens": 64, "messages": WEATHER_ASK, "tools": tools}
    ask |= {"extra_body": ZERO}
    choice: Any = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    reply = claude.messages.create(**ask, tool_choice=choice)
    uses = [b for b in reply.content if b.type == "tool_use"]
    assert reply.stop_reason == "tool_use" and len(uses) == 1
    assert uses[0].name == "get_weather" and isinstance(uses[0].input["city"], str)
    with claude.messages.stream(**ask, tool_choice={"type": "any"}) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and "input_json" in kinds
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert streamed and streamed[0].input == uses[0].input
    # the call and its result go back into the prompt: the answer reads the result
    history: Any = [
        *WEATHER_ASK,
        {
            "role": "assistant",
            "content": [uses[0].model_dump(include={"type", "id", "name", "input"})],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": uses[0].id, "content": "Sunny, 25 C"}
            ],
        },
    ]
    after = claude.messages.create(**(ask | {"messages": history}))
    assert after.stop_reason != "tool_use" and "25" in after.content[0].text


def test_responses_function_call_forced_whole_and_streamed(client: openai.OpenAI) -> None:
    tools: Any = [{"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA}]
    ask: Any = {"model": MODEL, "input": WEATHER_ASK, "tools": tools, "temperature": 0}
    ask |= {"max_output_tokens": 64, "parallel_tool_calls": False}
    reply = client.responses.create(**ask, tool_choice="required")
    calls = [o for o in reply.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    choice: Any = {"type": "function", "name": "get_weather"}
    with client.responses.stream(**ask, tool_choice=choice) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    streamed = [o for o in final.output if o.type == "function_call"]
    assert [c.arguments for c in streamed] == [calls[0].arguments]
    history: Any = [
        *WEATHER_ASK,
        calls[0].model_dump(include={"type", "call_id", "name", "arguments"}),
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 25 C"},
    ]
    after = client.responses.create(**(ask | {"input": history}))
    assert "25" in after.output_text


# --- structured output -----------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
PERSON_ASK: Any = [{"role": "user", "content": "Describe a person as JSON."}]


def _person(text: str) -> None:
    person = json.loads(text)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


def test_ollama_format_json_and_schema(ollama_client: ollama.Client) -> None:
    options = {"temperature": 0, "num_predict": 96}
    anything = ollama_client.chat(model=MODEL, messages=PERSON_ASK, format="json", options=options)
    assert isinstance(json.loads(anything.message.content or ""), dict)
    shaped = ollama_client.chat(model=MODEL, messages=PERSON_ASK, format=PERSON, options=options)
    _person(shaped.message.content or "")
    generated = ollama_client.generate(
        model=MODEL, prompt="A person:", raw=True, format=PERSON, options=options
    )
    _person(generated.response or "")


def test_responses_text_format_json_schema(client: openai.OpenAI) -> None:
    fmt: Any = {"type": "json_schema", "name": "person", "schema": PERSON}
    reply = client.responses.create(
        model=MODEL, input=PERSON_ASK, text={"format": fmt}, temperature=0, max_output_tokens=96
    )
    _person(reply.output_text)


def test_anthropic_output_config_json_schema(claude: anthropic.Anthropic) -> None:
    config: Any = {"format": {"type": "json_schema", "schema": PERSON}}
    reply = claude.messages.create(
        model=MODEL, max_tokens=96, messages=PERSON_ASK, output_config=config, extra_body=ZERO
    )
    _person(reply.content[0].text)  # type: ignore[union-attr]
