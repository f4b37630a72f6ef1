"""A pipeline around another, for tests that change one thing about it (break, fail, record)."""

from collections.abc import Sequence

from shoal.inference.pipeline import Pipeline, Step
from shoal.types.ids import RequestId


class Wrapping:
    """Everything as `inner` does it; a subclass overrides `forward`. Batches sent at once go
    through `forward` one by one, so the override sees each."""

    def __init__(self, inner: Pipeline) -> None:
        self.inner = inner
        self.depth = inner.depth

    async def forward(self, steps: Sequence[Step]) -> Sequence[int | None]:
        return await self.inner.forward(steps)

    async def forward_all(self, batches: Sequence[Sequence[Step]]) -> list[Sequence[int | None]]:
        return [await self.forward(steps) for steps in batches]

    async def free(self, request_id: RequestId, keep: bool = False) -> None:
        await self.inner.free(request_id, keep)

    async def close(self) -> None:
        await self.inner.close()
