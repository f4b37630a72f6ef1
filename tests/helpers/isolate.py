"""A native engine's tests run in a child pytest, so a crash there is one failed test here.

llama.cpp and MLX are native code: a build for another CPU dies with SIGSEGV or SIGILL instead of
raising, and in the test process that would end the whole run. So `test_<engine>_engine.py`
holds one test that runs the real ones (`<engine>_cases.py`, a name pytest does not collect by
itself) in a child and reads its exit status.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TAIL_CHARS = 8000  # of the child's output, shown when it fails


def _text(out: str | bytes | None) -> str:
    if isinstance(out, bytes):
        return out.decode("utf-8", errors="replace")
    return out or ""


IN_CHILD = "SHOAL_TEST_NATIVE_HERE"  # set in the child: native engines may run in this process


def native_here() -> bool:
    """Whether this process is such a child (tests elsewhere leave native engines to one)."""
    return os.environ.get(IN_CHILD) == "1"


def run_in_child(cases: str, engine: str, timeout_s: float, *, select: str | None = None) -> None:
    """Run the tests in `cases` (a path from the repo root; `select` a -k expression) in a
    child pytest.

    Fails with the child's output: "<engine> died with SIGSEGV" when a signal killed it, and
    likewise when it failed, collected nothing (exit 5) or ran past timeout_s (then killed).
    Skips when every test there skipped.
    """
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", cases]
    if select is not None:
        cmd += ["-k", select]
    env = {**os.environ, IN_CHILD: "1"}
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=env
        )
    except subprocess.TimeoutExpired as e:
        out = (_text(e.stdout) + _text(e.stderr))[-TAIL_CHARS:]
        pytest.fail(f"{engine} tests ran past {timeout_s:g} s and were killed:\n{out}", False)
    out = (done.stdout + done.stderr)[-TAIL_CHARS:]
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        pytest.fail(f"{engine} died with {name} (the tests in {cases}):\n{out}", False)
    if done.returncode != 0:
        pytest.fail(f"{engine} tests failed in a child (exit {done.returncode}):\n{out}", False)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if " passed" not in summary:
        pytest.skip(f"{cases}: {summary}")
