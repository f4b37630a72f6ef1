"""Previews: every sensible way to place a model, with its predicted speed or why it does not fit.

The options are what `place` would choose under each policy, each usable node alone, and (for up
to four usable nodes) every subset of two or more, split by speed in rank order. An option that
does not fit still shows the split it would use and the bytes each node would need, with the
reason. Fitting options come first, fastest (one request in flight) first; then the rest in the
order above. Options that come out the same are listed once, with every policy that picks them.
"""

from itertools import combinations
from typing import Any

from shoal.placement.memory import MemoryModel, fmt_bytes, memory_model
from shoal.placement.place import choose
from shoal.placement.plans import (
    Candidate,
    Plan,
    Profiles,
    native_runs,
    over_memory,
    split,
    survey,
)
from shoal.placement.speed import DEFAULT_HOP_S, Links
from shoal.types.ids import NodeId
from shoal.types.instance import Policy, StagePlan
from shoal.types.message import Document
from shoal.types.model_card import ModelCard

MAX_SUBSET_NODES = 4  # every subset is listed only up to this many usable nodes


class Preview(Document):
    """One placement option: its stages, speed and memory, or why it does not fit."""

    label: str  # "a", "a+b": the nodes in stage order
    chosen_by: tuple[Policy, ...] = ()  # the policies whose choice this is
    nodes: tuple[NodeId, ...] = ()
    stages: tuple[StagePlan, ...] = ()
    predicted_tok_s: float | None = None  # one request in flight; None when it does not fit
    pipeline_tok_s: float | None = None  # as many requests as stages in flight
    memory_per_node: dict[NodeId, int] = {}  # bytes; for a misfit, what it would need
    fits: bool
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return self.model_dump(mode="json")


def _fitting(plan: Plan, chosen_by: tuple[Policy, ...] = ()) -> Preview:
    nodes = tuple(dict.fromkeys(s.node_id for s in plan.stages))
    return Preview(
        label="+".join(nodes),
        chosen_by=chosen_by,
        nodes=nodes,
        stages=plan.stages,
        predicted_tok_s=plan.tok_s,
        pipeline_tok_s=plan.pipeline_tok_s,
        memory_per_node=plan.memory_per_node,
        fits=True,
    )


def _option(
    mem: MemoryModel, group: tuple[Candidate, ...], links: Links | None, hop_s: float
) -> Preview | None:
    """The group split by speed, or the split it would need and why that does not fit."""
    plan = split(mem, group, links, hop_s)
    if plan is not None:
        return _fitting(plan)
    wanted = split(mem, group, links, hop_s, capped=False)
    if wanted is None:
        return None  # more nodes than layers: not a sensible option
    over = over_memory(wanted, group)
    reason = "; ".join(over) or (
        f"no split into whole layers fits (a layer needs {fmt_bytes(mem.per_layer)})"
    )
    nodes = tuple(c.node_id for c in group)
    return Preview(
        label="+".join(nodes),
        nodes=nodes,
        stages=wanted.stages,
        memory_per_node=wanted.memory_per_node,
        fits=False,
        reason=reason,
    )


def _key(p: Preview) -> tuple[object, ...]:
    return tuple((s.node_id, s.start, s.end, s.device, s.cpu_layers) for s in p.stages) or (
        p.reason,
    )


def previews(
    card: ModelCard,
    profiles: Profiles,
    *,
    links: Links | None = None,
    context: int | None = None,
    engine: str | None = None,
    sequences: int = 1,
    dtype_bytes: int = 4,
    hop_s: float = DEFAULT_HOP_S,
) -> list[Preview]:
    """Every sensible placement of `card`: fitting ones fastest first, then the misfits."""
    mem = memory_model(
        card, context=context, sequences=sequences, dtype_bytes=dtype_bytes, engine=engine
    )
    nodes = survey(profiles, mem, engine=engine, native=native_runs(card, card.quant))
    found: dict[tuple[object, ...], Preview] = {}

    def add(p: Preview) -> None:
        key = _key(p)
        if key in found:
            merged = tuple(dict.fromkeys([*found[key].chosen_by, *p.chosen_by]))
            found[key] = found[key].model_copy(update={"chosen_by": merged})
        else:
            found[key] = p

    policies: tuple[Policy, ...] = ("latency", "throughput")
    for policy in policies:
        result = choose(card.id, mem, nodes, policy, links, hop_s)
        if isinstance(result, str):
            add(Preview(label="best split", chosen_by=(policy,), fits=False, reason=result))
        else:
            add(_fitting(result, (policy,)))
    groups: list[tuple[Candidate, ...]] = [(c,) for c in nodes.ranked]
    if len(nodes.ranked) <= MAX_SUBSET_NODES:
        for k in range(2, len(nodes.ranked) + 1):
            groups += combinations(nodes.ranked, k)
    for group in groups:
        option = _option(mem, group, links, hop_s)
        if option is not None:
            add(option)
    for node_id, why in nodes.skipped.items():
        add(Preview(label=node_id, nodes=(node_id,), fits=False, reason=f"{node_id} {why}"))
    fitting = sorted((p for p in found.values() if p.fits), key=lambda p: -(p.predicted_tok_s or 0))
    return fitting + [p for p in found.values() if not p.fits]
