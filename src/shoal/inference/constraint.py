"""What constrained decoding asks of the scheduler: which tokens may come next, per request.

A `Constraint` lives on the API node beside the request's prompt and tokens (never on a stage),
so a failover replay keeps it as it is. Before each step that samples for the request the
scheduler asks `allowed()`; the mask travels with the step to the last stage, which sets every
other token's logit to -inf before it samples; the sampled token is then fed back with
`advance()`. A request of `n` choices makes one constraint per choice from its factory.
"""

from collections.abc import Callable
from typing import Protocol

import numpy as np


class Constraint(Protocol):
    """One choice's grammar state (llguidance's matcher, or a test's stand-in)."""

    def allowed(self) -> np.ndarray | None:
        """The tokens that may come next as a bitmask: uint32 [ceil(vocab / 32)], bit i of word
        w set when token 32 w + i is allowed; None when any token may."""
        ...

    def advance(self, token: int) -> None:
        """Take the token sampled under the last mask."""
        ...

    @property
    def finished(self) -> bool:
        """Whether the grammar is complete and nothing more may be generated."""
        ...


ConstraintFactory = Callable[[], Constraint]
