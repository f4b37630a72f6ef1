"""The choices of one generation (OpenAI's `n`) and their logprobs, in OpenAI's two shapes.

A request of n choices streams its events interleaved, each tagged with its choice's index;
`collect_choices` sorts them out. Logprobs are the engine's raw log-softmax (see
inference/sampling.py): chat's `logprobs.content[] = {token, logprob, bytes, top_logprobs}`, and
completions' legacy `{tokens, token_logprobs, top_logprobs, text_offset}`.
"""

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from shoal.api.generation import DISCONNECT_POLL_S
from shoal.inference.request import Finished, TextDelta, TokenLogprob
from shoal.inference.scheduler import RequestStream
from shoal.inference.service import ChatTokenizer


@dataclass
class Choice:
    """One choice's text, token ids and logprobs so far, and its end."""

    index: int
    parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: Finished | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def take(self, delta: TextDelta) -> None:
        self.parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)


async def collect_choices(stream: RequestStream, request: Request, n: int) -> list[Choice]:
    """Run every choice to its end; a client that goes away cancels the generation."""
    choices = [Choice(i) for i in range(n)]

    async def drain() -> list[Choice]:
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    choices[event.index].take(event)
                else:
                    choices[event.index].done = event
        if any(c.done is None for c in choices):
            raise RuntimeError("generation ended without a Finished event per choice")
        return choices

    task = asyncio.create_task(drain())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError("client disconnected")
    finally:
        task.cancel()
        await stream.aclose()


def usage_of(done: Sequence[Finished]) -> tuple[int, int, int]:
    """(prompt tokens, completion tokens, cached prompt tokens) of a request's choices: the
    prompt counts once (the first choice prefills it; the others fork its cache)."""
    if not done:
        return 0, 0, 0
    return done[0].prompt_tokens, sum(d.completion_tokens for d in done), done[0].cached_tokens


def _text(tokenizer: ChatTokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def _entry(tokenizer: ChatTokenizer, token: int, logprob: float) -> dict[str, Any]:
    text = _text(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer: ChatTokenizer, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI chat's `logprobs` object of a choice's tokens."""
    content = [
        _entry(tokenizer, lp.token, lp.logprob)
        | {"top_logprobs": [_entry(tokenizer, t, v) for t, v in lp.top]}
        for lp in logprobs
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    tokenizer: ChatTokenizer, logprobs: Sequence[TokenLogprob], offset: int = 0
) -> dict[str, Any]:
    """The completions endpoint's legacy `logprobs` object; text offsets count from offset."""
    tokens, offsets = [], []
    for lp in logprobs:
        offsets.append(offset)
        tokens.append(_text(tokenizer, lp.token))
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{_text(tokenizer, t): v for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }
