"""Settings: flags over SHOAL_* variables over defaults; the engines' knobs from the environment."""

import pytest
from pydantic import ValidationError

from shoal.settings import ENV, RUNTIME_ENV, Runtime, load_settings, runtime


def test_a_flag_wins_over_the_environment_which_wins_over_the_default() -> None:
    env = {"SHOAL_PORT": "6000", "SHOAL_MAX_QUEUE": "9"}
    assert load_settings({}, env).port == 6000
    assert load_settings({"port": 7000}, env).port == 7000
    assert load_settings({}, {}).port == 52415
    assert load_settings({}, env).max_queue == 9


def test_the_api_binds_loopback_unless_told() -> None:
    assert load_settings({}, {}).host == "127.0.0.1"


def test_out_of_range_values_are_refused() -> None:
    with pytest.raises(ValidationError):
        load_settings({"prefill_chunk": 100_000}, {})  # more than a runner takes in one step
    with pytest.raises(ValidationError):
        load_settings({}, {"SHOAL_MAX_BATCH": "0"})


def test_every_variable_is_shoals_own_or_a_known_one() -> None:
    names = [*ENV.values(), *RUNTIME_ENV.values()]
    assert len(names) == len(set(names))
    assert all(n.startswith("SHOAL_") or n == "CC" for n in names)


@pytest.mark.parametrize(
    ("environ", "want"),
    [
        ({}, Runtime()),
        ({"SHOAL_NATIVE": "0"}, Runtime(native_kernels=False)),
        ({"SHOAL_CUDA_GRAPHS": "0", "CC": "clang"}, Runtime(cuda_graphs=False, cc="clang")),
        ({"SHOAL_NATIVE": "1", "CC": ""}, Runtime()),  # an empty CC is no CC
    ],
)
def test_the_engines_knobs_come_from_the_environment(
    environ: dict[str, str], want: Runtime
) -> None:
    assert runtime(environ) == want
