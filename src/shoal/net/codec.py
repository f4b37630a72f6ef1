"""Envelopes to bytes and back: signed by the sender, checked, and dropped (logged once) if bad.

`Sealer.seal(body)` makes this node's envelope and signs it: Ed25519, by the node's identity key,
over the envelope's compact JSON without the `sig` field (`canonical`). `Decoder.decode` checks
the cheap things first (size, JSON, protocol version, cluster) so that a peer speaking a newer
protocol, whose bodies we may not know, is reported as a version mismatch and not as garbage; then
the body's types and bounds; then the signature against the key inside the sender's node id; then
whether the sender is a member this node trusts. Each (sender, reason) is logged at WARNING the
first time, then at DEBUG: a misbehaving peer cannot flood the log.
"""

import base64
import binascii
import json
import logging
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from shoal.net.identity import Identity, key_in_id
from shoal.types.ids import NodeId
from shoal.types.wire import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Body, Envelope

log = logging.getLogger(__name__)

UNKNOWN_SENDER = "unknown"

Trusts = Callable[[NodeId], bool]  # is this node a member whose messages we take?
# The public key of a node id: inside the id itself for real nodes (key_in_id); in-process test
# clusters with readable ids pass a directory.
Keys = Callable[[NodeId], Ed25519PublicKey | None]


def canonical(envelope: Envelope) -> bytes:
    """The bytes a signature covers: the envelope's compact JSON without `sig`."""
    return envelope.model_dump_json(exclude={"sig"}).encode("utf-8")


def encode(envelope: Envelope) -> bytes:
    """Compact JSON of an envelope (as it is: seal() signs it)."""
    return envelope.model_dump_json().encode("utf-8")


class Sealer:
    """Makes this node's signed envelopes for one cluster."""

    def __init__(self, identity: Identity, cluster: str) -> None:
        self.identity = identity
        self.cluster = cluster

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id

    def envelope(self, body: Body) -> Envelope:
        """body in a signed envelope from this node."""
        unsigned = Envelope(
            v=PROTOCOL_VERSION, cluster=self.cluster, sender=self.node_id, body=body
        )
        sig = base64.b64encode(self.identity.sign(canonical(unsigned))).decode("ascii")
        return unsigned.model_copy(update={"sig": sig})

    def seal(self, body: Body) -> bytes:
        """The bytes of body in a signed envelope from this node."""
        return encode(self.envelope(body))


class Decoder:
    """Bytes → Envelope for one cluster; None for anything we must ignore."""

    def __init__(self, cluster: str, trusts: Trusts, keys: Keys = key_in_id) -> None:
        self.cluster = cluster
        self._trusts = trusts
        self._keys = keys
        self._warned: set[tuple[str, str]] = set()

    def decode(self, payload: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Envelope | None:
        """The envelope in payload, or None (oversized, not JSON, other version/cluster, bad,
        unsigned or wrongly signed, or from a node that is not a trusted member)."""
        if len(payload) > max_bytes:
            self._drop(
                UNKNOWN_SENDER,
                "oversized",
                f"dropping a {len(payload)}-byte message (limit {max_bytes})",
            )
            return None
        try:
            raw = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._drop(UNKNOWN_SENDER, "malformed", f"dropping a message that is not JSON: {exc}")
            return None
        if not isinstance(raw, dict):
            self._drop(UNKNOWN_SENDER, "malformed", "dropping a message that is not a JSON object")
            return None
        sender = raw.get("sender")
        who = sender[:64] if isinstance(sender, str) and sender else UNKNOWN_SENDER
        version = raw.get("v")
        if version != PROTOCOL_VERSION:
            self._drop(
                who,
                "version",
                f"peer {who} speaks shoal protocol v{version}, this node v{PROTOCOL_VERSION}: "
                "ignoring it",
            )
            return None
        cluster = raw.get("cluster")
        if cluster != self.cluster:
            self._drop(
                who,
                "cluster",
                f"peer {who} is in cluster {cluster!r}, this node in {self.cluster!r}: ignoring it",
            )
            return None
        try:
            # Validate from the bytes, not the parsed dict: strict mode accepts JSON's forms
            # (e.g. enums and tuples as JSON values) only in JSON mode.
            envelope = Envelope.model_validate_json(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            self._drop(
                who,
                "invalid",
                f"dropping an invalid message from {who} ({exc.error_count()} errors; "
                f"first at {where or 'top'}: {first['msg']})",
            )
            return None
        if not self._signed_by_sender(envelope):
            self._drop(who, "signature", f"dropping a message from {who} not signed by {who}")
            return None
        if not self._trusts(envelope.sender):
            self._drop(
                who, "stranger", f"dropping a message from {who}: not a member of this cluster"
            )
            return None
        return envelope

    def reject(self, sender: str, reason: str) -> None:
        """Log a valid message the caller refuses (e.g. on the wrong topic), once per reason."""
        self._drop(sender, reason, f"ignoring {reason} from peer {sender}")

    def _drop(self, sender: str, reason: str, message: str) -> None:
        """Log a drop: WARNING the first time per (sender, reason), DEBUG after."""
        key = (sender, reason)
        if key in self._warned or len(self._warned) > 10_000:
            log.debug("%s", message)
        else:
            self._warned.add(key)
            log.warning("%s", message)

    def _signed_by_sender(self, envelope: Envelope) -> bool:
        """Whether envelope.sig is the sender's key's signature over the canonical bytes."""
        key = self._keys(envelope.sender)
        try:
            sig = base64.b64decode(envelope.sig, validate=True)
            if key is None or len(sig) != 64:
                return False
            key.verify(sig, canonical(envelope))
        except (binascii.Error, ValueError, InvalidSignature):
            return False
        return True
