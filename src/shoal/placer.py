"""The master's placer: which cards can run at all, and where placement would put one.

The Master takes a Placer (`master.Placer`) in its constructor; this module builds the one a
node uses, from the model catalog and the replicated state. ClusterService reads the same rules
to tell the API whether a model could run before anything is placed.
"""

from shoal.master import Placer
from shoal.models.catalog import Catalog
from shoal.placement.place import NoFit, place
from shoal.profile.links import hop_seconds
from shoal.state.model import State
from shoal.types.commands import PlaceModel
from shoal.types.ids import InstanceId
from shoal.types.instance import Instance
from shoal.types.model_card import ModelCard
from shoal.types.model_config import ARCHITECTURES
from shoal.types.profile import NodeProfile


def profiles_of(state: State) -> list[NodeProfile]:
    """Profiles of the nodes that are connected now."""
    return [r.profile for r in state.nodes.values() if r.connected and r.profile is not None]


def why_not_runnable(card: ModelCard) -> str | None:
    """A reason no engine here can run the model at all, or None."""
    if card.architecture not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        return f"architecture {card.architecture} is not supported yet (supported: {supported})"
    if not any(w.format in ("gguf", "safetensors", "mlx") for w in card.weights):
        return f"no engine here reads its {card.weights[0].format if card.weights else ''} weights"
    return None


def why_unplaceable(card: ModelCard, state: State) -> str | None:
    """A reason an instance of the model cannot be placed on the connected nodes now, or None."""
    if (reason := why_not_runnable(card)) is not None:
        return reason
    found = place(card, profiles_of(state), instance_id=InstanceId("preview"))
    return found.reason if isinstance(found, NoFit) else None


def make_placer(catalog: Catalog) -> Placer:
    """The master's placer: the card from the catalog, the profiles from the state."""

    def placer(command: PlaceModel, state: State) -> Instance | str:
        card = command.card or catalog.get(command.model_id)
        if (reason := why_not_runnable(card)) is not None:
            return reason
        usable = [p for p in profiles_of(state) if p.node_id not in command.avoid]
        found = place(
            card,
            usable,
            links=hop_seconds(usable),
            policy=command.policy,
            overrides=command.layers,
            engine=command.engine,
            instance_id=command.instance_id,
        )
        if isinstance(found, NoFit):
            return found.reason
        return found.instance.model_copy(update={"card": command.card, "avoid": command.avoid})

    return placer
