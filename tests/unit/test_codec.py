"""The wire codec: signed round trip; bad, unsigned, forged and strangers' payloads dropped."""

import base64
import json
import logging

import pytest

from shoal.net.codec import Decoder, Sealer, canonical, encode
from shoal.net.identity import Identity
from shoal.types.events import MAX_TERM
from shoal.types.ids import NodeId
from shoal.types.wire import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Campaign, Envelope

ME = Identity.generate()
PEER = Identity.generate()
STRANGER = Identity.generate()  # a valid key, but not a member
MEMBERS = {ME.node_id, PEER.node_id}


def trusts(node_id: NodeId) -> bool:
    return node_id in MEMBERS


def decoder() -> Decoder:
    return Decoder("home", trusts)


def _campaign(who: Identity = PEER, **changes: object) -> Campaign:
    fields: dict[str, object] = {
        "node_id": who.node_id,
        "term": 3,
        "last_index": 10,
        "last_term": 2,
        "started_at": 1.5,
    }
    return Campaign(**(fields | changes))  # type: ignore[arg-type]


def _campaign_json(**changes: object) -> dict[str, object]:
    """A campaign as JSON with fields set past what the type allows (as a forger would)."""
    return json.loads(_campaign().model_dump_json()) | changes


def _envelope(cluster: str = "home", who: Identity = PEER) -> Envelope:
    return Sealer(who, cluster).envelope(_campaign(who))


def _raw(who: Identity = PEER, resign: bool = True, **changes: object) -> bytes:
    """A payload with top-level fields changed, signed again by `who` unless resign is False."""
    data = json.loads(encode(_envelope(who=who)))
    data.update(changes)
    if resign:
        data.pop("sig")
        unsigned = json.dumps(data, separators=(",", ":")).encode()
        data["sig"] = base64.b64encode(who.sign(unsigned)).decode()
    return json.dumps(data).encode()


def test_round_trip_is_compact_signed_json() -> None:
    envelope = _envelope()
    payload = encode(envelope)
    assert b" " not in payload and envelope.sig
    assert PEER.verify(canonical(envelope), base64.b64decode(envelope.sig))
    assert decoder().decode(payload) == envelope


BAD = {
    "oversized": b" " * (MAX_MESSAGE_BYTES + 1),
    "not json": b"\xff\xfe not json",
    "not an object": b"[1, 2, 3]",
    "future version": _raw(v=PROTOCOL_VERSION + 1),
    "other cluster": _raw(cluster="work"),
    "invalid body": _raw(body={"kind": "campaign", "node_id": PEER.node_id}),
    "unknown kind": _raw(body={"kind": "gossip"}),
    "extra field": _raw(extra=1),
    "unsigned": _raw(resign=False, sig=""),
    "signature not base64": _raw(resign=False, sig="!!!"),
    "changed after signing": _raw(
        resign=False, body=json.loads(_campaign(term=4).model_dump_json())
    ),
    "claims another sender": _raw(resign=False, sender=ME.node_id),
    "signed by a stranger as a member": Sealer(STRANGER, "home")
    .seal(_campaign())
    .replace(STRANGER.node_id.encode(), PEER.node_id.encode()),
    "a stranger's own message": Sealer(STRANGER, "home").seal(_campaign(STRANGER)),
    "a sender that is not a key": _raw(resign=False, sender="12D3KooWnotakey"),
    "term 2**63-1": _raw(body=_campaign_json(term=2**63 - 1)),
    "term past the bound": _raw(body=_campaign_json(term=MAX_TERM + 1)),
    "index past the bound": _raw(body=_campaign_json(last_index=2**60)),
    "start time not finite": _raw(body=_campaign_json(started_at=float("inf"))),
}


def test_the_bounded_values_are_still_fine() -> None:
    assert decoder().decode(Sealer(PEER, "home").seal(_campaign(term=MAX_TERM))) is not None


@pytest.mark.parametrize("payload", BAD.values(), ids=BAD.keys())
def test_bad_payloads_are_dropped_and_logged_once(
    payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    d = decoder()
    with caplog.at_level(logging.DEBUG, logger="shoal.net.codec"):
        assert d.decode(payload) is None
        assert d.decode(payload) is None
        assert d.decode(payload) is None
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_a_future_version_is_a_version_mismatch_even_with_unknown_bodies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    payload = _raw(v=3, body={"kind": "something_new_in_v3", "x": 1})
    with caplog.at_level(logging.WARNING, logger="shoal.net.codec"):
        assert decoder().decode(payload) is None
    assert caplog.messages == [
        f"peer {PEER.node_id} speaks shoal protocol v3, this node v{PROTOCOL_VERSION}: ignoring it"
    ]


def test_logged_once_per_sender_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    d = decoder()
    with caplog.at_level(logging.WARNING, logger="shoal.net.codec"):
        for _ in range(3):
            d.decode(_raw(v=3))
            d.decode(_raw(ME, v=3))
            d.decode(_raw(cluster="work"))
    assert len(caplog.records) == 3  # two senders x version, one x cluster


def test_other_cluster_is_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="shoal.net.codec"):
        assert decoder().decode(_raw(cluster="work")) is None
    assert "'work'" in caplog.text and "'home'" in caplog.text


def test_a_stranger_is_named_as_not_a_member(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="shoal.net.codec"):
        assert decoder().decode(Sealer(STRANGER, "home").seal(_campaign(STRANGER))) is None
    assert caplog.messages == [
        f"dropping a message from {STRANGER.node_id}: not a member of this cluster"
    ]


def test_a_good_message_after_bad_ones_still_decodes() -> None:
    d = decoder()
    for payload in BAD.values():
        assert d.decode(payload) is None
    assert d.decode(encode(_envelope())) == _envelope()


def test_reject_logs_once_per_sender_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    d = decoder()
    with caplog.at_level(logging.DEBUG, logger="shoal.net.codec"):
        d.reject(PEER.node_id, "a campaign message on global_events")
        d.reject(PEER.node_id, "a campaign message on global_events")
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG]
    assert caplog.messages[0] == (
        f"ignoring a campaign message on global_events from peer {PEER.node_id}"
    )
