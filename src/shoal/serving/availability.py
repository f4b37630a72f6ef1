"""Whether each model runs here: the answer `shoal models` prints and `/v1/models` carries.

models/availability.py decides (pure); this gathers its inputs: the engines and memory the
cluster's connected nodes offer (their profiles; this machine alone when there are none), what
this machine's Hub cache holds of each source, the bytes the model needs (placement's memory
model), and whether downloads would carry a Hugging Face token.
"""

from collections.abc import Sequence
from pathlib import Path

from shoal.engines.registry import available_engines
from shoal.models.availability import Availability, availability, local_copies, machine_memory
from shoal.placement.memory import capacity, need_per_engine, offered_per_engine
from shoal.types.model_card import ModelCard
from shoal.types.model_config import ARCHITECTURES
from shoal.types.profile import NodeProfile


def hf_token() -> bool:
    """Whether downloads would carry a Hugging Face token (HF_TOKEN or a saved login)."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        return False
    return get_token() is not None


class Answers:
    """availability() for any card, against one view of the cluster (made once per listing)."""

    def __init__(self, profiles: Sequence[NodeProfile] | None, hub_root: Path) -> None:
        if profiles:
            self.engines = sorted({e for p in profiles for e in p.engines})
            self.offered = offered_per_engine(profiles, self.engines)
        else:
            self.engines = available_engines()
            room = capacity(machine_memory())
            self.offered = {e: room for e in self.engines}
        self.hub_root = hub_root
        self.token = hf_token()

    def __call__(self, card: ModelCard) -> Availability:
        return availability(
            card,
            architectures=ARCHITECTURES,
            engines=self.engines,
            local=local_copies(card, self.hub_root),
            need=need_per_engine(card, self.engines),
            memory=self.offered,
            token=self.token,
        )
