"""POST /v1/pulls: fetch a model's files into this node's cache; GET /v1/pulls: their progress.

A pull changes what the node holds, so it needs an admin key where keys are set (api/auth.py:
every write outside the inference routes does).
"""

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from shoal.api.models import answers_here
from shoal.errors import ModelUnavailable
from shoal.inference.service import InferenceService
from shoal.models.availability import NeedsDownload
from shoal.models.pull import card_source
from shoal.serving.pulls import Pulls

router = APIRouter()


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=200)  # a catalog id or a Hub repo id


def _pulls(request: Request) -> Pulls:
    pulls = getattr(request.app.state, "pulls", None)
    if pulls is None:
        raise ModelUnavailable("this node has no Hub cache to pull into")
    return pulls


@router.post("/v1/pulls")
async def start_pull(body: PullRequest, request: Request) -> dict[str, Any]:
    """Start pulling the model (or report the pull under way): the Hub source /v1/models says
    it would run from after a download, else its card's first."""
    pulls = _pulls(request)
    service: InferenceService = request.app.state.service
    card = await service.resolve(body.model)  # a card id or a Hub repo id; 404 otherwise
    answers = answers_here(request)
    answer = answers(card) if answers is not None else None
    repo = answer.repo if isinstance(answer, NeedsDownload) else None
    return pulls.start(card.id, card_source(card, repo)).to_json()


@router.get("/v1/pulls")
async def list_pulls(request: Request) -> dict[str, Any]:
    """Every pull of this node, newest first."""
    return {"object": "list", "data": [p.to_json() for p in _pulls(request).states()]}
