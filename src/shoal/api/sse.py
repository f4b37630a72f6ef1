"""Server-sent events: one `data:` line per JSON object, `[DONE]` at the end."""

import json
from collections.abc import AsyncIterator
from typing import Any


def sse_event(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def sse_stream(objects: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Frame each object as an event, then the terminating `[DONE]`."""
    async for obj in objects:
        yield sse_event(obj)
    yield "data: [DONE]\n\n"
