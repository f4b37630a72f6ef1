"""Glue shared by the generation endpoints: input checks, collecting, streaming, cancellation."""

import asyncio
import contextlib
import dataclasses
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request

from shoal.errors import BadRequest, ContextOverflow
from shoal.inference.constraint import ConstraintFactory
from shoal.inference.request import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from shoal.inference.sampling import GREEDY_BELOW
from shoal.inference.scheduler import RequestStream
from shoal.inference.service import ModelHandle
from shoal.types.ids import RequestId

_T = TypeVar("_T")

DISCONNECT_POLL_S = 0.5
# What SamplingParams can say: a dialect maps its fields onto these, and refuses the rest
SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def new_request_id(prefix: str) -> RequestId:
    return RequestId(f"{prefix}-{uuid.uuid4().hex[:24]}")


def now() -> int:
    return int(time.time())


async def off_loop(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """fn on a worker thread: tokenizing a long prompt or rendering a chat template must not
    stall the event loop (every other request and /healthz wait on it)."""
    return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))


def check_token_ids(handle: ModelHandle, ids: Sequence[int], *, param: str) -> None:
    """400 naming the first token id outside the model's vocabulary."""
    vocab = handle.card.vocab_size
    if ids and not 0 <= min(ids) <= max(ids) < vocab:
        bad = next(t for t in ids if not 0 <= t < vocab)
        raise BadRequest(f"token id {bad} is outside the vocabulary [0, {vocab})", param=param)


def check_context(
    handle: ModelHandle, prompt_tokens: int, max_tokens: int | None, *, param: str
) -> None:
    """400 with the numbers when the prompt (plus the requested output) overflows the context."""
    ctx = handle.context_length
    if prompt_tokens >= ctx:
        raise ContextOverflow(
            f"this model's maximum context length is {ctx} tokens, "
            f"but the prompt has {prompt_tokens} tokens",
            param=param,
        )
    if max_tokens is not None and prompt_tokens + max_tokens > ctx:
        raise ContextOverflow(
            f"this model's maximum context length is {ctx} tokens, but {prompt_tokens + max_tokens}"
            f" were requested ({prompt_tokens} in the prompt, {max_tokens} for the completion)",
            param="max_tokens",
        )


def sampling_params(temperature: float, **fields: Any) -> SamplingParams:
    """A dialect's sampling fields (None: SamplingParams' default) as SamplingParams; a
    temperature below GREEDY_BELOW is greedy. The caller maps only fields in SAMPLING_FIELDS."""
    given = {k: v for k, v in fields.items() if v is not None}
    return SamplingParams(temperature=0.0 if temperature < GREEDY_BELOW else temperature, **given)


def start(
    handle: ModelHandle,
    prompt: Sequence[int],
    sampling: SamplingParams,
    prefix: str,
    *,
    param: str,
    constraint: ConstraintFactory | None = None,
) -> tuple[GenerationRequest, RequestStream]:
    """Check the prompt (400s naming `param`) and admit it now: a full queue is a 429 here,
    not a broken stream."""
    if not prompt:
        raise BadRequest("the prompt is empty", param=param)
    check_context(handle, len(prompt), sampling.max_tokens, param=param)
    rid = new_request_id(prefix)
    req = GenerationRequest(rid, handle.card.id, tuple(prompt), sampling, constraint=constraint)
    return req, handle.generate(req)


async def collect(
    stream: RequestStream, request: Request, token_ids: list[int] | None = None
) -> tuple[str, Finished]:
    """Run to completion (the ids generated appended to `token_ids`); a client that goes away
    cancels the generation."""

    async def drain() -> tuple[str, Finished]:
        parts: list[str] = []
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                    if token_ids is not None:
                        token_ids.extend(event.token_ids)
                else:
                    return "".join(parts), event
        raise RuntimeError("generation ended without a Finished event")

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


async def events(stream: RequestStream) -> AsyncIterator[GenerationEvent]:
    """The request's events; closing this iterator (client gone) cancels the generation."""
    async with contextlib.aclosing(stream):
        async for event in stream:
            yield event
