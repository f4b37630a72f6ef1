"""The request-side Prometheus instruments: counters and histograms the Scheduler updates.

vLLM's names under `shoal:` (prometheus-client allows colons in metric names, not in labels),
labelled by `model_name`. They live in a registry the caller owns (one per node, so two nodes in
one process do not share counts); the gauges read at scrape time are api/metrics.py's.
"""

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram

from shoal.inference.request import FinishReason
from shoal.types.ids import InstanceId, ModelId

# vLLM's buckets, with finer ones at the bottom: a small model on a CPU decodes in milliseconds
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip

EndReason = FinishReason | Literal["error"]  # cancelled: vLLM's abort


RATE_WINDOW_S = 5.0  # the live tokens per second are over the last this many seconds


class InstanceLoad(NamedTuple):
    """The requests one node has on one instance now (a scrape reads these), and the tokens a
    second they generate (over the last RATE_WINDOW_S)."""

    model: ModelId
    instance: InstanceId
    running: int
    waiting: int
    tok_s: float = 0.0


class RequestMetrics:
    """Every request-side instrument, registered in `registry`; `model` binds a model's labels."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ("model_name",)) -> Counter:
            return Counter(f"shoal:{name}", doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(
                f"shoal:{name}", doc, ("model_name",), registry=registry, buckets=buckets
            )

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled (once a request).")
        self.generation_tokens = counter("generation_tokens", "Tokens generated (EOS not counted).")
        self.request_success = counter(
            "request_success",
            "Requests ended, by finished_reason: stop, length, cancelled, error.",
            ("model_name", "finished_reason"),
        )
        self.failovers = counter(
            "failovers",
            "Broken pipelines (a stage lost), by outcome: resumed on another, or failed.",
            ("model_name", "outcome"),
        )
        self.prefix_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache (vLLM's name)."
        )
        self.prefix_hits = counter(
            "prefix_cache_hits", "Prompt tokens started from a kept cache instead of prefilled."
        )
        self.spec_drafts = counter(
            "spec_decode_num_draft_tokens", "Draft tokens speculative steps verified."
        )
        self.spec_accepted = counter(
            "spec_decode_num_accepted_tokens", "Draft tokens the model agreed with (kept)."
        )
        self.stream_replays = counter(
            "stream_replays", "Running requests replayed onto a new pipeline after a break."
        )
        self.ttft = histogram(
            "time_to_first_token_seconds",
            "From admission (after tokenizing) to the first sampled token.",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Between two generated tokens.", TOKEN_BUCKETS
        )
        self.tpot = histogram(
            "request_time_per_output_token_seconds",
            "A finished request's mean time per generated token after the first.",
            TOKEN_BUCKETS,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds",
            "From admission to the end of a request that stopped or hit its length.",
            E2E_BUCKETS,
        )

    def model(self, model_name: str) -> "ModelMetrics":
        """The instruments with the model's label bound (what one Scheduler updates)."""
        return ModelMetrics(self, model_name)


@dataclass
class ModelMetrics:
    """One model's request instruments; every method is one event, cheap enough per token."""

    of: RequestMetrics
    model_name: str
    _recent: deque[float] = field(default_factory=deque, repr=False)  # token times, monotonic

    def __post_init__(self) -> None:
        m, name = self.of, self.model_name
        self._prompt = m.prompt_tokens.labels(name)
        self._generated = m.generation_tokens.labels(name)
        self._ttft = m.ttft.labels(name)
        self._itl = m.itl.labels(name)
        self._tpot = m.tpot.labels(name)
        self._e2e = m.e2e.labels(name)
        self._replays = m.stream_replays.labels(name)
        self._prefix_queries = m.prefix_queries.labels(name)
        self._prefix_hits = m.prefix_hits.labels(name)

    def speculated(self, drafted: int, accepted: int) -> None:
        """A verify step checked `drafted` tokens and kept `accepted` of them."""
        self.of.spec_drafts.labels(self.model_name).inc(drafted)
        self.of.spec_accepted.labels(self.model_name).inc(accepted)

    def prefix(self, prompt_tokens: int, reused: int) -> None:
        """A prompt was looked up in the prefix cache; `reused` of its tokens were held."""
        self._prefix_queries.inc(prompt_tokens)
        self._prefix_hits.inc(reused)

    def first_token(self, prompt_tokens: int, ttft_s: float) -> None:
        """A request sampled its first token: its prompt is prefilled."""
        self._prompt.inc(prompt_tokens)
        self._ttft.observe(ttft_s)

    def token(self, gap_s: float | None) -> None:
        """A request generated a token, gap_s after its previous one (None: its first)."""
        self._generated.inc()
        if gap_s is not None:
            self._itl.observe(gap_s)
        now = time.monotonic()
        self._recent.append(now)
        self._forget(now)

    def tok_s(self) -> float:
        """Tokens generated a second over the last RATE_WINDOW_S."""
        self._forget(time.monotonic())
        return len(self._recent) / RATE_WINDOW_S

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def ended(self, reason: EndReason, e2e_s: float | None, tpot_s: float | None) -> None:
        """A request ended (e2e_s, tpot_s: None where they do not apply)."""
        self.of.request_success.labels(self.model_name, reason).inc()
        if e2e_s is not None:
            self._e2e.observe(e2e_s)
        if tpot_s is not None:
            self._tpot.observe(tpot_s)

    def failover(self, resumed: bool, replayed: int) -> None:
        """A pipeline broke; resumed: another took over, replaying `replayed` requests."""
        self.of.failovers.labels(self.model_name, "resumed" if resumed else "failed").inc()
        self._replays.inc(replayed)
