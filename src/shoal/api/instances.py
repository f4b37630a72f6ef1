"""Instances: POST /instance, GET /instance/previews, GET /v1/instances, DELETE /instance/{id}."""

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from shoal.errors import ModelNotFound
from shoal.placement.previews import previews
from shoal.serving import ClusterService, profiles_of
from shoal.types.commands import DeleteInstance
from shoal.types.ids import InstanceId

router = APIRouter()


class PlaceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)  # exo's clients send model_id
    policy: Literal["latency", "throughput"] = "latency"
    layers: str | None = None  # manual override: "NODE:START-END,..."
    engine: str | None = None


def _service(request: Request) -> ClusterService:
    service: ClusterService = request.app.state.service
    return service


@router.post("/instance")
async def place_instance(body: PlaceRequest, request: Request) -> dict[str, Any]:
    """Place an instance of a model (the master decides, or follows `layers`)."""
    instance = await _service(request).place(
        body.model, policy=body.policy, layers=body.layers, engine=body.engine
    )
    return instance.model_dump(mode="json")


@router.get("/instance/previews")
async def instance_previews(
    request: Request,
    model: str | None = Query(default=None),
    model_id: str | None = Query(default=None),  # exo's name for it
) -> dict[str, Any]:
    """Every way the model could be placed now: stages, predicted tok/s, memory, or why not."""
    wanted = model or model_id
    if not wanted:
        raise ModelNotFound("give ?model=MODEL_ID")
    service = _service(request)
    card = service.card(wanted)
    options = previews(card, profiles_of(request.app.state.cluster.state))
    return {"model": card.id, "previews": [p.to_json() for p in options]}


@router.get("/v1/instances")
async def list_instances(request: Request) -> dict[str, Any]:
    """Every instance in the cluster with its runners, and how many requests this node has on it."""
    service = _service(request)
    rows = []
    for iid, record in request.app.state.cluster.state.instances.items():
        rows.append(
            {
                **record.instance.model_dump(mode="json"),
                "ready": record.ready,
                "runners": {str(k): v.model_dump(mode="json") for k, v in record.runners.items()},
                "local_requests": service.instance_load(iid),
            }
        )
    return {"object": "list", "data": rows}


@router.delete("/instance/{instance_id}")
async def delete_instance(instance_id: str, request: Request) -> dict[str, Any]:
    """Stop an instance and its runners."""
    result = await request.app.state.cluster.command(
        DeleteInstance(instance_id=InstanceId(instance_id))
    )
    if not result.ok:
        raise ModelNotFound(result.message)
    return {"deleted": instance_id}
