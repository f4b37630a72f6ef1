"""GET /healthz and /health (what vLLM, llama-server and load balancers probe): the node is up
and answering. Both are open without an API key (api/auth.py)."""

from typing import Any

from fastapi import APIRouter, Request

from shoal import __version__
from shoal.inference.service import InferenceService

router = APIRouter()


@router.get("/healthz")
@router.get("/health")
async def healthz(request: Request) -> dict[str, Any]:
    service: InferenceService = request.app.state.service
    return {"status": "ok", "version": __version__, "active_requests": service.active_requests()}
