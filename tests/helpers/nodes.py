"""Real `shoal node` processes on loopback for integration tests; always stopped by pid."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    """A port nothing listens on right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NodeProcess:
    """One `shoal node` subprocess and where it answers."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, model: str | None, timeout: float = 120.0) -> None:
        """Until /healthz answers (and the model is loaded, if given); fails with the node's log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if model is None:
                    if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                        return
                else:
                    r = httpx.get(f"{self.url}/v1/models/{model}", timeout=2)
                    if r.status_code == 200 and r.json()["status"] == "ready":
                        return
                    if r.status_code == 200 and r.json()["status"] == "failed":
                        raise RuntimeError(f"model failed: {r.json()['reason']}\n{self.log()}")
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"node not ready after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; by pid only."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_node(tmp: Path, args: Sequence[str] = (), *, threads: int = 1) -> NodeProcess:
    """Start `shoal node` on a free port with its own data dir under tmp."""
    port = free_port()
    data = tmp / f"node-{port}"
    data.mkdir(parents=True)
    log_path = data / "node.log"
    cmd = [
        sys.executable,
        "-m",
        "shoal.cli",
        "node",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data),
        "--threads",
        str(threads),
        *args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    return NodeProcess(proc, port, log_path)
