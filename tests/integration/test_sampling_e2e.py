"""Sampling against a real `shoal node` serving SmolLM2, with the official openai client:
logprobs checked against the engine run here, n choices, penalties, logit_bias, refusals."""

import re
from collections.abc import Iterator
from functools import cache
from typing import Any

import httpx
import numpy as np
import pytest
from openai import BadRequestError, OpenAI

from shoal.engines.base import StepInput
from shoal.engines.torch.engine import TorchEngine
from shoal.inference.sampling import log_softmax
from shoal.models.gguf import GGUFSource
from shoal.types.ids import ModelId, RequestId
from shoal.types.shard import Shard
from tests.helpers.nodes import NodeProcess, start_node
from tests.helpers.smollm2 import SMOLLM

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
QUESTION: Any = [{"role": "user", "content": "What is the capital of France?"}]
REPEAT: Any = [{"role": "user", "content": "Write the word dog twenty times: dog dog dog"}]
STORY: Any = [{"role": "user", "content": "Tell me a story about a cat and a dog."}]
TOLERANCE = 2e-3  # the node's runner and this process run the same engine, maybe batched apart


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = start_node(
        tmp_path_factory.mktemp("sampling"), ["--model", MODEL, "--engine", "torch"], threads=2
    )
    try:
        proc.wait_ready(MODEL, timeout=180)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(node: NodeProcess) -> OpenAI:
    return OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=120)


@cache
def source() -> GGUFSource:
    return GGUFSource(SMOLLM)


@cache
def engine() -> TorchEngine:
    e = TorchEngine(device="cpu", quant="int4")  # the card's quant, as the node's runner runs it
    e.load(Shard.whole(ModelId(MODEL), 30), source())
    return e


def greedy_here(prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and each position's raw log-softmax, from the engine in this process
    stepped as the scheduler steps it: the prompt in one chunk, then a token at a time."""
    rid = RequestId("here")
    tokens: list[int] = []
    logps: list[np.ndarray] = []
    data, start = np.asarray(prompt, dtype=np.int64), 0
    for _ in range(steps):
        logits = engine().forward([StepInput(rid, data, start)])[0]
        logps.append(log_softmax(logits))
        tokens.append(int(np.argmax(logits)))
        start += len(data)
        data = np.asarray(tokens[-1:], dtype=np.int64)
    engine().free(rid)
    return tokens, logps


def test_completion_logprobs_are_the_engine_log_softmax(client: OpenAI) -> None:
    prompt = source().tokenizer().encode("The capital of France is", add_special_tokens=True)
    reply = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=5
    )
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    tokens, logps = greedy_here(prompt, len(lp.tokens))
    decode = source().tokenizer().decode
    assert lp.tokens == [decode([t], skip_special_tokens=False) for t in tokens]
    for got, token, expected in zip(lp.token_logprobs, tokens, logps, strict=True):
        assert got == pytest.approx(float(expected[token]), abs=TOLERANCE)
    for top, expected in zip(lp.top_logprobs, logps, strict=True):
        best = np.argsort(-expected)[:5]
        assert list(top) == [decode([int(t)], skip_special_tokens=False) for t in best]
        assert list(top.values()) == pytest.approx(
            [float(expected[t]) for t in best], abs=TOLERANCE
        )
    assert lp.text_offset is not None and lp.text_offset[0] == 0


def test_chat_logprobs_streamed_and_not_agree_with_the_engine(client: OpenAI) -> None:
    ask: Any = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 8}
    whole = client.chat.completions.create(**ask, logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert content and len(content) == whole.usage.completion_tokens
    streamed = [
        entry
        for chunk in client.chat.completions.create(
            **ask, logprobs=True, top_logprobs=3, stream=True
        )
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    prompt = source().tokenizer().encode_chat(QUESTION)
    tokens, logps = greedy_here(prompt, len(content))
    for entry, token, expected in zip(content, tokens, logps, strict=True):
        assert entry.logprob == pytest.approx(float(expected[token]), abs=TOLERANCE)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
    assert "".join(e.token for e in content) == whole.choices[0].message.content


def _prompt_tokens_counted(node: NodeProcess) -> float:
    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    match = re.search(r"^shoal:prompt_tokens_total\{[^}]*\} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_three_greedy_choices_are_equal_with_one_prefill(client: OpenAI, node: NodeProcess) -> None:
    ask: Any = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 12}
    one = client.chat.completions.create(**ask)
    before = _prompt_tokens_counted(node)
    three = client.chat.completions.create(**ask, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage is not None and one.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert _prompt_tokens_counted(node) - before == one.usage.prompt_tokens
    # no stage failed to copy the prompt's cache (which would prefill each choice again)
    assert "retrying each alone" not in node.log() and "cannot copy" not in node.log()
    texts = ["", "", ""]
    for chunk in client.chat.completions.create(**ask, n=3, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [one.choices[0].message.content] * 3


def _repeats(text: str) -> int:
    words = text.split()
    return len(words) - len(set(words))


def test_frequency_penalty_repeats_less(client: OpenAI) -> None:
    ask: Any = {"model": MODEL, "messages": REPEAT, "temperature": 0, "max_tokens": 30}
    plain = client.chat.completions.create(**ask).choices[0].message.content or ""
    penalized = client.chat.completions.create(**ask, frequency_penalty=1.5)
    text = penalized.choices[0].message.content or ""
    assert _repeats(text) < _repeats(plain), (plain, text)

    # presence subtracts 2 once per token seen: not enough against "dog" here, so on prose
    story: Any = {**ask, "messages": STORY, "max_tokens": 60}
    prose = client.chat.completions.create(**story).choices[0].message.content or ""
    varied = client.chat.completions.create(**story, presence_penalty=2.0)
    assert _repeats(varied.choices[0].message.content or "") < _repeats(prose)


def test_logit_bias_bans_and_forces_tokens(client: OpenAI) -> None:
    ask: Any = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 4}
    tokens, _ = greedy_here(source().tokenizer().encode_chat(QUESTION), 1)
    banned = client.chat.completions.create(**ask, logprobs=True, logit_bias={str(tokens[0]): -100})
    first = banned.choices[0].logprobs.content[0].token
    assert first != source().tokenizer().decode([tokens[0]], skip_special_tokens=False)
    paris = source().tokenizer().encode(" Paris")[0]
    forced = client.chat.completions.create(**ask, logit_bias={str(paris): 100})
    assert forced.choices[0].message.content == " Paris" * 4


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("audio", {"voice": "alloy", "format": "wav"}, "not supported"),
        ("modalities", ["text", "audio"], "not supported"),
        ("prediction", {"type": "content", "content": "x"}, "not supported"),
        ("web_search_options", {}, "not supported"),
        ("presence_penalty", 5.0, "less than or equal to 2"),
        ("logit_bias", {"99999999": 1}, "outside the vocabulary"),
    ],
)
def test_an_unsupported_or_out_of_range_field_is_a_400_naming_it(
    client: OpenAI, field: str, value: Any, words: str
) -> None:
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=2, extra_body={field: value}
        )
    assert err.value.param == field
    assert words in err.value.message
