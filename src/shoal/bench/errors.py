"""What ends a `shoal bench` run early; the CLI prints it as one line and exits 1."""

from shoal.errors import ShoalError


class BenchError(ShoalError):
    """A measurement could not be taken (a request failed, a node never got ready)."""


class NodeUnreachable(BenchError):
    """No shoal node answers at a URL the user gave."""
