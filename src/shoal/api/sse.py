"""Server-sent events: one `data:` line per JSON object, `[DONE]` at the end (chat and
completions); or named events, `event: TYPE` before each object's data (Anthropic Messages and
the Responses API), with no `[DONE]`."""

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from shoal.api.errors import error_body

log = logging.getLogger(__name__)


def sse_event(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def sse_stream(objects: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Frame each object as an event, then the terminating `[DONE]`; a failure on the way is
    an in-band error event (the status line is sent already), still followed by `[DONE]`."""
    try:
        async for obj in objects:
            yield sse_event(obj)
    except Exception as exc:  # the endpoint's own errors are in-band already: this is a bug
        log.exception("a stream failed")
        yield sse_event(error_body(500, f"internal error: {type(exc).__name__}: {exc}"))
    yield "data: [DONE]\n\n"


def named_event(obj: dict[str, Any]) -> str:
    """One event named by the object's own `type`."""
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return f"event: {obj['type']}\ndata: {data}\n\n"


async def named_sse_stream(
    objects: AsyncIterator[dict[str, Any]], failed: Callable[[str], dict[str, Any]]
) -> AsyncIterator[str]:
    """Frame each object as a named event; a failure on the way (a bug: the endpoint says its
    own errors in-band) becomes the dialect's error event, `failed(message)`."""
    try:
        async for obj in objects:
            yield named_event(obj)
    except Exception as exc:
        log.exception("a stream failed")
        yield named_event(failed(f"internal error: {type(exc).__name__}: {exc}"))
