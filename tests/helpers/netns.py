"""Real hosts in network namespaces on one bridge (root only): an isolated LAN for tests.

Every address lives inside namespaces this helper creates; nothing leaves them. Deleting a
namespace removes its veth, so `close()` leaves no trace even after a failed test.
"""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.net.credentials import Credentials
from shoal.net.enrol import invite

SUBNET = "10.213.0"  # inside the namespaces only
ENROL_PORT = 52417  # the default: tokens name the first host's


def why_not_supported() -> str | None:
    """None when namespaces can be made here, else the reason to skip."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    if shutil.which("ip") is None:
        return "network namespace tests need iproute2's `ip`"
    if shutil.which("curl") is None:
        return "network namespace tests need curl"
    probe = subprocess.run(
        ["ip", "netns", "add", f"shoal-probe-{os.getpid()}"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"shoal-probe-{os.getpid()}"], check=False)
    return None


def sh(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Host:
    """One namespace with eth0 on the bridge, and the node process running in it."""

    ns: str
    ip: str
    bridge_port: str  # the veth end on the bridge: down = cable pulled
    bridge_ns: str
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def run(self, *cmd: str) -> str:
        return sh("ip", "netns", "exec", self.ns, *cmd)

    def get(self, path: str, port: int = 52415) -> Any:
        out = self.run("curl", "-s", "--max-time", "5", f"http://{self.ip}:{port}{path}")
        return json.loads(out)

    def start_node(self, data: Path, args: Sequence[str] = ()) -> None:
        data.mkdir(parents=True, exist_ok=True)
        self.log_path = data / "node.log"
        cmd = [
            "ip",
            "netns",
            "exec",
            self.ns,
            sys.executable,
            "-m",
            "shoal.cli",
            "node",
            "--host",
            self.ip,
            "--cluster-host",
            self.ip,
            "--data-dir",
            str(data),
            "--threads",
            "1",
            "--no-microbench",
            "--profile-interval",
            "1",
            "--lease-ms",
            "1000",
            *args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def found_cluster(self, data: Path, args: Sequence[str] = ()) -> None:
        """Start the first node of a new cluster (its credentials made first, as `shoal init`)."""
        Credentials.create(data, "default")
        self.start_node(data, args)

    def invite(self) -> str:
        """A join token from this host, the cluster's first (as `shoal invite` prints it)."""
        assert self.log_path is not None, "start the first node before inviting"
        return invite(Credentials.load(self.log_path.parent), f"{self.ip}:{ENROL_PORT}").encode()

    def join(self, first: "Host", data: Path, args: Sequence[str] = ()) -> None:
        """Start a node that joins first's cluster with a fresh token."""
        self.start_node(data, ["--join", first.invite(), *args])

    def unplug(self) -> None:
        sh("ip", "-n", self.bridge_ns, "link", "set", self.bridge_port, "down")

    def plug(self) -> None:
        sh("ip", "-n", self.bridge_ns, "link", "set", self.bridge_port, "up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass
class Lan:
    """A bridge namespace and hosts on it."""

    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    hosts: list[Host] = field(default_factory=list)

    @property
    def bridge_ns(self) -> str:
        return f"shoal-br-{self.tag}"

    def __post_init__(self) -> None:
        sh("ip", "netns", "add", self.bridge_ns)
        sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")

    def add_host(self) -> Host:
        i = len(self.hosts) + 1
        ns, port = f"shoal-h{i}-{self.tag}", f"p{i}"
        sh("ip", "netns", "add", ns)
        sh(
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            self.bridge_ns,
        )
        sh("ip", "-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
        ip = f"{SUBNET}.{i}"
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up", "multicast", "on")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        host = Host(ns, ip, port, self.bridge_ns)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            host.stop()
        for ns in [h.ns for h in self.hosts] + [self.bridge_ns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
