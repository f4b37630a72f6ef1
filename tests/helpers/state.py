"""Builders for state tests: small NodeProfiles and logs chained like a master writes them."""

from collections.abc import Sequence
from typing import Any

from shoal.types.events import Event, IndexedEvent
from shoal.types.ids import NodeId
from shoal.types.profile import NodeProfile

GIB = 1 << 30


def profile(node_id: str, **overrides: Any) -> NodeProfile:
    """A small valid NodeProfile for `node_id`; keyword arguments replace fields."""
    fields: dict[str, Any] = {
        "node_id": NodeId(node_id),
        "hostname": f"{node_id}.local",
        "os": "Linux",
        "os_version": "6.8",
        "arch": "x86_64",
        "cpu_model": "Test CPU",
        "cpu_cores": 8,
        "ram_total": 32 * GIB,
        "ram_available": 16 * GIB,
        "engines": ("torch",),
    }
    fields.update(overrides)
    return NodeProfile(**fields)


def indexed(
    events: Sequence[Event], *, term: int = 1, after: tuple[int, int] = (0, 0)
) -> list[IndexedEvent]:
    """`events` as log entries in `term`, continuing a log whose last entry is `after`."""
    index, prev_term = after
    out = []
    for event in events:
        index += 1
        out.append(IndexedEvent(index=index, term=term, prev_term=prev_term, event=event))
        prev_term = term
    return out
