"""Engines change the CPU threads they compute on between steps (a node shares its cores among
its runners): the next steps use the new count and give what they gave before."""

import threading

import numpy as np
import pytest

from shoal.engines.base import StepInput
from shoal.engines.registry import create_engine
from shoal.types.ids import RequestId
from tests.unit.test_cache_fork import engines

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.parametrize("name", list(engines()))
def test_steps_after_new_threads_continue_as_before(name: str) -> None:
    from tests.helpers.tiny import VOCAB, shard, tiny_source

    prompt = np.random.default_rng(3).integers(0, VOCAB, 9)
    a = RequestId("a")
    reference = engines()[name]()
    reference.load(shard(), tiny_source("llama"))
    expected = reference.forward([StepInput(a, prompt, 0)])[0]
    reference.close()
    threads = torch.get_num_threads()

    def run() -> np.ndarray:  # on a thread of its own, as a runner's engine thread
        engine = engines()[name]()
        engine.load(shard(), tiny_source("llama"))
        engine.forward([StepInput(a, prompt[:5], 0)])
        engine.set_threads(1)
        assert torch.get_num_threads() == 1  # this thread's torch pool
        native = getattr(engine, "_native", None)
        if native is not None:
            assert native.threads == 1 and native._model.threads == 1
        out = engine.forward([StepInput(a, prompt[5:], 5)])[0]
        engine.close()
        return out

    got: list[np.ndarray] = []
    worker = threading.Thread(target=lambda: got.append(run()))
    worker.start()
    worker.join(60)
    assert got, "the engine thread failed (its error is in the captured output)"
    np.testing.assert_allclose(got[0], expected, atol=1e-4)
    assert torch.get_num_threads() == threads  # other threads keep theirs


def test_the_fake_engine_keeps_what_it_is_told() -> None:
    fake = create_engine("fake")
    fake.set_threads(3)
    assert getattr(fake, "threads", None) == 3
