"""The profiler actor: profiles the node at start, then re-emits whenever it really changes."""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import Protocol

from shoal.profile.collect import ProfileCollector
from shoal.profile.links import links_moved
from shoal.types.ids import NodeId
from shoal.types.profile import Link, NodeProfile

log = logging.getLogger(__name__)

RAM_NOISE_FRACTION = 0.02  # of RAM total
RAM_NOISE_BYTES = 256 << 20
GPU_NOISE_FRACTION = 0.02  # of that GPU's memory


class Collector(Protocol):
    """What the profiler reads profiles from (ProfileCollector, or a fake in tests)."""

    def full(self) -> NodeProfile: ...

    def refresh(self, profile: NodeProfile) -> NodeProfile: ...

    def close(self) -> None: ...


def _steady(p: NodeProfile) -> NodeProfile:
    # The profile with its noisy fields blanked, so the rest compares exactly.
    gpus = tuple(g.model_copy(update={"memory_free": 0}) for g in p.gpus)
    return p.model_copy(update={"ram_available": 0, "gpus": gpus, "links": ()})


def changed(old: NodeProfile, new: NodeProfile) -> bool:
    """Whether new differs from old beyond measurement noise."""
    if _steady(old) != _steady(new) or links_moved(old.links, new.links):
        return True  # anything but free memory and round-trip noise
    # RAM counts as moved when it passes either bar: 2 % of total, or 256 MiB.
    ram_bar = min(RAM_NOISE_FRACTION * new.ram_total, RAM_NOISE_BYTES)
    if abs(new.ram_available - old.ram_available) > ram_bar:
        return True
    return any(
        abs(a.memory_free - b.memory_free) > GPU_NOISE_FRACTION * b.memory_total
        for a, b in zip(old.gpus, new.gpus, strict=True)
    )


def should_emit(
    last: NodeProfile, new: NodeProfile, *, now: float, last_emit_at: float, heartbeat_s: float
) -> bool:
    """Emit on a real change, and at least once every heartbeat_s regardless."""
    return now - last_emit_at >= heartbeat_s or changed(last, new)


class Profiler:
    """Emits this node's profile at start, then again when it changes or heartbeat_s passes."""

    def __init__(
        self,
        node_id: NodeId,
        data_dir: Path,
        api_url: str,
        data_addr: str,
        version: str,
        *,
        emit: Callable[[NodeProfile], Awaitable[None]],
        interval_s: float = 5.0,
        heartbeat_s: float = 60.0,
        engines: Sequence[str] | None = None,
        bench: bool = True,
        probe: bool = True,
        devices: Collection[int] | None = None,
        simulated_gpus: str | None = None,
        links: Callable[[], tuple[Link, ...]] = tuple,  # the latest round trips to peers
        collector: Collector | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self._interval_s = interval_s
        self._heartbeat_s = heartbeat_s
        self._clock = clock
        self._collector: Collector = collector or ProfileCollector(
            node_id,
            data_dir=data_dir,
            api_url=api_url,
            data_addr=data_addr,
            version=version,
            engines=engines,
            bench=bench,
            probe=probe,
            devices=devices,
            simulated_gpus=simulated_gpus,
        )
        self._links = links
        self._stop = asyncio.Event()
        self._refresh_failed = False

    async def run(self) -> None:
        """Profile (blocking parts in a thread), emit, then poll every interval_s until shutdown."""
        try:
            last = await asyncio.to_thread(self._collector.full)
            if self._stop.is_set():
                return
            log.info(
                "node profile: %s, %d cores, %.1f GiB RAM, %d GPU(s), engines %s, "
                "%s GB/s, %s GFLOP/s",
                last.cpu_model,
                last.cpu_cores,
                last.ram_total / 2**30,
                len(last.gpus),
                ",".join(last.engines) or "none",
                last.memory_bandwidth_gbs,
                last.matmul_gflops,
            )
            await self._emit(last)
            last_at = self._clock()
            while not await self._stopped_within(self._interval_s):
                new = await self._refresh(last)
                if new is not None:
                    new = new.model_copy(update={"links": self._links()})
                now = self._clock()
                if new is not None and should_emit(
                    last, new, now=now, last_emit_at=last_at, heartbeat_s=self._heartbeat_s
                ):
                    await self._emit(new)
                    last, last_at = new, now
        finally:
            self._collector.close()

    def shutdown(self) -> None:
        """Ask run() to return at its next wake-up."""
        self._stop.set()

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _refresh(self, last: NodeProfile) -> NodeProfile | None:
        try:
            return await asyncio.to_thread(self._collector.refresh, last)
        except Exception as e:  # actor boundary: a bad reading must not end the node
            log.log(
                logging.DEBUG if self._refresh_failed else logging.WARNING,
                "profile refresh failed: %s",
                e,
                exc_info=not self._refresh_failed,
            )
            self._refresh_failed = True
            return None
