"""The wire codec: round trip, and every kind of bad payload dropped and logged once."""

import json
import logging

import pytest

from shoal.net.codec import Decoder, encode
from shoal.types.ids import NodeId
from shoal.types.wire import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Campaign, Envelope

PEER = NodeId("12D3KooWPeer")


def _envelope(cluster: str = "home") -> Envelope:
    body = Campaign(node_id=PEER, term=3, last_index=10, last_term=2, started_at=1.5)
    return Envelope(v=PROTOCOL_VERSION, cluster=cluster, sender=PEER, body=body)


def _raw(**changes: object) -> bytes:
    data = json.loads(encode(_envelope()))
    data.update(changes)
    return json.dumps(data).encode()


def test_round_trip_is_compact_json() -> None:
    envelope = _envelope()
    payload = encode(envelope)
    assert b" " not in payload
    assert Decoder("home").decode(payload) == envelope


BAD = {
    "oversized": b" " * (MAX_MESSAGE_BYTES + 1),
    "not json": b"\xff\xfe not json",
    "not an object": b"[1, 2, 3]",
    "future version": _raw(v=PROTOCOL_VERSION + 1),
    "other cluster": _raw(cluster="work"),
    "invalid body": _raw(body={"kind": "campaign", "node_id": PEER}),
    "unknown kind": _raw(body={"kind": "gossip"}),
    "extra field": _raw(extra=1),
}


@pytest.mark.parametrize("payload", BAD.values(), ids=BAD.keys())
def test_bad_payloads_are_dropped_and_logged_once(
    payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    decoder = Decoder("home")
    with caplog.at_level(logging.DEBUG, logger="shoal.net.codec"):
        assert decoder.decode(payload) is None
        assert decoder.decode(payload) is None
        assert decoder.decode(payload) is None
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_a_future_version_is_a_version_mismatch_even_with_unknown_bodies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    payload = _raw(v=2, body={"kind": "something_new_in_v2", "x": 1})
    with caplog.at_level(logging.WARNING, logger="shoal.net.codec"):
        assert Decoder("home").decode(payload) is None
    assert caplog.messages == [
        f"peer {PEER} speaks shoal protocol v2, this node v{PROTOCOL_VERSION}: ignoring it"
    ]


def test_logged_once_per_sender_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    decoder = Decoder("home")
    with caplog.at_level(logging.WARNING, logger="shoal.net.codec"):
        for _ in range(3):
            decoder.decode(_raw(v=2))
            decoder.decode(_raw(v=2, sender="12D3KooWOther"))
            decoder.decode(_raw(cluster="work"))
    assert len(caplog.records) == 3  # two senders x version, one x cluster


def test_other_cluster_is_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="shoal.net.codec"):
        assert Decoder("home").decode(_raw(cluster="work")) is None
    assert "'work'" in caplog.text and "'home'" in caplog.text


def test_a_good_message_after_bad_ones_still_decodes() -> None:
    decoder = Decoder("home")
    for payload in BAD.values():
        assert decoder.decode(payload) is None
    assert decoder.decode(encode(_envelope())) == _envelope()


def test_reject_logs_once_per_sender_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    decoder = Decoder("home")
    with caplog.at_level(logging.DEBUG, logger="shoal.net.codec"):
        decoder.reject(PEER, "a campaign message on global_events")
        decoder.reject(PEER, "a campaign message on global_events")
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG]
    assert caplog.messages[0] == f"ignoring a campaign message on global_events from peer {PEER}"
