"""apply(state, entry) -> state: the one pure function every node runs over the same log.

One small function per event type; `apply` checks the order, dispatches, then stamps the entry's
index and term. No clock, no I/O: the same entries give the same State on every node.
"""

from collections.abc import Iterable
from typing import assert_never

from shoal.state.model import InstanceRecord, NodeRecord, RunnerRecord, State, sorted_by_key
from shoal.types.events import (
    Event,
    IndexedEvent,
    InstanceDeleted,
    InstancePlaced,
    MasterElected,
    MemberAdmitted,
    MemberRemoved,
    NodeForgotten,
    NodeJoined,
    NodeLost,
    NodeProfiled,
    RunnerStatusChanged,
)


def _put(state: State, record: NodeRecord) -> State:
    """`state` with `record` set, nodes kept sorted by id."""
    nodes = sorted_by_key({**state.nodes, record.node_id: record})
    return state.model_copy(update={"nodes": nodes})


def _node_joined(state: State, event: NodeJoined, index: int) -> State:
    """Add the node, or mark a known one connected again (keeping its last profile)."""
    old = state.nodes.get(event.node_id)
    if old is None:
        return _put(state, NodeRecord(node_id=event.node_id, joined_index=index))
    if old.connected:
        return state
    update = {"connected": True, "lost_reason": None, "joined_index": index}
    return _put(state, old.model_copy(update=update))


def _node_lost(state: State, event: NodeLost) -> State:
    """Mark the node unreachable, with why; an unknown node is ignored."""
    old = state.nodes.get(event.node_id)
    if old is None:
        return state
    return _put(state, old.model_copy(update={"connected": False, "lost_reason": event.reason}))


def _node_profiled(state: State, event: NodeProfiled, index: int) -> State:
    """Set the node's profile; a node first heard of through its profile is taken as connected."""
    node_id = event.profile.node_id
    old = state.nodes.get(node_id)
    if old is None:
        return _put(state, NodeRecord(node_id=node_id, profile=event.profile, joined_index=index))
    return _put(state, old.model_copy(update={"profile": event.profile}))


def _node_forgotten(state: State, event: NodeForgotten) -> State:
    """Remove the node's record."""
    if event.node_id not in state.nodes:
        return state
    nodes = {k: v for k, v in state.nodes.items() if k != event.node_id}
    return state.model_copy(update={"nodes": nodes})


def _master_elected(state: State, event: MasterElected) -> State:
    """Record who orders the log from now on (the term comes from the entry, as for every entry)."""
    return state.model_copy(update={"master": event.node_id, "master_quorum": event.quorum})


def _instance_placed(state: State, event: InstancePlaced) -> State:
    """Record a new instance (no runners yet)."""
    record = InstanceRecord(instance=event.instance)
    instances = sorted_by_key({**state.instances, event.instance.instance_id: record})
    return state.model_copy(update={"instances": instances})


def _instance_deleted(state: State, event: InstanceDeleted) -> State:
    """Drop the instance and its runners."""
    instances = {k: v for k, v in state.instances.items() if k != event.instance_id}
    return state.model_copy(update={"instances": instances})


def _runner_status(state: State, event: RunnerStatusChanged) -> State:
    """Set one stage runner's status; reports for unknown instances or stages are ignored."""
    record = state.instances.get(event.instance_id)
    stages = record.instance.stages if record else ()
    if record is None or event.stage >= len(stages) or stages[event.stage].node_id != event.node_id:
        return state
    runner = RunnerRecord(node_id=event.node_id, status=event.status, data_addr=event.data_addr)
    runners = dict(sorted({**record.runners, event.stage: runner}.items()))
    updated = record.model_copy(update={"runners": runners})
    return state.model_copy(update={"instances": {**state.instances, event.instance_id: updated}})


def _member_admitted(state: State, event: MemberAdmitted) -> State:
    """Add a member; a revoked node is never a member again."""
    if event.node_id in state.members or event.node_id in state.revoked:
        return state
    return state.model_copy(update={"members": tuple(sorted({*state.members, event.node_id}))})


def _member_removed(state: State, event: MemberRemoved) -> State:
    """Revoke a node (member or not): out of the members, into the revoked, lost if connected."""
    members = tuple(m for m in state.members if m != event.node_id)
    revoked = tuple(sorted({*state.revoked, event.node_id}))
    state = state.model_copy(update={"members": members, "revoked": revoked})
    record = state.nodes.get(event.node_id)
    if record is not None and record.connected:
        lost = {"connected": False, "lost_reason": f"removed: {event.reason}"}
        state = _put(state, record.model_copy(update=lost))
    return state


def _dispatch(state: State, event: Event, index: int) -> State:
    """The event's own change to the state."""
    match event:
        case NodeJoined():
            return _node_joined(state, event, index)
        case NodeLost():
            return _node_lost(state, event)
        case NodeProfiled():
            return _node_profiled(state, event, index)
        case NodeForgotten():
            return _node_forgotten(state, event)
        case MasterElected():
            return _master_elected(state, event)
        case InstancePlaced():
            return _instance_placed(state, event)
        case InstanceDeleted():
            return _instance_deleted(state, event)
        case RunnerStatusChanged():
            return _runner_status(state, event)
        case MemberAdmitted():
            return _member_admitted(state, event)
        case MemberRemoved():
            return _member_removed(state, event)
        case _:
            assert_never(event)


def apply(state: State, entry: IndexedEvent) -> State:
    """The state after `entry`, which must be the next one (index = state.index + 1)."""
    if entry.index != state.index + 1:
        raise ValueError(f"entry {entry.index} applied to a state at index {state.index}")
    after = _dispatch(state, entry.event, entry.index)
    return after.model_copy(update={"index": entry.index, "term": entry.term})


def apply_all(state: State, entries: Iterable[IndexedEvent]) -> State:
    """The state after applying `entries` in order."""
    for entry in entries:
        state = apply(state, entry)
    return state
