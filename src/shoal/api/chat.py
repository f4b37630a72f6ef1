"""POST /v1/chat/completions: non-streaming and SSE streaming of `chat.completion.chunk`s."""

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from shoal.api.errors import error_body, status_of
from shoal.api.generation import check_context, collect, events, new_request_id, now, off_loop
from shoal.api.openai_types import ChatCompletionRequest, usage
from shoal.api.sse import sse_stream
from shoal.errors import BadRequest, ShoalError
from shoal.inference.request import Finished, GenerationRequest
from shoal.inference.scheduler import RequestStream
from shoal.inference.service import InferenceService, ModelHandle

router = APIRouter()


def _messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """OpenAI messages as the chat template expects them ("developer" is a system message)."""
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    service: InferenceService = request.app.state.service
    handle = await service.acquire(body.model)
    sampling = body.sampling(body.token_limit)
    prompt = await off_loop(handle.tokenizer.encode_chat, _messages(body))
    if not prompt:
        raise BadRequest("the chat template made an empty prompt", param="messages")
    check_context(handle, len(prompt), body.token_limit, param="messages")
    req = GenerationRequest(new_request_id("chatcmpl"), handle.card.id, tuple(prompt), sampling)
    stream = handle.generate(req)  # admitted now: a full queue is a 429, not a broken stream
    if body.stream:
        chunks = _chunks(handle, req, stream, body.include_usage)
        return StreamingResponse(sse_stream(chunks), media_type="text/event-stream")
    text, done = await collect(stream, request)
    return {
        "id": req.request_id,
        "object": "chat.completion",
        "created": now(),
        "model": handle.card.id,
        "system_fingerprint": handle.instance_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": done.reason,
            }
        ],
        "usage": usage(done.prompt_tokens, done.completion_tokens),
    }


async def _chunks(
    handle: ModelHandle, req: GenerationRequest, stream: RequestStream, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    created = now()

    def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {
            "id": req.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": handle.card.id,
            "system_fingerprint": handle.instance_id,
            "choices": [choice],
        }

    yield chunk({"role": "assistant", "content": ""}, None)
    try:
        async for event in events(stream):
            if isinstance(event, Finished):
                yield chunk({}, event.reason)
                if include_usage:
                    yield chunk({}, None) | {
                        "choices": [],
                        "usage": usage(event.prompt_tokens, event.completion_tokens),
                    }
            elif event.text:
                yield chunk({"content": event.text}, None)
    except ShoalError as exc:  # mid-stream: the status is sent already, so say it in-band
        yield error_body(status_of(exc)[0], str(exc))
