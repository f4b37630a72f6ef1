"""Commands: imperative requests any node sends the master, which turns them into events."""

from typing import Literal

from pydantic import BaseModel, ConfigDict

from shoal.types.ids import NodeId


class _Command(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class ForgetNode(_Command):
    """Remove a lost node from the cluster state."""

    kind: Literal["forget_node"] = "forget_node"
    node_id: NodeId


# One command so far; with the next it becomes a discriminated union on `kind`.
Command = ForgetNode
