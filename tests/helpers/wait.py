"""Polling for tests that watch real processes: a condition, a deadline, a readable failure."""

import time
from collections.abc import Callable


def until(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.1) -> float:
    """Poll until condition() is true; the seconds it took. Errors while polling count as false
    (a node still starting, or just killed); the last one is named if the deadline passes."""
    start = time.monotonic()
    last_error: Exception | None = None
    while time.monotonic() - start < timeout:
        try:
            if condition():
                return time.monotonic() - start
            last_error = None
        except Exception as exc:  # see the docstring
            last_error = exc
        time.sleep(poll)
    why = f" (the last poll raised {type(last_error).__name__}: {last_error})" if last_error else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{why}")
