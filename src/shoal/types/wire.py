"""What crosses the control plane: one versioned envelope per message, a tagged body per topic.

Topics (under shoal/<cluster>/): global_events (master → all: IndexedEvent), local_events (node →
master: LocalEvent), commands (any → master: CommandMessage), election_messages (all ↔ all:
Campaign). A peer speaking another protocol version is refused and logged once.
"""

from typing import Annotated, Literal

from pydantic import Field

from shoal.types.commands import Command
from shoal.types.events import MAX_INDEX, MAX_TERM, Event, IndexedEvent
from shoal.types.ids import NodeId
from shoal.types.message import Message

PROTOCOL_VERSION = 2  # 2: signed envelopes, Rpc bodies
MAX_MESSAGE_BYTES = 1 << 20  # larger messages are dropped (and logged once)
MAX_RPC_BYTES = 64 << 20  # a log reply may carry a whole snapshot
MAX_SEQ = 2**63 - 1


class _Wire(Message):
    pass


class GlobalEvent(_Wire):
    """An entry of the log, as the master publishes it."""

    kind: Literal["global_event"] = "global_event"
    entry: IndexedEvent


class LocalEvent(_Wire):
    """A fact a node reports to the master; (origin, seq) lets the master drop duplicates."""

    kind: Literal["local_event"] = "local_event"
    origin: NodeId
    seq: int = Field(ge=0, le=MAX_SEQ)
    event: Event


class CommandMessage(_Wire):
    """A command for the master; the id makes retries idempotent."""

    kind: Literal["command"] = "command"
    command_id: str = Field(max_length=128)
    command: Command


class Campaign(_Wire):
    """A node's election standing, sent when it changes and as a heartbeat.

    Candidates rank by (last_term, last_index) of their log, then seniority (earlier
    started_at), then node id: the node with the most complete log leads and keeps its log.
    """

    kind: Literal["campaign"] = "campaign"
    node_id: NodeId
    term: int = Field(ge=0, le=MAX_TERM)  # the highest term this node has seen
    last_index: int = Field(ge=0, le=MAX_INDEX)
    last_term: int = Field(ge=0, le=MAX_TERM)
    started_at: float = Field(
        ge=0, lt=1e11, allow_inf_nan=False
    )  # seconds since the epoch when the node joined; lower = more senior
    master: NodeId | None = None  # whom it follows now
    quorum: bool = False  # it is master, elected seeing a majority of the known nodes


class Rpc(_Wire):
    """A request to one node, or its reply (same name and nonce): the payload, base64."""

    kind: Literal["rpc"] = "rpc"
    name: str = Field(max_length=64)
    nonce: str = Field(max_length=64)
    reply: bool = False
    data: str  # base64


Body = Annotated[
    GlobalEvent | LocalEvent | CommandMessage | Campaign | Rpc, Field(discriminator="kind")
]


class Envelope(_Wire):
    """Every control-plane message: protocol version, cluster, sender, body, sender's signature."""

    v: int
    cluster: str
    sender: NodeId
    body: Body
    sig: str = ""  # base64 Ed25519 signature of the envelope's JSON without this field


class LogRequest(_Wire):
    """Ask a node for log entries [start, end) (end None: to its last); for gap repair."""

    start: int = Field(ge=1, le=MAX_INDEX)
    end: int | None = Field(default=None, ge=1, le=MAX_INDEX)
    limit: int = Field(default=2000, ge=1, le=10_000)
    snapshot: bool = False  # send the whole state instead (our log diverged inside a snapshot)


class LogReply(_Wire):
    """Entries from the answering node's journal, or its snapshot when they were compacted away."""

    entries: tuple[IndexedEvent, ...] = ()
    last_index: int = Field(ge=0, le=MAX_INDEX)
    snapshot_json: str | None = None  # the State at the compaction point, as JSON
