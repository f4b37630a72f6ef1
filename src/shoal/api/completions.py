"""POST /v1/completions: the legacy text-completion endpoint, streaming and not."""

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from shoal.api.choices import collect_choices, completion_logprobs, usage_of
from shoal.api.errors import error_body, status_of
from shoal.api.generation import (
    check_context,
    check_token_ids,
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
    check_token_ids(handle, [t for t, _ in sampling.logit_bias], param="logit_bias")
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
    req = GenerationRequest(
        new_request_id("cmpl"), handle.card.id, tuple(prompt), sampling, n=body.n
    )
    stream = handle.generate(req)  # admitted now: a full queue is a 429, not a broken stream
    echo = text_prompt if body.echo else ""
    if body.stream:
        chunks = _chunks(handle, req, stream, echo, body.include_usage)
        return StreamingResponse(sse_stream(chunks), media_type="text/event-stream")
    choices = await collect_choices(stream, request, req.n)
    done = [c.done for c in choices if c.done is not None]
    return {
        "id": req.request_id,
        "object": "text_completion",
        "created": now(),
        "model": handle.card.id,
        "choices": [
            _choice(
                c.index,
                echo + c.text,
                c.done.reason if c.done else None,
                completion_logprobs(tokenizer, c.logprobs, len(echo))
                if sampling.logprobs is not None
                else None,
            )
            for c in choices
        ],
        "usage": usage(*usage_of(done)),
    }


def _choice(
    index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _completion(
    req: GenerationRequest, handle: ModelHandle, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "id": req.request_id,
        "object": "text_completion",
        "created": now(),
        "model": handle.card.id,
        "choices": choices,
    }


async def _chunks(
    handle: ModelHandle,
    req: GenerationRequest,
    stream: RequestStream,
    echo: str,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    tokenizer = handle.tokenizer
    offsets = [len(echo)] * req.n  # text offsets of each choice's next token
    ended: list[Finished] = []
    if echo:
        yield _completion(req, handle, [_choice(i, echo, None) for i in range(req.n)])
    try:
        async for event in events(stream):
            if isinstance(event, Finished):
                ended.append(event)
                yield _completion(req, handle, [_choice(event.index, "", event.reason)])
                if include_usage and len(ended) == req.n:
                    yield _completion(req, handle, []) | {"usage": usage(*usage_of(ended))}
            elif event.text or event.logprobs:
                logprobs = None
                if req.sampling.logprobs is not None:
                    logprobs = completion_logprobs(tokenizer, event.logprobs, offsets[event.index])
                    offsets[event.index] += len(event.text)
                yield _completion(req, handle, [_choice(event.index, event.text, None, logprobs)])
    except ShoalError as exc:
        yield error_body(status_of(exc)[0], str(exc))
