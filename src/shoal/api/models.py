"""GET /v1/models and /v1/models/{id}: every card, in OpenAI's list shape, with availability."""

import json
from typing import Any

from fastapi import APIRouter, Request, Response

from shoal.inference.service import InferenceService
from shoal.models.availability import CannotRun, NeedsDownload, RunsHere
from shoal.serving.availability import Answers
from shoal.types.model_card import ModelCard

router = APIRouter()

KINDS = {RunsHere: "runs_here", NeedsDownload: "needs_download", CannotRun: "cannot_run"}
# Cards are data shipped with the release: one fixed "created" stamp (2025-01-01) for all of them.
CARDS_CREATED = 1735689600


def model_object(
    card: ModelCard, service: InferenceService, answers: Answers | None = None
) -> dict[str, Any]:
    """OpenAI's model object plus the fields exo's clients read, plus whether it runs on the
    cluster now and (with `answers`) whether it runs here: now, after a download, or not."""
    status = service.status(card)
    here = {}
    if answers is not None:
        answer = answers(card)
        here = {
            "availability": answer.line,
            "availability_kind": KINDS[type(answer)],
            "download_bytes": answer.size if isinstance(answer, NeedsDownload) else 0,
        }
    return here | {
        "id": card.id,
        "object": "model",
        "created": CARDS_CREATED,
        "owned_by": card.hf_repo.split("/")[0],
        "name": card.name,
        "description": card.description,
        "family": card.family,
        "architecture": card.architecture,
        "hugging_face_id": card.hf_repo,
        "context_length": card.context_length,
        "layers": card.layers,
        "hidden_size": card.hidden_size,
        "storage_size_megabytes": round(card.storage_bytes / 2**20),
        "quantization": card.quantization,
        "license": card.license,
        "runnable": status.runnable,
        "status": status.status,
        "reason": status.reason,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    """Every card; the JSON is rebuilt only when the cluster state changes, or a pull into this
    node's cache ends (read often)."""
    service: InferenceService = request.app.state.service
    cluster = request.app.state.cluster
    pulls = request.app.state.pulls
    ended = pulls.ended if pulls is not None else 0
    version = (cluster.state.index, ended) if cluster is not None else None
    cached = request.app.state.models_json
    if cached is None or cached[0] != version or version is None:
        answers = answers_here(request)
        data = [model_object(c, service, answers) for c in service.cards()]
        listing = {"object": "list", "data": data}
        cached = request.app.state.models_json = (version, json.dumps(listing).encode())
    return Response(cached[1], media_type="application/json")


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    service: InferenceService = request.app.state.service
    return model_object(await service.resolve(model_id), service, answers_here(request))


def answers_here(request: Request) -> Answers | None:
    """What runs on this machine, against the cluster's connected nodes (None: no Hub cache,
    as in tests of the API alone)."""
    hub_root = request.app.state.hub_root
    if hub_root is None:
        return None
    cluster = request.app.state.cluster
    profiles = []
    if cluster is not None:
        nodes = cluster.state.nodes.values()
        profiles = [n.profile for n in nodes if n.connected and n.profile is not None]
    return Answers(profiles, hub_root)
