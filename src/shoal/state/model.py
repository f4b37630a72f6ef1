"""The replicated cluster State: what every node knows after applying the same log entries.

Two nodes that applied the same entries hold byte-identical `model_dump_json()`: nothing here reads
a clock, and every mapping is kept sorted by key (later issues add instances and runners the same
way: one more sorted dict field each).
"""

from typing import TypeVar

from pydantic import Field, field_validator

from shoal.types.events import MAX_INDEX, MAX_TERM
from shoal.types.ids import InstanceId, NodeId
from shoal.types.instance import Instance
from shoal.types.message import Message
from shoal.types.profile import NodeProfile
from shoal.types.runner import RunnerStatus

K = TypeVar("K", bound=str)
V = TypeVar("V")


class _Frozen(Message):
    pass


class NodeRecord(_Frozen):
    """One node as the cluster knows it: its latest profile and whether it is reachable now."""

    node_id: NodeId
    profile: NodeProfile | None = None
    connected: bool = True
    lost_reason: str | None = None  # why it was lost; None while connected
    joined_index: int = Field(ge=0)  # log index of the entry that last made it connected


class RunnerRecord(_Frozen):
    """One stage runner of an instance: where it runs, how it is doing, where to send data."""

    node_id: NodeId
    status: RunnerStatus
    data_addr: str | None = None


class InstanceRecord(_Frozen):
    """A placed instance and the latest status of each of its stages' runners."""

    instance: Instance
    runners: dict[int, RunnerRecord] = Field(default_factory=dict)  # by stage index

    @property
    def ready(self) -> bool:
        """Every stage has a Ready runner with an address."""
        return len(self.runners) == len(self.instance.stages) and all(
            r.status.kind == "ready" and r.data_addr for r in self.runners.values()
        )

    def stage_addrs(self) -> list[str]:
        return [self.runners[i].data_addr or "" for i in range(len(self.instance.stages))]


class State(_Frozen):
    """The cluster as of log entry `index` (0: nothing applied yet), ordered by master `term`."""

    index: int = Field(default=0, ge=0, le=MAX_INDEX)
    term: int = Field(default=0, ge=0, le=MAX_TERM)
    master: NodeId | None = None
    master_quorum: bool = True  # the master was elected seeing a majority of the known nodes
    nodes: dict[NodeId, NodeRecord] = Field(default_factory=dict)
    instances: dict[InstanceId, InstanceRecord] = Field(default_factory=dict)
    members: tuple[NodeId, ...] = ()  # nodes certified by the cluster CA, sorted
    revoked: tuple[NodeId, ...] = ()  # removed members, for good, sorted

    def trusts(self, node_id: NodeId) -> bool:
        """Whether node_id is a member that was not removed."""
        return node_id in self.members and node_id not in self.revoked

    @field_validator("nodes")
    @classmethod
    def _sorted_nodes(cls, nodes: dict[NodeId, NodeRecord]) -> dict[NodeId, NodeRecord]:
        for key, record in nodes.items():
            if key != record.node_id:
                raise ValueError(f"nodes[{key!r}] holds the record of {record.node_id!r}")
        return sorted_by_key(nodes)

    @field_validator("instances")
    @classmethod
    def _sorted_instances(
        cls, instances: dict[InstanceId, InstanceRecord]
    ) -> dict[InstanceId, InstanceRecord]:
        return sorted_by_key(instances)


def sorted_by_key(mapping: dict[K, V]) -> dict[K, V]:
    """A copy of `mapping` in key order, so the JSON of equal states is equal byte for byte."""
    return dict(sorted(mapping.items()))
