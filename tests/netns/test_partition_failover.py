"""A stage host's cable pulled mid-stream (root): the stream completes, then one master, one log."""

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.netns import Host, Lan, why_not_supported
from tests.helpers.wait import until

_reason = why_not_supported()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(_reason is not None, reason=_reason or ""),
]
MODEL = "smollm2-135m"
CLIENT = """
import json, sys, httpx
body = {"model": sys.argv[2], "stream": True, "temperature": 0, "max_tokens": 60,
        "messages": [{"role": "user", "content": "Describe a lighthouse at night."}]}
text = ""
with httpx.stream("POST", sys.argv[1] + "/v1/chat/completions", json=body, timeout=300) as r:
    for line in r.iter_lines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            chunk = json.loads(line[5:])
            if "error" in chunk:
                print(json.dumps({"error": chunk["error"]["message"]}), flush=True)
                sys.exit(1)
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content") or ""
                text += piece
                print(json.dumps({"piece": piece}), flush=True)
print(json.dumps({"done": text}), flush=True)
"""


def stream(host: Host, model: str, on_piece: Callable[[int], None] | None = None) -> str:
    """Stream a chat completion from inside host's namespace; returns the whole text."""
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            host.ns,
            sys.executable,
            "-c",
            CLIENT,
            f"http://{host.ip}:52415",
            model,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    pieces = 0
    try:
        for line in proc.stdout:
            message = json.loads(line)
            if "done" in message:
                return str(message["done"])
            if "error" in message:
                raise AssertionError(f"stream failed: {message['error']}")
            pieces += 1
            if on_piece is not None:
                on_piece(pieces)
    finally:
        proc.wait(timeout=60)
    raise AssertionError("the stream ended without its text")


def test_pulled_cable_mid_stream(lan: Lan, tmp_path: Path) -> None:
    hosts = [lan.add_host() for _ in range(3)]
    hosts[0].found_cluster(tmp_path / "h1")
    for i, host in enumerate(hosts[1:], start=2):
        host.join(hosts[0], tmp_path / f"h{i}", ["--peers", f"{hosts[0].ip}:52416"])
    until(
        lambda: (
            [
                r["connected"] and bool(r["profile"])
                for r in hosts[0].get("/state")["nodes"].values()
            ]
            == [True] * 3
        ),
        60,
        "three hosts with their profiles",
    )
    ids = {h.ip: h.get("/node_id") for h in hosts}
    stage = hosts[1]
    out = hosts[0].run(
        "curl",
        "-s",
        "-X",
        "POST",
        f"http://{hosts[0].ip}:52415/instance",
        "-H",
        "content-type: application/json",
        "-d",
        json.dumps({"model": MODEL, "layers": f"{ids[stage.ip]}:0-30"}),
    )
    assert json.loads(out)["stages"][0]["node_id"] == ids[stage.ip]
    until(
        lambda: any(i["ready"] for i in hosts[0].get("/v1/instances")["data"]),
        240,
        "the instance on the stage host",
    )
    expected = stream(hosts[0], MODEL)

    def pull_at_sixth(pieces: int) -> None:
        if pieces == 6:
            stage.unplug()

    assert stream(hosts[0], MODEL, pull_at_sixth) == expected
    stage.plug()
    until(
        lambda: (
            len({str(h.get("/log")["entries"]) for h in hosts}) == 1
            and len({h.get("/state")["master"] for h in hosts}) == 1
        ),
        60,
        "one master and identical logs after the cable is back",
    )
    # which side's master wins is settled by the election rules (tested deterministically in
    # test_cluster_memory.py); here it is enough that there is one master and one log
    assert hosts[0].get("/state")["master"] in ids.values()
