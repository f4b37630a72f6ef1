"""Server-sent events: one `data:` line per JSON object, `[DONE]` at the end."""

import json
import logging
from collections.abc import AsyncIterator
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
