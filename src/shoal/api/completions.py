"""POST /v1/completions: the legacy text-completion endpoint, streaming and not."""

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from shoal.api.errors import error_body, status_of
from shoal.api.generation import (
    check_context,
    check_token_ids,
    collect,
    events,
    new_request_id,
    now,
    off_loop,
)
from shoal.api.openai_types import CompletionRequest, usage
from shoal.api.sse import sse_stream
from shoal.errors import BadRequest, ShoalError
from shoal.inference.request import Finished, GenerationRequest
from shoal.inference.scheduler import RequestStream
from shoal.inference.service import InferenceService, ModelHandle

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    service: InferenceService = request.app.state.service
    handle = await service.acquire(body.model)
    sampling = body.sampling(body.max_tokens)
    tokenizer = handle.tokenizer
    if isinstance(body.prompt[0], int):
        prompt = [int(t) for t in body.prompt]
        check_token_ids(handle, prompt, param="prompt")
        text_prompt = await off_loop(tokenizer.decode, prompt, skip_special_tokens=False)
    else:
        text_prompt = str(body.prompt if isinstance(body.prompt, str) else body.prompt[0])
        prompt = await off_loop(tokenizer.encode, text_prompt, add_special_tokens=True)
    if not prompt:
        raise BadRequest("the prompt is empty", param="prompt")
    check_context(handle, len(prompt), body.max_tokens, param="prompt")
    req = GenerationRequest(new_request_id("cmpl"), handle.card.id, tuple(prompt), sampling)
    stream = handle.generate(req)  # admitted now: a full queue is a 429, not a broken stream
    echo = text_prompt if body.echo else ""
    if body.stream:
        chunks = _chunks(handle, req, stream, echo, body.include_usage)
        return StreamingResponse(sse_stream(chunks), media_type="text/event-stream")
    text, done = await collect(stream, request)
    return _completion(req, handle, echo + text, done.reason) | {
        "usage": usage(done.prompt_tokens, done.completion_tokens)
    }


def _completion(
    req: GenerationRequest, handle: ModelHandle, text: str, finish: str | None
) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {
        "id": req.request_id,
        "object": "text_completion",
        "created": now(),
        "model": handle.card.id,
        "choices": [choice],
    }


async def _chunks(
    handle: ModelHandle,
    req: GenerationRequest,
    stream: RequestStream,
    echo: str,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    if echo:
        yield _completion(req, handle, echo, None)
    try:
        async for event in events(stream):
            if isinstance(event, Finished):
                yield _completion(req, handle, "", event.reason)
                if include_usage:
                    yield _completion(req, handle, "", None) | {
                        "choices": [],
                        "usage": usage(event.prompt_tokens, event.completion_tokens),
                    }
            elif event.text:
                yield _completion(req, handle, event.text, None)
    except ShoalError as exc:
        yield error_body(status_of(exc)[0], str(exc))
