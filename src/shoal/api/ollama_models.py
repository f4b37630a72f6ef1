"""Ollama's model routes: /api/tags (what runs or is coming up), /api/ps (what runs), /api/show,
/api/version, and /api/pull: api/pulls.py's pull of the model's files into this node's cache,
its progress streamed as Ollama's status lines. Errors are Ollama's (api/errors.py, by path)."""

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from shoal import __version__
from shoal.api import pulls as pull_routes
from shoal.api.models import CARDS_CREATED, answers_here
from shoal.api.ollama import Body, model_id, read_body
from shoal.api.openai_types import Text
from shoal.errors import BadRequest, ModelUnavailable, ShoalError
from shoal.inference.service import InferenceService
from shoal.models.availability import RunsHere
from shoal.types.model_card import ModelCard

router = APIRouter()

PULL_POLL_S = 0.25  # how often /api/pull looks at the pull's progress


def _digest(card: ModelCard) -> str:
    """A stable stand-in for Ollama's manifest digest: shoal has no manifests."""
    return hashlib.sha256(f"{card.id}@{card.hf_repo}".encode()).hexdigest()


def _details(card: ModelCard) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf" if any(w.format == "gguf" for w in card.weights) else "safetensors",
        "family": card.architecture,
        "families": [card.architecture],
        "parameter_size": "",
        "quantization_level": card.quantization,
    }


def _model_entry(card: ModelCard) -> dict[str, Any]:
    return {
        "name": card.id,
        "model": card.id,
        "modified_at": datetime.fromtimestamp(CARDS_CREATED, UTC).isoformat(),
        "size": card.storage_bytes,
        "digest": _digest(card),
        "details": _details(card),
    }


# --- the model list, details and pulls -------------------------------------------------------


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    """The models this cluster runs or is bringing up (Ollama lists what it has pulled)."""
    service: InferenceService = request.app.state.service
    here = ("ready", "loading", "downloading")
    return {
        "models": [_model_entry(c) for c in service.cards() if service.status(c).status in here]
    }


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    """The models with a ready instance."""
    service: InferenceService = request.app.state.service
    running = [c for c in service.cards() if service.status(c).status == "ready"]
    never = "2318-01-01T00:00:00Z"  # shoal keeps an instance until it is deleted
    return {
        "models": [
            _model_entry(c)
            | {"expires_at": never, "size_vram": 0, "context_length": c.context_length}
            for c in running
        ]
    }


class ShowBody(Body):
    model: Text | None = None
    name: Text | None = None  # older clients' name for it
    verbose: bool = False


@router.post("/api/show")
async def show(request: Request) -> dict[str, Any]:
    body = await read_body(request, ShowBody)
    wanted = body.model or body.name
    if not wanted:
        raise BadRequest("model is required", param="model")
    service: InferenceService = request.app.state.service
    card = await service.resolve(model_id(wanted))
    arch = card.architecture
    return {
        "license": card.license,
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": _details(card),
        "model_info": {
            "general.architecture": arch,
            "general.basename": card.name,
            f"{arch}.context_length": card.context_length,
            f"{arch}.embedding_length": card.hidden_size,
            f"{arch}.block_count": card.layers,
            f"{arch}.attention.head_count": card.heads,
            f"{arch}.attention.head_count_kv": card.kv_heads,
            f"{arch}.vocab_size": card.vocab_size,
        },
        "capabilities": ["completion"],
        "modified_at": datetime.fromtimestamp(CARDS_CREATED, UTC).isoformat(),
    }


class PullBody(Body):
    model: Text | None = None
    name: Text | None = None
    insecure: bool = False
    stream: bool = True


async def _progress(pulls: Any, card: ModelCard) -> AsyncIterator[dict[str, Any]]:
    """Status lines in Ollama's words until the pull is done (`success`; no pulls: the files
    were here already); a failed pull raises ModelUnavailable with its reason."""
    yield {"status": "pulling manifest"}
    digest = _digest(card)
    last: dict[str, Any] = {}
    while pulls is not None:
        state = next(s for s in pulls.states() if s.model == card.id)
        if state.status == "failed":
            raise ModelUnavailable(f"pulling {card.id} failed: {state.reason}")
        if state.status == "done":
            break
        line = {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}"}
        line |= {"total": state.total, "completed": state.done}
        if line != last:
            yield line
            last = line
        await asyncio.sleep(PULL_POLL_S)
    yield {"status": "success"}


@router.post("/api/pull", response_model=None)
async def pull(request: Request) -> Any:
    """Fetch the model's files into this node's cache (api/pulls.py's pull, as Ollama
    downloads without loading), reporting until they are here."""
    body = await read_body(request, PullBody)
    wanted = body.model or body.name
    if not wanted:
        raise BadRequest("model is required", param="model")
    service: InferenceService = request.app.state.service
    card = await service.resolve(model_id(wanted))
    answers = answers_here(request)
    pulls = None  # its weights are here already: nothing to fetch
    if answers is None or not isinstance(answers(card), RunsHere):
        # started before any line goes out, so a model with no Hub source is a 4xx
        await pull_routes.start_pull(pull_routes.PullRequest(model=card.id), request)
        pulls = request.app.state.pulls
    if not body.stream:
        said = [line async for line in _progress(pulls, card)]
        return said[-1]

    async def lines() -> AsyncIterator[str]:
        try:
            async for line in _progress(pulls, card):
                yield json.dumps(line) + "\n"
        except ShoalError as exc:
            yield json.dumps({"error": str(exc)}) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")
