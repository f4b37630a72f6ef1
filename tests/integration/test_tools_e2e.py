"""Tools and structured output against a real `shoal node` serving SmolLM2, with the official
openai client and langchain-openai."""

import json
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI
from pydantic import BaseModel

from tests.helpers.nodes import NodeProcess, start_node

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = start_node(tmp_path_factory.mktemp("tools"), ["--model", MODEL], threads=2)
    try:
        proc.wait_ready(MODEL, timeout=180)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(node: NodeProcess) -> OpenAI:
    return OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize(
    "question",
    [
        'What is the capital of France? Reply as {"capital": "..."}.',
        'Give a name and an age for a fictional person, as {"name": "...", "age": 0}.',
    ],
)
def test_json_object_answers_parse(client: OpenAI, question: str) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=200,
    )
    content = reply.choices[0].message.content or ""
    assert reply.choices[0].finish_reason == "stop", content
    assert isinstance(json.loads(content), dict)


def test_required_tool_choice_gets_a_call_from_the_real_model(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=100,
    )
    calls = reply.choices[0].message.tool_calls or []
    assert calls and reply.choices[0].finish_reason == "tool_calls"
    for call in calls:
        assert call.type == "function"
        assert call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_langchain_bind_tools_gets_tool_calls(node: NodeProcess) -> None:
    from langchain_openai import ChatOpenAI

    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(
        model=MODEL, base_url=f"{node.url}/v1", api_key="unused", temperature=0, max_tokens=100
    )
    reply = llm.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False).invoke(
        "What is the weather in Paris?"
    )
    assert [c["name"] for c in reply.tool_calls] == ["get_weather"]
    assert isinstance(reply.tool_calls[0]["args"]["city"], str)


def test_langchain_structured_output_by_function_calling(node: NodeProcess) -> None:
    from langchain_openai import ChatOpenAI

    class City(BaseModel):
        """A city and its country."""

        name: str
        country: str

    llm = ChatOpenAI(
        model=MODEL, base_url=f"{node.url}/v1", api_key="unused", temperature=0, max_tokens=100
    )
    city = llm.with_structured_output(City, method="function_calling").invoke(
        "Which city is the capital of France?"
    )
    assert isinstance(city, City) and city.name
