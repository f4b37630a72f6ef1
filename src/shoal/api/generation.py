"""Glue shared by the generation endpoints: context checks, collecting, streaming, cancellation."""

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from shoal.errors import ContextOverflow
from shoal.inference.request import Finished, GenerationEvent, GenerationRequest, TextDelta
from shoal.inference.service import ModelHandle
from shoal.types.ids import RequestId

DISCONNECT_POLL_S = 0.5


def new_request_id(prefix: str) -> RequestId:
    return RequestId(f"{prefix}-{uuid.uuid4().hex[:24]}")


def now() -> int:
    return int(time.time())


def check_context(handle: ModelHandle, prompt_tokens: int, max_tokens: int | None) -> None:
    """400 with the numbers when the prompt (plus the requested output) overflows the context."""
    ctx = handle.context_length
    if prompt_tokens >= ctx:
        raise ContextOverflow(
            f"this model's maximum context length is {ctx} tokens, "
            f"but the prompt has {prompt_tokens} tokens",
            param="messages",
        )
    if max_tokens is not None and prompt_tokens + max_tokens > ctx:
        raise ContextOverflow(
            f"this model's maximum context length is {ctx} tokens, but {prompt_tokens + max_tokens}"
            f" were requested ({prompt_tokens} in the prompt, {max_tokens} for the completion)",
            param="max_tokens",
        )


async def collect(
    handle: ModelHandle, req: GenerationRequest, request: Request
) -> tuple[str, Finished]:
    """Run to completion; a client that goes away cancels the generation."""

    async def drain() -> tuple[str, Finished]:
        parts: list[str] = []
        async with contextlib.aclosing(handle.generate(req)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    parts.append(event.text)
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


async def events(handle: ModelHandle, req: GenerationRequest) -> AsyncIterator[GenerationEvent]:
    """The request's events; closing this iterator (client gone) cancels the generation."""
    async with contextlib.aclosing(handle.generate(req)) as stream:
        async for event in stream:
            yield event
