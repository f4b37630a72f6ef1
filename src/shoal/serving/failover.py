"""The failover decision (pure): after a chain broke, what the API node does next.

Given the state, the model, the broken chain's stage addresses, how long ago it broke and
whether this node already asked for a re-placement, `next_chain` says: use one of these ready
instances, ask the master to place one, wait, or give up. ClusterService drives it in a loop
(connecting, placing, waiting for the state); nothing here does I/O or reads a clock.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from shoal.placer import why_unplaceable
from shoal.state.model import InstanceRecord, State
from shoal.types.model_card import ModelCard

SAME_CHAIN_AFTER_S = 3.0  # a broken chain may be retried as is after this (a transient break)


@dataclass(frozen=True)
class Use:
    """Connect to these ready instances, in this order; the first that answers serves."""

    records: tuple[InstanceRecord, ...]


@dataclass(frozen=True)
class Place:
    """No instance of the model is left: ask the master to place one."""


@dataclass(frozen=True)
class Wait:
    """Nothing to use yet: wait for the state to change, or at most this long (None: no cap)."""

    at_most_s: float | None = None


@dataclass(frozen=True)
class GiveUp:
    """No instance can come back: the request fails with this reason."""

    reason: str


Decision = Use | Place | Wait | GiveUp


def next_chain(
    state: State, card: ModelCard, broken: Sequence[str], elapsed_s: float, *, placed: bool
) -> Decision:
    """What to do `elapsed_s` after the chain at `broken` (stage 0 first) broke.

    A ready instance on other stages is used at once (the master re-placed it, or a worker
    restarted a crashed runner on a new port); the broken chain itself only after
    SAME_CHAIN_AFTER_S, in case the break was transient. With no instance of the model left,
    one is placed (once), unless placement says it cannot fit.
    """
    records = [r for r in state.instances.values() if r.instance.model_id == card.id]
    ready = [r for r in records if r.ready]
    fresh = [r for r in ready if r.stage_addrs() != list(broken)]
    if fresh:
        return Use(tuple(fresh))
    if ready and elapsed_s > SAME_CHAIN_AFTER_S:
        return Use(tuple(ready))
    if not records and not placed:
        reason = why_unplaceable(card, state)
        return Place() if reason is None else GiveUp(f"cannot be re-placed: {reason}")
    if ready:  # only the broken chain, not yet worth a retry
        return Wait(SAME_CHAIN_AFTER_S - elapsed_s)
    return Wait()
