"""From raw topic payloads to typed handlers: decode once, route by body kind, drop the rest."""

from collections.abc import Callable
from typing import Any

from shoal.net.codec import Decoder
from shoal.net.transport import TOPICS, Topic, Transport
from shoal.types.ids import NodeId
from shoal.types.wire import Campaign, CommandMessage, GlobalEvent, LocalEvent

# Which body kind each topic may carry; anything else on a topic is dropped.
_EXPECTED: dict[Topic, type] = {
    "global_events": GlobalEvent,
    "local_events": LocalEvent,
    "commands": CommandMessage,
    "election_messages": Campaign,
}


class Dispatcher:
    """Subscribes to every topic and calls handler(sender, body) for well-formed messages."""

    def __init__(self, transport: Transport, decoder: Decoder) -> None:
        self._decoder = decoder
        self._handlers: dict[type, Callable[[NodeId, Any], None]] = {}
        for topic in TOPICS:
            transport.subscribe(topic, self._receiver(topic))

    def on(self, kind: type, handler: Callable[[NodeId, Any], None]) -> None:
        self._handlers[kind] = handler

    def _receiver(self, topic: Topic) -> Callable[[bytes], None]:
        expected = _EXPECTED[topic]

        def receive(payload: bytes) -> None:
            envelope = self._decoder.decode(payload)
            if envelope is None:
                return
            body = envelope.body
            if not isinstance(body, expected):
                self._decoder.reject(envelope.sender, f"a {body.kind} message on {topic}")
                return
            handler = self._handlers.get(expected)
            if handler is not None:
                handler(envelope.sender, body)

        return receive
