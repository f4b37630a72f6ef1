"""POST /v1/chat/completions: non-streaming and SSE streaming of `chat.completion.chunk`s."""

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from shoal.api.chat_tools import ChatPlan, DeltaStream, MarkerText, answer_message, plan_chat
from shoal.api.choices import Choice, chat_logprobs, collect_choices, usage_of
from shoal.api.errors import error_body, status_of
from shoal.api.generation import (
    check_context,
    check_token_ids,
    events,
    new_request_id,
    now,
    off_loop,
)
from shoal.api.openai_types import ChatCompletionRequest, usage
from shoal.api.sse import sse_stream
from shoal.errors import BadRequest, ShoalError
from shoal.inference.request import Finished, GenerationRequest
from shoal.inference.scheduler import RequestStream
from shoal.inference.service import InferenceService, ModelHandle

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    service: InferenceService = request.app.state.service
    handle = await service.acquire(body.model)
    sampling = body.sampling(body.token_limit)
    check_token_ids(handle, [t for t, _ in sampling.logit_bias], param="logit_bias")
    plan = await off_loop(plan_chat, body, handle.tokenizer, handle.card)
    tools = {} if plan.tools is None else {"tools": plan.tools}  # a plain chat renders as before
    prompt = await off_loop(handle.tokenizer.encode_chat, plan.messages, **tools)
    if not prompt:
        raise BadRequest("the chat template made an empty prompt", param="messages")
    check_context(handle, len(prompt), body.token_limit, param="messages")
    req = GenerationRequest(
        new_request_id("chatcmpl"),
        handle.card.id,
        tuple(prompt),
        sampling,
        n=body.n,
        constraint=plan.constraint,
    )
    stream = handle.generate(req)  # admitted now: a full queue is a 429, not a broken stream
    if body.stream:
        chunks = _chunks(handle, req, stream, body.include_usage, plan)
        return StreamingResponse(sse_stream(chunks), media_type="text/event-stream")
    choices = await collect_choices(stream, request, req.n)
    done = [c.done for c in choices if c.done is not None]
    return {
        "id": req.request_id,
        "object": "chat.completion",
        "created": now(),
        "model": handle.card.id,
        "system_fingerprint": handle.instance_id,
        "choices": [_choice(handle, req, plan, c) for c in choices],
        "usage": usage(*usage_of(done)),
    }


def _choice(
    handle: ModelHandle, req: GenerationRequest, plan: ChatPlan, c: Choice
) -> dict[str, Any]:
    """One choice of a non-streamed answer."""
    text = c.text
    if plan.keep:  # the format's markers are special tokens: read them back from the ids
        marked = MarkerText(handle.tokenizer, plan.keep)
        text = marked.push(c.token_ids) + marked.flush()
    message, finish = answer_message(plan, text, c.done.reason if c.done else "stop")
    logprobs = None
    if req.sampling.logprobs is not None:
        logprobs = chat_logprobs(handle.tokenizer, c.logprobs)
    return {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": finish}


async def _chunks(
    handle: ModelHandle,
    req: GenerationRequest,
    stream: RequestStream,
    include_usage: bool,
    plan: ChatPlan,
) -> AsyncIterator[dict[str, Any]]:
    created = now()
    # per choice: content, and tool calls out of the text (never as content)
    all_deltas = [DeltaStream(plan) for _ in range(req.n)]
    all_marked = [
        MarkerText(handle.tokenizer, plan.keep) if plan.keep else None for _ in all_deltas
    ]
    ended: list[Finished] = []

    def chunk(
        index: int,
        delta: dict[str, Any],
        finish: str | None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {
            "id": req.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": handle.card.id,
            "system_fingerprint": handle.instance_id,
            "choices": [choice],
        }

    for i in range(req.n):
        yield chunk(i, {"role": "assistant", "content": ""}, None)
    try:
        async for event in events(stream):
            i = event.index
            deltas, marked = all_deltas[i], all_marked[i]
            if isinstance(event, Finished):
                ended.append(event)
                tail = deltas.push(marked.flush()) if marked else []
                for delta in tail + deltas.finish():
                    yield chunk(i, delta, None)
                yield chunk(i, {}, "tool_calls" if deltas.called else event.reason)
                if include_usage and len(ended) == req.n:
                    yield chunk(i, {}, None) | {"choices": [], "usage": usage(*usage_of(ended))}
            else:
                text = marked.push(event.token_ids) if marked else event.text
                logprobs = None
                if req.sampling.logprobs is not None and event.logprobs:
                    logprobs = chat_logprobs(handle.tokenizer, event.logprobs)
                for delta in deltas.push(text) or ([{"content": ""}] if logprobs else []):
                    yield chunk(i, delta, None, logprobs)
                    logprobs = None  # on the first chunk of the event's text
    except ShoalError as exc:  # mid-stream: the status is sent already, so say it in-band
        yield error_body(status_of(exc)[0], str(exc))
