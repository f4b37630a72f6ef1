"""Manual placements: `"node-a:0-12,node-b:12-30"`, validated and then honoured exactly.

Each item is NODE:START-END; NODE is a node id or a unique prefix of one, and the ranges are
half-open [START, END) and must tile [0, layers) in the order given, with no gap or overlap.
Every check fails with a `BadRequest` that says what is wrong and where; `place` turns it into a
`NoFit`. Memory is checked by `place`, which knows the nodes.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

from shoal.errors import BadRequest
from shoal.types.ids import NodeId

_ITEM = re.compile(r"(?P<node>.+):(?P<start>\d+)-(?P<end>\d+)")


@dataclass(frozen=True)
class Override:
    """Layers [start, end) on the node whose id is, or uniquely starts with, `node`."""

    node: str
    start: int
    end: int

    def __str__(self) -> str:
        return f"{self.node}:{self.start}-{self.end}"


Overrides = str | Sequence[Override | tuple[str, int, int]]


def parse_overrides(spec: Overrides) -> list[Override]:
    """The overrides in order, from the NODE:START-END,... text or a parsed list."""
    if not isinstance(spec, str):
        return [o if isinstance(o, Override) else Override(*o) for o in spec]
    items = [item.strip() for item in spec.split(",")]
    out = []
    for item in items:
        match = _ITEM.fullmatch(item)
        if match is None:
            raise BadRequest(f"override {item!r} is not NODE:START-END", param="overrides")
        out.append(Override(match["node"], int(match["start"]), int(match["end"])))
    return out


def resolve_node(name: str, known: Sequence[NodeId]) -> NodeId:
    """The node `name` means: an exact id, else the one id it is a prefix of."""
    if name in known:
        return NodeId(name)
    matches = sorted(n for n in known if n.startswith(name))
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise BadRequest(f"{name!r} is ambiguous: {', '.join(matches)}", param="overrides")
    listed = ", ".join(sorted(known)) or "none"
    raise BadRequest(f"no node {name!r} (nodes: {listed})", param="overrides")


def check_tiling(overrides: Sequence[Override], n_layers: int) -> None:
    """Raise unless the ranges tile [0, n_layers) in order with no gap or overlap."""
    if not overrides:
        raise BadRequest("no overrides given", param="overrides")
    at, previous = 0, None
    for o in overrides:
        if o.end <= o.start:
            raise BadRequest(f"override {o} is empty (ranges are [start, end))", param="overrides")
        if o.start > at:
            where = f"between {previous} and {o}" if previous else f"before {o}"
            raise BadRequest(f"layers {at}-{o.start} are not assigned ({where})", param="overrides")
        if o.start < at:
            assert previous is not None
            raise BadRequest(
                f"{o} overlaps {previous} at layers {o.start}-{min(at, o.end)}", param="overrides"
            )
        if o.end > n_layers:
            raise BadRequest(f"{o} runs past the model's {n_layers} layers", param="overrides")
        at, previous = o.end, o
    if at < n_layers:
        raise BadRequest(
            f"layers {at}-{n_layers} are not assigned (the overrides end at {at}, "
            f"the model has {n_layers} layers)",
            param="overrides",
        )
