"""A byte-level tokenizer and a scheduler over the FakeEngine: fast stand-ins for unit tests."""

from collections.abc import Sequence

from shoal.engines.fake import FakeEngine
from shoal.inference.pipeline import LocalPipeline
from shoal.inference.scheduler import Scheduler
from shoal.types.ids import ModelId
from shoal.types.shard import Shard

SPECIALS = 3  # 0 = <eos>, 1 = <bos>, 2 = <pad>; byte b is token b + 3
VOCAB = 256 + SPECIALS


class ByteStream:
    """Streams bytes out as text only once they form complete UTF-8."""

    def __init__(self) -> None:
        self._pending = b""

    def push(self, token_id: int) -> str:
        if token_id < SPECIALS:
            return ""
        self._pending += bytes([token_id - SPECIALS])
        for cut in range(len(self._pending), max(len(self._pending) - 4, -1), -1):
            try:
                text = self._pending[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self._pending = self._pending[cut:]
            return text
        return ""

    def flush(self) -> str:
        text, self._pending = self._pending.decode("utf-8", errors="replace"), b""
        return text


class ByteTokenizer:
    """UTF-8 bytes as tokens; chat is "role: content" lines."""

    def __init__(self, eos: frozenset[int] = frozenset({0})) -> None:
        self.eos_token_ids = eos

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return ([1] if add_special_tokens else []) + [b + SPECIALS for b in text.encode()]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode(text, add_special_tokens=True)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return bytes(i - SPECIALS for i in ids if i >= SPECIALS).decode("utf-8", errors="replace")

    def stream(self) -> ByteStream:
        return ByteStream()


def fake_engine(layers: int = 4, delay_s: float = 0.0) -> FakeEngine:
    engine = FakeEngine(vocab_size=VOCAB, hidden_size=16, seed=0, delay_s=delay_s)
    engine.load(Shard.whole(ModelId("fake"), layers))
    return engine


def fake_scheduler(
    engine: FakeEngine | None = None,
    tokenizer: ByteTokenizer | None = None,
    *,
    context_length: int = 512,
    max_batch: int = 8,
    prefill_chunk: int = 512,
) -> Scheduler:
    return Scheduler(
        LocalPipeline([engine or fake_engine()]),
        tokenizer or ByteTokenizer(),
        context_length=context_length,
        max_batch=max_batch,
        prefill_chunk=prefill_chunk,
    )
