"""Real `shoal node` processes on loopback (benchmarks and tests); always stopped by pid."""

import os
import random
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

from shoal.net import enrol
from shoal.net.credentials import Credentials


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to connections on its own (Linux's default range
    starts at 32768; other systems' at 49152 or above)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int, avoid: int = 0) -> list[int]:
    """`count` distinct ports nothing listens on now, none equal to avoid.

    Drawn below the kernel's ephemeral range: a port the kernel picked could be given to some
    outgoing connection's local end before the node binds it, a port below the range only to
    another process that asks for it by number. Each is checked by binding it."""
    low = 10000
    high = max(low + 1000, _ephemeral_low())
    rng = random.SystemRandom()
    ports: list[int] = []
    for _ in range(1000 * count):
        port = rng.randrange(low, high)
        if port == avoid or port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise OSError(f"no {count} free ports on loopback in {low}..{high - 1}")


def free_port() -> int:
    """A port nothing listens on right now (see free_ports)."""
    return free_ports(1)[0]


@dataclass
class NodeProcess:
    """One `shoal node` subprocess: where it answers, its data dir, how to start it again."""

    data: Path
    port: int
    args: Sequence[str]
    control_port: int = 0
    threads: int | None = 1  # None: no --threads, the node shares its cores among its runners
    python: str = sys.executable
    enrol_port: int = 0
    files_port: int = 0
    env: dict[str, str] = field(default_factory=dict)  # over os.environ (HF_HUB_OFFLINE=1)
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
            # runners, zenoh and enrolment: loopback too, never this machine's LAN address
            "--cluster-host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data),
            *(["--threads", str(self.threads)] if self.threads is not None else []),
            *(["--control-port", str(self.control_port)] if self.control_port else []),
            *(["--enrol-port", str(self.enrol_port)] if self.enrol_port else []),
            *(["--files-port", str(self.files_port)] if self.files_port else []),
            *self.args,
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **self.env}
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

    def chat(self, model: str, content: str, max_tokens: int) -> dict[str, Any]:
        """One greedy, whole chat completion of one user message; the response's JSON."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        r = httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=600)
        if r.status_code != 200:
            raise RuntimeError(f"chat with {model}: {r.status_code} {r.text}")
        return dict(r.json())

    def place_here(self, model: str, timeout: float = 60.0) -> str:
        """Place the whole model on this node (`POST /instance`), once it has profiled itself;
        the new instance's id. Called twice, two instances."""
        deadline = time.monotonic() + timeout
        while not self.get("/state")["nodes"].get(self.node_id, {}).get("profile"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"node never profiled itself:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        layers = f"{self.node_id}:0-{self.get(f'/v1/models/{model}')['layers']}"
        r = httpx.post(f"{self.url}/instance", json={"model": model, "layers": layers}, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"placing {model}: {r.status_code} {r.text}")
        return str(r.json()["instance_id"])

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
    tmp: Path,
    args: Sequence[str] = (),
    *,
    threads: int | None = 1,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> NodeProcess:
    """A standalone node on a free port with its own data dir under tmp."""
    return _node_at(tmp / f"node-{(port := free_port())}", port, args, threads, python, env)


def _node_at(
    data: Path,
    port: int,
    args: Sequence[str],
    threads: int | None = 1,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> NodeProcess:
    cache = [] if "--weights-cache" in args else ["--weights-cache", str(SHARED_WEIGHTS_CACHE)]
    control, enrol_port, files_port = free_ports(3, avoid=port)
    return NodeProcess(
        data,
        port,
        [*args, *cache],
        control,
        threads,
        python,
        enrol_port=enrol_port,
        files_port=files_port,
        env=env or {},
    )


# One dequantized-weights cache for every node started here: each node's own would rewrite
# the same half gigabyte per test.
SHARED_WEIGHTS_CACHE = Path(tempfile.gettempdir()) / "shoal-shared-weights-cache"
CLUSTER_FLAGS = ["--no-microbench", "--profile-interval", "1", "--lease-ms", "1000"]


def invite(founder: NodeProcess) -> str:
    """A join token from the node that made the cluster (as `shoal invite` prints it)."""
    creds = Credentials.load(founder.data)
    return enrol.invite(creds, f"127.0.0.1:{founder.enrol_port}").encode()


def start_cluster_node(
    tmp: Path,
    peers: Sequence[NodeProcess] = (),
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> NodeProcess:
    """A node that knows `peers` statically (multicast stays off), with fast test timings.

    Without peers it makes a new cluster (its credentials first, as `shoal init` does); with
    peers it joins theirs with a token from the first of them, which must be that cluster's
    first node."""
    port = free_port()
    data = tmp / f"node-{port}"
    peer_arg = ",".join(f"127.0.0.1:{p.control_port}" for p in peers)
    if peers:
        join = ["--join", invite(peers[0])]
    else:
        Credentials.create(data, "default")
        join = []
    extra = [*CLUSTER_FLAGS, *(["--peers", peer_arg] if peer_arg else []), *join, *args]
    return _node_at(data, port, extra, env=env)
