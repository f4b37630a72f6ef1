"""POST /v1/completions: the legacy text-completion endpoint, streaming and not."""

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from shoal.api.errors import error_body, status_of
from shoal.api.generation import check_context, collect, events, new_request_id, now
from shoal.api.openai_types import CompletionRequest, usage
from shoal.api.sse import sse_stream
from shoal.errors import ShoalError
from shoal.inference.request import Finished, GenerationRequest
from shoal.inference.service import InferenceService, ModelHandle

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    service: InferenceService = request.app.state.service
    handle = await service.acquire(body.model)
    if isinstance(body.prompt, str):
        text_prompt = body.prompt
        prompt = handle.tokenizer.encode(text_prompt, add_special_tokens=True)
    elif isinstance(body.prompt[0], str):
        text_prompt = str(body.prompt[0])
        prompt = handle.tokenizer.encode(text_prompt, add_special_tokens=True)
    else:
        prompt = [int(t) for t in body.prompt]
        text_prompt = handle.tokenizer.decode(prompt, skip_special_tokens=False)
    check_context(handle, len(prompt), body.max_tokens)
    req = GenerationRequest(
        new_request_id("cmpl"), handle.card.id, tuple(prompt), body.sampling(body.max_tokens)
    )
    echo = text_prompt if body.echo else ""
    if body.stream:
        chunks = _chunks(handle, req, echo, body.include_usage)
        return StreamingResponse(sse_stream(chunks), media_type="text/event-stream")
    text, done = await collect(handle, req, request)
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
    handle: ModelHandle, req: GenerationRequest, echo: str, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    if echo:
        yield _completion(req, handle, echo, None)
    try:
        async for event in events(handle, req):
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
