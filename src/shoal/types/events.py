"""Events: past-tense facts the master orders into the replicated log.

Every node applies the same IndexedEvents in the same order with one pure `apply`, so every node
holds the same State.
"""

from typing import Annotated, Literal

from pydantic import Field

from shoal.types.ids import InstanceId, NodeId
from shoal.types.instance import Instance
from shoal.types.message import Message
from shoal.types.profile import NodeProfile
from shoal.types.runner import RunnerStatus

# Terms and indexes fit JSON's exact integers (and so SQLite's INTEGER) with room to grow: a
# message claiming more is invalid and dropped, never stored or incremented past the bound.
MAX_TERM = MAX_INDEX = 2**53 - 1


class _Event(Message):
    pass


class NodeJoined(_Event):
    """A node became reachable (its liveliness token appeared)."""

    kind: Literal["node_joined"] = "node_joined"
    node_id: NodeId


class NodeLost(_Event):
    """A node stopped being reachable: closed, crashed, hung past its lease or cut off."""

    kind: Literal["node_lost"] = "node_lost"
    node_id: NodeId
    reason: str


class NodeProfiled(_Event):
    """A node's fresh profile."""

    kind: Literal["node_profiled"] = "node_profiled"
    profile: NodeProfile


class NodeForgotten(_Event):
    """A lost node removed from the state on request."""

    kind: Literal["node_forgotten"] = "node_forgotten"
    node_id: NodeId


class MasterElected(_Event):
    """The node that orders the log from this term on."""

    kind: Literal["master_elected"] = "master_elected"
    node_id: NodeId
    term: int = Field(ge=1, le=MAX_TERM)
    quorum: bool = True  # it saw a majority of the known nodes when elected


class InstancePlaced(_Event):
    """The master placed a model over stages; their nodes start runners for them."""

    kind: Literal["instance_placed"] = "instance_placed"
    instance: Instance


class InstanceDeleted(_Event):
    """An instance is gone; its runners stop."""

    kind: Literal["instance_deleted"] = "instance_deleted"
    instance_id: InstanceId
    reason: str


class RunnerStatusChanged(_Event):
    """A stage runner's lifecycle: Loading(done, total) → Ready (with its data address) | Failed."""

    kind: Literal["runner_status"] = "runner_status"
    instance_id: InstanceId
    stage: int = Field(ge=0)
    node_id: NodeId
    status: RunnerStatus
    data_addr: str | None = None


class MemberAdmitted(_Event):
    """A node holds a certificate from the cluster CA: its signed messages are taken from now on."""

    kind: Literal["member_admitted"] = "member_admitted"
    node_id: NodeId


class MemberRemoved(_Event):
    """A member is revoked for good: its messages are dropped and it cannot join again."""

    kind: Literal["member_removed"] = "member_removed"
    node_id: NodeId
    reason: str


Event = Annotated[
    NodeJoined
    | NodeLost
    | NodeProfiled
    | NodeForgotten
    | MasterElected
    | InstancePlaced
    | InstanceDeleted
    | RunnerStatusChanged
    | MemberAdmitted
    | MemberRemoved,
    Field(discriminator="kind"),
]


class IndexedEvent(Message):
    """One entry of the log: position (from 1), the master's term when it was appended, the fact."""

    index: int = Field(ge=1, le=MAX_INDEX)
    term: int = Field(ge=1, le=MAX_TERM)
    # Term of the entry at index - 1 in the master's log (0 before the first entry). A replica
    # appends only where its own last term matches, so two logs that hold the same (index, term)
    # hold the same entries up to it (Raft's log matching); StateStore.append_as_master sets it.
    prev_term: int = Field(default=0, ge=0, le=MAX_TERM)
    event: Event
