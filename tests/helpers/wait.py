"""Polling for tests that watch real processes: a condition, a deadline, a readable failure."""

import time
from collections.abc import Callable


def until(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.1) -> float:
    """Poll until condition() is true; the seconds it took. Errors while polling count as false
    (a node still starting, or just killed)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if condition():
                return time.monotonic() - start
        except Exception:  # see the docstring
            pass
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
