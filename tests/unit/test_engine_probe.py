"""Engine probes: a tiny model in a child; one that crashes, fails or hangs is left out."""

import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from shoal.engines import probe
from shoal.engines.probe import ProbeResult, explain, probe_all
from shoal.profile import collect
from shoal.profile.collect import ProfileCollector, cpu_signature, engines_that_run

pytestmark = pytest.mark.timeout(120)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


SEGV = python("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
ABORT = python("import os; os.abort()")
RAISES = python("raise SystemExit('RuntimeError: no CPU backend could be loaded')")
HANGS = python("import time; time.sleep(60)")


# -- explain: pure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "stderr", "reason"),
    [
        (0, "noise", ""),
        (-signal.SIGSEGV, "", "its probe died with SIGSEGV"),
        (-signal.SIGILL, "", "its probe died with SIGILL"),
        (-signal.SIGABRT, "Fatal Python error", "its probe died with SIGABRT"),
        (
            1,
            "warning\nValueError: bad shape\n\n",
            "its probe failed (exit 1): ValueError: bad shape",
        ),
        (3, "", "its probe failed (exit 3): no message"),
        (1, "x" * 500, "its probe failed (exit 1): " + "x" * probe.REASON_CHARS),
    ],
    ids=["ok", "segv", "sigill", "abort", "last-line", "silent", "long-line"],
)
def test_explain_names_the_signal_or_the_last_line(
    returncode: int, stderr: str, reason: str
) -> None:
    assert explain(returncode, stderr) == reason


# -- real children --------------------------------------------------------------------------


def test_healthy_engines_pass_their_probe() -> None:
    # the real child: a tiny model through numpy (no torch) and the fake engine, at once
    results = probe_all(["numpy", "fake"], timeout_s=90)
    assert results == {"numpy": ProbeResult("numpy", True), "fake": ProbeResult("fake", True)}


def test_the_child_reports_an_engine_it_cannot_build() -> None:
    assert probe.main(["nonesuch"]) == 1
    assert probe.main([]) == 2


@pytest.mark.parametrize(
    ("command", "reason", "timed_out"),
    [
        (SEGV, "its probe died with SIGSEGV", False),
        (ABORT, "its probe died with SIGABRT", False),
        (RAISES, "its probe failed (exit 1): RuntimeError: no CPU backend could be loaded", False),
        (HANGS, "its probe took over 2 s", True),
    ],
    ids=["segv", "abort", "error", "hang"],
)
def test_a_probe_that_does_not_pass_says_why(
    command: list[str], reason: str, timed_out: bool
) -> None:
    results = probe_all(["bad", "numpy"], timeout_s=2, commands={"bad": command, "numpy": ["true"]})
    assert results["bad"] == ProbeResult("bad", False, reason, timed_out)
    assert results["numpy"].ok


def test_no_child_outlives_probe_all(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    hang = python(
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    results = probe_all(["slow"], timeout_s=1.5, commands={"slow": hang})
    assert results["slow"].timed_out
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped


# -- the node's path: which engines it offers, cached -----------------------------------------


def counting(tmp_path: Path, name: str, exit_code: str) -> list[str]:
    """A probe command that leaves a mark per run, then exits as told (a code or a signal)."""
    marks = tmp_path / f"{name}.runs"
    return python(f"import os, signal; open({str(marks)!r}, 'a').write('x'); {exit_code}")


def runs(tmp_path: Path, name: str) -> int:
    marks = tmp_path / f"{name}.runs"
    return len(marks.read_text()) if marks.exists() else 0


def test_engines_whose_probe_crashes_are_left_out_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    commands = {
        "llamacpp": counting(tmp_path, "llamacpp", "os.kill(os.getpid(), signal.SIGSEGV)"),
        "mlx": counting(tmp_path, "mlx", "raise SystemExit(0)"),
    }
    caplog.set_level(logging.INFO, logger="shoal.profile.collect")
    got = engines_that_run(
        ["torch", "mlx", "llamacpp", "numpy"],
        tmp_path / "probes.json",
        probed={"mlx", "llamacpp"},
        commands=commands,
        fingerprint=lambda name: {"engine": name},
    )
    assert got == ("torch", "mlx", "numpy")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["engine llamacpp left out: its probe died with SIGSEGV"]
    assert runs(tmp_path, "llamacpp") == runs(tmp_path, "mlx") == 1


def test_verdicts_are_cached_until_the_fingerprint_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "probes.json"
    build = {"llamacpp": "native", "mlx": "1.0"}
    commands = {
        "llamacpp": counting(tmp_path, "llamacpp", "os.abort()"),
        "mlx": counting(tmp_path, "mlx", "raise SystemExit(0)"),
    }

    def offered() -> tuple[str, ...]:
        return engines_that_run(
            ["mlx", "llamacpp"],
            cache,
            probed={"mlx", "llamacpp"},
            commands=commands,
            fingerprint=lambda name: {"engine": name, "build": build[name]},
        )

    assert offered() == ("mlx",)
    caplog.clear()
    assert offered() == ("mlx",)  # from the cache: nothing ran again, the reason is still said
    assert runs(tmp_path, "llamacpp") == runs(tmp_path, "mlx") == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"engine llamacpp left out: its probe died with SIGABRT (cached in {cache}; "
        "delete it to probe again)"
    ]
    build["llamacpp"] = "portable"  # rebuilt: probed again, and this build passes
    commands["llamacpp"] = counting(tmp_path, "llamacpp", "raise SystemExit(0)")
    assert offered() == ("mlx", "llamacpp")
    assert runs(tmp_path, "llamacpp") == 2 and runs(tmp_path, "mlx") == 1


def test_a_timeout_is_not_cached(tmp_path: Path) -> None:
    cache = tmp_path / "probes.json"

    def offered(command: list[str]) -> tuple[str, ...]:
        return engines_that_run(
            ["mlx"],
            cache,
            probed={"mlx"},
            timeout_s=1.5,
            commands={"mlx": command},
            fingerprint=lambda name: {"engine": name},
        )

    assert offered(HANGS) == ()
    assert offered(["true"]) == ("mlx",)  # probed again: a busy machine may be quicker next time


def test_an_unreadable_cache_is_probed_over(tmp_path: Path) -> None:
    cache = tmp_path / "probes.json"
    cache.write_text("{not json")
    got = engines_that_run(
        ["mlx"], cache, probed={"mlx"}, commands={"mlx": ["true"]}, fingerprint=lambda n: {}
    )
    assert got == ("mlx",) and '"ok": true' in cache.read_text()


def test_the_collector_leaves_out_a_crashing_registry_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the node's own path: registry entries marked `probed`, their real fingerprints
    def crashing(engine: str) -> list[str]:
        return SEGV if engine == "llamacpp" else ["true"]

    monkeypatch.setattr(probe, "command", crashing)
    collector = ProfileCollector(
        collect.NodeId("n1"),
        data_dir=tmp_path,
        api_url="",
        data_addr="",
        version="",
        engines=["llamacpp", "mlx", "numpy"],
        bench=False,
        probe_cache=tmp_path / "probes.json",
    )
    try:
        assert collector.full().engines == ("mlx", "numpy")
    finally:
        collector.close()
    off = ProfileCollector(
        collect.NodeId("n1"),
        data_dir=tmp_path,
        api_url="",
        data_addr="",
        version="",
        engines=["llamacpp", "numpy"],
        bench=False,
        probe=False,
    )
    assert off.engines() == ("llamacpp", "numpy")


def test_fingerprints_tell_builds_and_cpus_apart(tmp_path: Path) -> None:
    fp: Mapping[str, Any] = collect.engine_fingerprint("llamacpp")
    assert fp["engine"] == "llamacpp" and fp["package"] == "llama-cpp-python"
    assert collect.engine_fingerprint("mlx")["cpu"] == fp["cpu"]
    avx2, avx512 = tmp_path / "avx2", tmp_path / "avx512"
    avx2.write_text("model name\t: X\nflags\t\t: fpu sse avx avx2\n")
    avx512.write_text("model name\t: X\nflags\t\t: fpu sse avx avx2 avx512f amx_int8\n")
    assert cpu_signature(avx2) != cpu_signature(avx512)
    assert cpu_signature(avx2) == cpu_signature(avx2)
