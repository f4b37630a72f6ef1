"""The MLX engine's tests (mlx_cases.py), run in a child pytest.

MLX is native code: a build for another CPU dies with a signal instead of raising. Run here,
that would end the whole test run; in a child it is this one failed test.
"""

import importlib.util

import pytest

from tests.helpers.isolate import run_in_child

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(660),
    pytest.mark.skipif(
        importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None,
        reason="mlx is not installed (pip install 'mlx[cpu]' mlx-lm)",
    ),
]


def test_mlx_engine_in_a_child() -> None:
    run_in_child("tests/unit/mlx_cases.py", "mlx", timeout_s=600)


def test_mlx_conformance_in_a_child() -> None:
    """The engine conformance suite's mlx cases (left out of the test process itself)."""
    run_in_child("tests/unit/test_engine_conformance.py", "mlx", timeout_s=600, select="mlx")
