"""Real hosts in network namespaces join by invitation; a host without a token stays out (root)."""

import time
from pathlib import Path

import pytest

from tests.helpers.netns import Host, Lan, why_not_supported
from tests.helpers.wait import until

_reason = why_not_supported()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(_reason is not None, reason=_reason or ""),
]


def members(host: Host) -> list[str]:
    return list(host.get("/state")["members"])


def test_three_hosts_join_with_tokens_and_a_fourth_without_one_stays_out(
    lan: Lan, tmp_path: Path
) -> None:
    three = [lan.add_host() for _ in range(3)]
    flags = ["--discovery", "multicast"]  # even finding them on the LAN does not let it in
    three[0].found_cluster(tmp_path / "h1", flags)
    for i, host in enumerate(three[1:], start=2):
        host.join(three[0], tmp_path / f"h{i}", [*flags, "--peers", f"{three[0].ip}:52416"])
    until(
        lambda: (
            len({str(h.get("/state")) for h in three}) == 1
            and len(members(three[0])) == 3
            and all(r["connected"] for r in three[0].get("/state")["nodes"].values())
        ),
        60,
        "three hosts in one cluster",
    )

    fourth = lan.add_host()  # knows the cluster's name and where it is, has no token
    fourth.start_node(tmp_path / "h4", [*flags, "--peers", f"{three[0].ip}:52416"])
    until(lambda: fourth.get("/healthz")["status"] == "ok", 60, "the fourth host to run")
    intruder = fourth.get("/node_id")
    time.sleep(3.0)  # several leases and election rounds
    for host in three:
        state = host.get("/state")
        assert intruder not in state["nodes"] and intruder not in state["members"]
    outside = fourth.get("/state")
    assert set(outside["nodes"]) <= {intruder}  # it saw nobody
    assert len({str(h.get("/state")) for h in three}) == 1
