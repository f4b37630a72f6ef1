"""Envelopes to bytes and back; what a peer sends that we cannot use is dropped, logged once.

The decoder checks the cheap things first (size, JSON, protocol version, cluster) so that a peer
speaking a newer protocol, whose bodies we may not know, is reported as a version mismatch and not
as garbage. Each (sender, reason) is logged at WARNING the first time, then at DEBUG: a
misbehaving peer cannot flood the log.
"""

import json
import logging

from pydantic import ValidationError

from shoal.types.wire import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Envelope

log = logging.getLogger(__name__)

UNKNOWN_SENDER = "unknown"


def encode(envelope: Envelope) -> bytes:
    """Compact JSON of an envelope."""
    return envelope.model_dump_json().encode("utf-8")


class Decoder:
    """Bytes → Envelope for one cluster; None for anything we must ignore."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self._warned: set[tuple[str, str]] = set()

    def decode(self, payload: bytes) -> Envelope | None:
        """The envelope in payload, or None (oversized, not JSON, other version/cluster, bad)."""
        if len(payload) > MAX_MESSAGE_BYTES:
            self._drop(
                UNKNOWN_SENDER,
                "oversized",
                f"dropping a {len(payload)}-byte message (limit {MAX_MESSAGE_BYTES})",
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
        who = sender if isinstance(sender, str) and sender else UNKNOWN_SENDER
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
            return Envelope.model_validate_json(payload)
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

    def reject(self, sender: str, reason: str) -> None:
        """Log a valid message the caller refuses (e.g. on the wrong topic), once per reason."""
        self._drop(sender, reason, f"ignoring {reason} from peer {sender}")

    def _drop(self, sender: str, reason: str, message: str) -> None:
        """Log a drop: WARNING the first time per (sender, reason), DEBUG after."""
        key = (sender, reason)
        if key in self._warned:
            log.debug("%s", message)
        else:
            self._warned.add(key)
            log.warning("%s", message)
