"""Real hosts in network namespaces: multicast discovery, static peers, a pulled cable (root)."""

from pathlib import Path

import pytest

from tests.helpers.netns import Host, Lan, why_not_supported
from tests.helpers.wait import until

_reason = why_not_supported()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(_reason is not None, reason=_reason or ""),
]


def one_cluster(hosts: list[Host]) -> bool:
    states = [h.get("/state") for h in hosts]
    return (
        len({str(s) for s in states}) == 1
        and states[0]["master"] is not None
        and len(states[0]["nodes"]) == len(hosts)
        and all(r["connected"] for r in states[0]["nodes"].values())
    )


def test_multicast_static_peers_and_a_pulled_cable(lan: Lan, tmp_path: Path) -> None:
    four = [lan.add_host() for _ in range(4)]
    four[0].found_cluster(tmp_path / "h0", ["--discovery", "multicast"])
    for i, host in enumerate(four[1:], start=1):
        host.join(four[0], tmp_path / f"h{i}", ["--discovery", "multicast"])
    until(lambda: one_cluster(four), 60, "four hosts to find each other by multicast")

    fifth = lan.add_host()  # multicast off: it knows only the first host
    fifth.join(four[0], tmp_path / "h5", ["--peers", f"{four[0].ip}:52416"])
    everyone = [*four, fifth]
    until(lambda: one_cluster(everyone), 60, "the fifth host to join through its one peer")

    cut = everyone[2]
    cut.unplug()
    rest = [h for h in everyone if h is not cut]
    until(lambda: one_cluster_without(rest, cut), 30, "the others to see the cut host as lost")
    cut.plug()
    until(lambda: one_cluster(everyone), 60, "one cluster again after the cable is back")
    # one log everywhere (a profile entry may be on its way to some hosts: let it arrive)
    until(lambda: len({str(h.get("/log")["entries"]) for h in everyone}) == 1, 10, "one log")
    masters = {h.get("/state")["master"] for h in everyone}
    assert len(masters) == 1


def one_cluster_without(hosts: list[Host], gone: Host) -> bool:
    states = [h.get("/state") for h in hosts]
    gone_id = gone_ids(states, gone)
    return (
        len({str(s) for s in states}) == 1
        and gone_id is not None
        and not states[0]["nodes"][gone_id]["connected"]
    )


def gone_ids(states: list[dict], gone: Host) -> str | None:
    for node_id, record in states[0]["nodes"].items():
        profile = record.get("profile") or {}
        if profile.get("api_url", "").startswith(f"http://{gone.ip}:"):
            return str(node_id)
    return None
