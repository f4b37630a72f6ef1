"""Instances: POST /instance, GET /instance/previews, GET /v1/instances, DELETE /instance/{id}."""

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from shoal.cluster import ClusterNode
from shoal.errors import BadRequest, ModelNotFound
from shoal.placement.overrides import parse_overrides
from shoal.placement.previews import previews
from shoal.profile.links import hop_seconds
from shoal.serving import ClusterService, profiles_of
from shoal.state.model import State
from shoal.types.commands import DeleteInstance
from shoal.types.ids import InstanceId

router = APIRouter()

# How long a layout waits for the profiles of the nodes it names: a node that has just joined
# profiles itself first, so `shoal place` right after start-up must not fail with "no node".
# The lease (--lease-ms, create_app's profile_wait_s): a node still silent after it is as good
# as gone.
PROFILE_POLL_S = 0.05


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
    if body.layers is not None and request.app.state.cluster is not None:
        wait_s: float = request.app.state.profile_wait_s
        await _await_profiles(request.app.state.cluster, body.layers, wait_s)
    instance = await _service(request).place(
        body.model, policy=body.policy, layers=body.layers, engine=body.engine
    )
    return instance.model_dump(mode="json")


def unprofiled(layers: str, state: State) -> list[str]:
    """The nodes a layout names that no connected, profiled node answers to (id or prefix)."""
    try:
        names = [o.node for o in parse_overrides(layers)]
    except BadRequest:
        return []  # placement says what is wrong with the layout itself
    known = [p.node_id for p in profiles_of(state)]
    return [n for n in dict.fromkeys(names) if not any(k.startswith(n) for k in known)]


async def _await_profiles(cluster: ClusterNode, layers: str, wait_s: float) -> None:
    """Until every node the layout names has a profile; BadRequest after wait_s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while missing := unprofiled(layers, cluster.state):
        if loop.time() >= deadline:
            known = ", ".join(sorted(p.node_id for p in profiles_of(cluster.state))) or "none"
            raise BadRequest(
                f"no profile from {', '.join(missing)} within {wait_s:g} s (profiled nodes: "
                f"{known}); is that node running and joined to this cluster?",
                param="layers",
            )
        await asyncio.sleep(PROFILE_POLL_S)


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
    card = await service.resolve(wanted)
    profiles = profiles_of(request.app.state.cluster.state)
    options = previews(card, profiles, links=hop_seconds(profiles))
    return {"model": card.id, "previews": [p.to_json() for p in options]}


@router.get("/v1/instances")
async def list_instances(request: Request) -> dict[str, Any]:
    """Every instance in the cluster with its runners, and how many requests this node has on it."""
    service = _service(request)
    loads = service.loads()  # a moved handle still finishing requests on it counts too
    rows = []
    for iid, record in request.app.state.cluster.state.instances.items():
        mine = [load for load in loads if load.instance == iid]
        rows.append(
            {
                **record.instance.model_dump(mode="json"),
                "ready": record.ready,
                "runners": {str(k): v.model_dump(mode="json") for k, v in record.runners.items()},
                "local_requests": service.instance_load(iid),
                # what this node's own requests do on it now (each node sees its own)
                "load": {
                    "running": sum(load.running for load in mine),
                    "waiting": sum(load.waiting for load in mine),
                    "tok_s": round(sum(load.tok_s for load in mine), 2),
                },
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
