"""`shoal ...` as a user runs it: its own process, in its own process group."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def shoal(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run `shoal ...` to the end; on a timeout, the group (the command and every process it
    started: nodes, runners) is killed by its id and the test fails with the command's stderr."""
    script = Path(sys.executable).with_name("shoal")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "shoal.cli"]
    proc = subprocess.Popen(
        [*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"shoal {' '.join(args)} ran over {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
