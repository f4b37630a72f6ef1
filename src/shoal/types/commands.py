"""Commands: imperative requests any node sends the master, which turns them into events."""

from typing import Annotated, Literal

from pydantic import Field

from shoal.types.ids import InstanceId, ModelId, NodeId
from shoal.types.instance import Policy
from shoal.types.message import Message
from shoal.types.model_card import ModelCard


class _Command(Message):
    pass


class ForgetNode(_Command):
    """Remove a lost node from the cluster state."""

    kind: Literal["forget_node"] = "forget_node"
    node_id: NodeId


class PlaceModel(_Command):
    """Place an instance of a model (layers: manual override "NODE:START-END,...")."""

    kind: Literal["place_model"] = "place_model"
    instance_id: InstanceId
    model_id: ModelId
    policy: Policy = "latency"
    layers: str | None = None
    engine: str | None = None
    avoid: tuple[NodeId, ...] = ()  # nodes not to use (a stage there kept failing)
    card: ModelCard | None = None  # for a model outside the catalogs (a Hub repo id)


class DeleteInstance(_Command):
    """Stop an instance and its runners."""

    kind: Literal["delete_instance"] = "delete_instance"
    instance_id: InstanceId


class AdmitMember(_Command):
    """Record a node the CA just certified as a member (sent by the node that enrolled it)."""

    kind: Literal["admit_member"] = "admit_member"
    node_id: NodeId


class RemoveMember(_Command):
    """Revoke a member: its messages are dropped from now on and it cannot join again."""

    kind: Literal["remove_member"] = "remove_member"
    node_id: NodeId


Command = Annotated[
    ForgetNode | PlaceModel | DeleteInstance | AdmitMember | RemoveMember,
    Field(discriminator="kind"),
]


class CommandResult(Message):
    """The master's answer to a command sent by request: done, or why not."""

    ok: bool
    message: str = ""
    index: int = 0  # the log index that records the outcome (wait for it to read the result)
    not_master: bool = False  # asked a node that is not (or no longer) the master: ask again

    @classmethod
    def not_the_master(cls) -> "CommandResult":
        return cls(ok=False, message="this node is not the master", not_master=True)
