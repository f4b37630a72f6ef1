"""Schemathesis against a real `shoal node` serving SmolLM2: a few hundred generated requests,
none may get a server error, then the node still answers a plain chat correctly.

The schema is the app's own (the node serves it at /openapi.json). Generation is derandomized
(seeded), so a run is the same run every time. Two things keep it short: the model id is set to
the served one whenever a string was generated (so requests reach tokenizing and generation, not
a 404), and token limits are folded into 1..MAX_TOKENS in each dialect's field (chat, Responses,
Anthropic and Ollama requests with no limit get one: they would run to EOS or the 8192-token
context). Non-positive limits, wrong types, bad token ids and seeds
stay as generated. Left out: GET /events (an endless stream) and /instance POST/DELETE (they place
and stop model instances).

Where the schema is too loose to guide the fuzzer: `prompt` token ids, `seed` and `max_tokens`
have no bounds (so most generated values are out of range and only exercise validation); error
statuses are undocumented (the app answers 400, the schema lists 422) and streamed answers are
text/event-stream where the schema says application/json, so only server errors and documented
response bodies are checked, not status codes or content types.
"""

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import response_schema_conformance

from shoal.api.app import create_app
from tests.helpers.nodes import NodeProcess, start_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(170)]

MODEL = "smollm2-135m"
MAX_TOKENS = 4
# 100 + 40 valid cases over these; other operations 12 each
GENERATING = "/v1/(chat/)?completions$|/v1/responses$|/v1/messages$|/api/(chat|generate)$"
SEEN: Counter[tuple[str, int]] = Counter()  # (operation, status) of every generated request
CONFIG = SchemathesisConfig.from_dict({"seed": 14, "phases": {"coverage": {"enabled": False}}})
# valid bodies only: most generated bodies are invalid (and stop at validation); these reach
# tokenizing, the scheduler and the sampler
VALID = SchemathesisConfig.from_dict(
    {"seed": 15, "phases": {"coverage": {"enabled": False}}, "generation": {"mode": "positive"}}
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = start_node(tmp_path_factory.mktemp("fuzz"), ["--model", MODEL], threads=2)
    try:
        proc.wait_ready(MODEL, timeout=180)
        yield proc
    finally:
        proc.stop()


# The app's own schema, built here without a service (building the schema calls none); the last
# test checks that the node serves exactly this one.
OPENAPI = create_app(None).openapi()  # type: ignore[arg-type]
schema = (
    schemathesis.openapi.from_dict(OPENAPI, config=CONFIG)
    .exclude(path="/events")
    .exclude(path_regex="^/instance")
)
generating = schema.include(path_regex=GENERATING)
generating_valid = schemathesis.openapi.from_dict(OPENAPI, config=VALID).include(
    path_regex=GENERATING
)
other = schema.exclude(path_regex=GENERATING)
FUZZ: dict[str, Any] = {
    "derandomize": True,
    "deadline": None,
    "phases": [Phase.explicit, Phase.generate],
    "suppress_health_check": list(HealthCheck),
    "database": None,
}


def tame(body: dict[str, Any], path: str) -> None:
    """The served model, and token limits folded into 1..MAX_TOKENS (see the module doc), in
    each dialect's field: a request without one would run to EOS or the context."""
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    where = body
    keys: tuple[str, ...]
    if path.startswith("/api/"):  # Ollama's options.num_predict
        if not isinstance(body.get("options"), dict):
            body["options"] = {}
        where, keys = body["options"], ("num_predict",)
    elif path == "/v1/responses":
        keys = ("max_output_tokens",)
    else:
        keys = ("max_tokens", "max_completion_tokens")
    for key in keys:
        value = where.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            where[key] = value % MAX_TOKENS + 1
    if path != "/v1/completions" and all(where.get(k) is None for k in keys):
        where[keys[0]] = MAX_TOKENS


# How each dialect's stream ends well (its last event), and its in-band server errors.
ENDS = {
    "/v1/messages": {"message_stop", "error"},
    "/v1/responses": {"response.completed", "response.incomplete", "response.failed", "error"},
}


def payloads(text: str) -> list[Any]:
    """The data of every SSE event ([DONE] as the string)."""
    out = []
    for line in text.splitlines():
        payload = line[5:].strip() if line.startswith("data:") else ""
        if payload:
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def server_errors(events: list[Any]) -> list[Any]:
    """In-band errors a 5xx would have been: OpenAI's server_error, Anthropic's api_error, the
    Responses API's internal_error."""
    out = []
    for event in events:
        if not isinstance(event, dict):
            continue
        inner = event.get("error")
        error: dict[str, Any] = inner if isinstance(inner, dict) else event
        if error.get("type") in ("server_error", "api_error") or error.get("code") == (
            "internal_error"
        ):
            out.append(error)
    return out


def check(case: Any, node: NodeProcess) -> None:
    """Send one generated case; no 5xx, documented bodies conform, streams end well."""
    if case.method == "POST" and isinstance(case.body, dict):
        tame(case.body, case.path)
    response = case.call(base_url=node.url, timeout=60)
    SEEN[(f"{case.method} {case.path}", response.status_code)] += 1
    case.validate_response(
        response,
        checks=[schemathesis.checks.not_a_server_error, response_schema_conformance],
    )
    content_type = response.headers.get("content-type", [""])[0]  # header -> list of values
    if content_type.startswith("text/event-stream"):
        events = payloads(response.text)
        ends = ENDS.get(case.path)
        if ends is None:
            assert events and events[-1] == "[DONE]", response.text[-300:]
        else:
            assert events and events[-1].get("type") in ends, response.text[-300:]
        assert not server_errors(events), f"in-band server error: {server_errors(events)}"


@generating.parametrize()
@settings(max_examples=100, **FUZZ)
def test_no_generation_request_gets_a_server_error(case: Any, node: NodeProcess) -> None:
    check(case, node)


@generating_valid.parametrize()
@settings(max_examples=40, **FUZZ)
def test_no_valid_generation_request_gets_a_server_error(case: Any, node: NodeProcess) -> None:
    check(case, node)


@other.parametrize()
@settings(max_examples=12, **FUZZ)
def test_no_other_request_gets_a_server_error(case: Any, node: NodeProcess) -> None:
    check(case, node)


def test_the_node_answers_a_plain_chat_after_the_fuzzing(node: NodeProcess) -> None:
    if SEEN:  # after the fuzzing in this run: it did reach generation on both endpoints
        for path in ("/v1/chat/completions", "/v1/completions"):
            # the schema cannot say all the API refuses (one prompt, token ids in the vocabulary,
            # 4 stops): most generated bodies, even "valid" ones, stop at a 400
            assert SEEN[(f"POST {path}", 200)] >= 2, SEEN
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 16,
    }
    r = httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    assert httpx.get(f"{node.url}/healthz", timeout=10).json()["active_requests"] == 0
    assert httpx.get(f"{node.url}/openapi.json", timeout=10).json() == OPENAPI
