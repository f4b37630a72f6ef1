"""GET /healthz: the node is up and answering."""

from typing import Any

from fastapi import APIRouter, Request

from shoal import __version__
from shoal.inference.service import InferenceService

router = APIRouter()


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, Any]:
    service: InferenceService = request.app.state.service
    return {"status": "ok", "version": __version__, "active_requests": service.active_requests()}
