"""The llamacpp engine's tests (llamacpp_cases.py), run in a child pytest.

llama.cpp is native code: a build for another CPU dies with SIGSEGV on its first decode instead
of raising. Run here, that would end the whole test run; in a child it is this one failed test.
"""

import importlib.util

import pytest

from tests.helpers.isolate import run_in_child

pytestmark = [pytest.mark.slow, pytest.mark.timeout(660)]


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (the llamacpp extra)",
)
def test_llamacpp_engine_in_a_child() -> None:
    run_in_child("tests/unit/llamacpp_cases.py", "llamacpp", timeout_s=600)
