"""The worker ↔ runner pipe: messages round-trip as JSON; bad lines are dropped, logged once."""

import logging

import pytest

from shoal.types.ids import ModelId, NodeId
from shoal.types.message import Message
from shoal.worker.pipe import (
    Revoke,
    Route,
    RunnerConfig,
    RunnerExited,
    RunnerFailed,
    RunnerLoading,
    RunnerReady,
    Stop,
    Threads,
    down_decoder,
    parse_down,
    up_decoder,
)

CONFIG = RunnerConfig(
    model_path="/m",
    model_id=ModelId("m"),
    start=0,
    end=2,
    n_layers=4,
    engine="native",
    credentials="/data",
    revoked=(NodeId("gone"),),
)
DOWN: list[Message] = [
    CONFIG,
    Route(next_addr="10.0.0.2:7"),
    Route(next_addr=None),
    Revoke(node_ids=(NodeId("a"), NodeId("b"))),
    Threads(threads=3),
    Stop(),
]
UP: list[Message] = [
    RunnerLoading(done=1, total=2),
    RunnerReady(data_addr="127.0.0.1:9", engine="native"),
    RunnerFailed(reason="no such file or directory"),
]


@pytest.mark.parametrize("message", DOWN, ids=lambda m: type(m).__name__)
def test_down_messages_round_trip(message: Message) -> None:
    line = message.model_dump_json().encode()
    assert parse_down(line) == message
    assert down_decoder(logging.getLogger("t"))(line) == message


@pytest.mark.parametrize("message", UP, ids=lambda m: type(m).__name__)
def test_up_messages_round_trip(message: Message) -> None:
    assert up_decoder(logging.getLogger("t"))(message.model_dump_json().encode()) == message


def test_a_bad_line_is_dropped_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    decode = up_decoder(logging.getLogger("t"))
    caplog.set_level(logging.DEBUG)
    bad = [b"not json", b'{"kind": "ready"}', b'{"kind": "loading", "done": "1", "total": 2}']
    assert [decode(line) for line in bad] == [None, None, None]
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "data_addr: Field required" in caplog.records[1].getMessage()


def test_engine_options_and_exit_outcome() -> None:
    config = CONFIG.model_copy(update={"quant": "int4", "threads": 2, "device": "cpu"})
    options = config.engine_options
    assert (options.device, options.quant, options.threads) == ("cpu", "int4", 2)
    assert RunnerExited(-9).reason == "runner exited with -9"
