"""Real `shoal node` processes on loopback (benchmarks and tests); always stopped by pid."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    """A port nothing listens on right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NodeProcess:
    """One `shoal node` subprocess: where it answers, its data dir, how to start it again."""

    data: Path
    port: int
    args: Sequence[str]
    control_port: int = 0
    threads: int = 1
    python: str = sys.executable
    proc: subprocess.Popen[bytes] = field(init=False)
    _node_id: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data / "node.log"

    def start(self) -> None:
        """(Re)start the process with the same ports, flags and data dir."""
        self.data.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.python,
            "-m",
            "shoal.cli",
            "node",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data),
            "--threads",
            str(self.threads),
            *(["--control-port", str(self.control_port)] if self.control_port else []),
            *self.args,
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    @property
    def node_id(self) -> str:
        """The node's id (asked once; stays the same across restarts of the same data dir)."""
        if not self._node_id:
            self._node_id = str(self.get("/node_id"))
        return self._node_id

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> Any:
        return httpx.get(f"{self.url}{path}", timeout=10).json()

    def wait_ready(self, model: str | None = None, timeout: float = 120.0) -> None:
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

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def start_node(
    tmp: Path, args: Sequence[str] = (), *, threads: int = 1, python: str = sys.executable
) -> NodeProcess:
    """A standalone node on a free port with its own data dir under tmp."""
    port = free_port()
    cache = [] if "--weights-cache" in args else ["--weights-cache", str(SHARED_WEIGHTS_CACHE)]
    return NodeProcess(tmp / f"node-{port}", port, [*args, *cache], free_port(), threads, python)


# One dequantized-weights cache for every node started here: each node's own would rewrite
# the same half gigabyte per test.
SHARED_WEIGHTS_CACHE = Path(tempfile.gettempdir()) / "shoal-shared-weights-cache"
CLUSTER_FLAGS = ["--no-microbench", "--profile-interval", "1", "--lease-ms", "1000"]


def start_cluster_node(
    tmp: Path, peers: Sequence[NodeProcess] = (), args: Sequence[str] = ()
) -> NodeProcess:
    """A node that knows `peers` statically (multicast stays off), with fast test timings."""
    peer_arg = ",".join(f"127.0.0.1:{p.control_port}" for p in peers)
    extra = [*CLUSTER_FLAGS, *(["--peers", peer_arg] if peer_arg else []), *args]
    return start_node(tmp, extra)
