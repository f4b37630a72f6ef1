"""`shoal bench`'s pure parts: statistics, layouts, prompt sizing, ratios, failover timing,
stream parsing, and the tables of any report (any peer names, any parts missing)."""

import argparse
from pathlib import Path
from typing import Any

import pytest

from shoal.bench import engines, inference, stats, tables
from shoal.bench.engines import summarise, summarise_streams
from shoal.bench.failover import _resumption
from shoal.bench.peers import PEERS, steady_decode_rate
from shoal.bench.report import comparison, output_paths
from shoal.bench.seed import SEED
from shoal.bench.stream import StreamSample, _parse, _take, aggregate_tok_s
from shoal.bench.target import parse_urls
from shoal.errors import BadRequest


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([1.0], 95, 1.0), ([1.0, 2.0], 50, 1.5), ([0.0, 10.0, 20.0], 95, 19.0), ([3, 1, 2], 0, 1)],
)
def test_percentile(values: list[float], q: float, expected: float) -> None:
    assert stats.percentile(values, q) == pytest.approx(expected)


def test_summary_has_the_seed_columns_and_p95() -> None:
    s = stats.summary([4.0, 1.0, 2.0, 3.0])
    assert s == {"n": 4, "min": 1.0, "max": 4.0, "avg": 2.5, "median": 2.5, "p95": 3.85}
    with pytest.raises(ValueError):
        stats.summary([])


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        (["a"], {"1 node": "a:0-30"}),
        (["a", "b"], {"1 node": "a:0-30", "2 stages": "a:0-15,b:15-30"}),
        (
            ["a", "b", "c", "d"],
            {
                "1 node": "a:0-30",
                "2 stages": "a:0-15,b:15-30",
                "3 stages": "a:0-10,b:10-20,c:20-30",
            },
        ),
    ],
)
def test_layouts_split_layers_evenly_over_up_to_three_nodes(
    nodes: list[str], expected: dict[str, str]
) -> None:
    assert inference.layouts(nodes, 30) == expected


def test_prompt_text_has_the_words_then_the_request() -> None:
    text = inference.prompt_text(40)
    body, ask = text.split("\n\n")
    assert len(body.split()) == 40 and ask == inference.ASK


def _cell(layout: str, decode: float, ttft: float, prompt: int = 16) -> dict[str, Any]:
    summary = {"decode_tok_s": decode, "ttft_ms": ttft, "prompt_tok_s": 1.0}
    return {"layout": layout, "prompt_tokens": prompt, "gen_tokens": 4, "summary": summary}


def test_splits_are_ratios_and_added_latency_per_hop() -> None:
    grid = [_cell("1 node", 20.0, 100.0), _cell("3 stages", 10.0, 160.0)]
    split = inference.splits(grid, {"1 node": 0, "3 stages": 2})
    assert split == {
        "3 stages": {
            "stages": 3,
            "decode_ratio_to_1_node": 0.5,
            "ttft_ratio_to_1_node": 1.6,
            "added_ms_per_token_per_hop": 25.0,  # (100 ms - 50 ms) / 2 hops
            "added_ttft_ms_per_hop": 30.0,
        }
    }


def _peer_samples(prompt: int, ttft_s: float, decode_s: float) -> list[dict[str, Any]]:
    sample = {"prompt_tokens": prompt, "gen_tokens": 11, "generated": 11}
    return [sample | {"run": 0, "ttft_s": ttft_s, "decode_s": decode_s}]


def test_peer_ratios_are_to_shoal_for_any_peer_name() -> None:
    results = {
        "shoal": {"samples": _peer_samples(8, 0.2, 1.0)},  # 10 tok/s
        "shoal-int8": {"samples": _peer_samples(8, 0.1, 0.5)},  # a peer name added later
        "llamacpp": {"skipped": "llama_cpp is not installed"},
    }
    rows = engines.summarise(results)
    assert [r["peer"] for r in rows] == ["shoal", "shoal-int8"]
    assert rows[1]["decode_tok_s"] == 20.0
    assert rows[1]["decode_x_shoal"] == 2.0 and rows[1]["ttft_x_shoal"] == 0.5
    without_baseline = engines.summarise({"shoal-int8": results["shoal-int8"]})
    assert "decode_x_shoal" not in without_baseline[0]


def test_peer_selection() -> None:
    assert engines.select(None) == list(PEERS)
    assert engines.select(" shoal, llamacpp ") == ["shoal", "llamacpp"]
    with pytest.raises(BadRequest, match="unknown peer"):
        engines.select("shoal,nosuch")


def test_failover_resumes_at_the_end_of_the_longest_stall() -> None:
    # a token every 0.1 s; killed at 0.75; the dying runner sends one more at 0.8; then 3 s
    # without tokens until the new placement answers at 3.8
    stamps = [0.1 * i for i in range(1, 9)] + [3.8, 3.9]
    timing = _resumption(stamps, 0.75)
    assert timing["kill_to_next_token_s"] == pytest.approx(0.05)
    assert timing["kill_to_resumed_s"] == pytest.approx(3.05)
    assert timing["longest_stall_s"] == pytest.approx(3.0)
    assert timing["median_gap_before_kill_s"] == pytest.approx(0.1)


def test_stream_chunks_fold_into_a_sample() -> None:
    sample = StreamSample(start=0.0)
    role = _parse('data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}')
    content = _parse('data: {"choices": [{"delta": {"content": "Hi"}}]}')
    usage = _parse('data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5}}')
    assert _parse("data: [DONE]") is None and _parse("") is None
    assert role is not None and content is not None and usage is not None
    assert (_take(sample, role), _take(sample, content), _take(sample, usage)) == (
        False,
        True,
        False,
    )
    sample.stamps, sample.end = [0.5, 1.5], 1.6
    assert (sample.prompt_tokens, sample.completion_tokens) == (9, 5)
    assert sample.ttft_s == 0.5 and sample.prompt_tok_s == 18.0 and sample.decode_tok_s == 4.0
    assert aggregate_tok_s([sample, sample]) == pytest.approx(10 / 1.6)


def test_urls_repeat_or_comma_separate() -> None:
    assert parse_urls(["http://a:1/", "http://b:2, http://c:3"]) == [
        "http://a:1",
        "http://b:2",
        "http://c:3",
    ]


def test_out_names_the_json_and_the_report_goes_beside_it() -> None:
    args = argparse.Namespace(out=Path("/x/r.json"), out_dir=Path("/y"))
    assert output_paths(args) == (Path("/x/r.json"), Path("/x/benchmark_report.md"))
    args.out = None
    assert output_paths(args)[0] == Path("/y/benchmark_results.json")


def _report() -> dict[str, Any]:
    latency = {"n": 3, "min": 0.5, "max": 0.9, "avg": 0.6, "median": 0.6, "p95": 0.8}
    api = {"latency_ms": latency, "models_listed": 23, "models_per_s": 38333.0, "listing_ms": 0.6}
    rtt = {"count": 3, "lost": 0, "rtt_ms": latency}
    summary = {"aggregate_tok_s": 30.0, "decode_tok_s_per_stream": 9.0, "ttft_ms": 300.0}
    grid = [_cell("1 node", 20.0, 100.0)]
    grid[0]["summary"] |= {"prompt_tokens": 40, "completion_tokens": 4}
    report: dict[str, Any] = {
        "settings": {"requests": 3, "pings": 3, "runs": 1},
        "seed": SEED,
        "cluster": {"nodes": [{"node_id": "a"}, {"node_id": "b"}], "started_by_bench": True},
        "api": {"a": api, "b": api},
        "availability": {"a": {"up": True, "requests": 3, "answered": 3, "fraction": 1.0}},
        "rtt": {"pairs": {"a": {"b": rtt}}, "overall_ms": latency},
        "inference": {
            "model": "smollm2-135m",
            "grid": grid,
            "concurrency": [
                {"layout": "1 node", "streams": 4, "prompt_tokens": 16, "gen_tokens": 4}
                | {"summary": summary}
            ],
        },
        "peers": {
            "threads": 2,
            "results": {
                "shoal-int8": {"samples": [], "warning": "exit status -6 after: abort"},
                "mlx": {"skipped": "failed: boom"},
            },
            "summary": [
                {"peer": "shoal-int8", "prompt_tokens": 8, "gen_tokens": 4, "ttft_ms": 9.0}
                | {"prompt_tok_s": 900.0, "decode_tok_s": 40.0}
            ],
        },
    }
    report["comparison"] = comparison(report)
    return report


def test_every_present_part_becomes_a_table_in_both_renderings() -> None:
    report = _report()
    titles = [s.title for s in tables.sections(report)]
    assert titles[0] == "Against the seed cluster's published table"
    assert not any("Splits" in t or "Failover" in t for t in titles)  # not measured: no table
    for section in tables.sections(report):
        assert tables.to_rich(section).row_count == len(section.rows)
        lines = tables.to_markdown(section).splitlines()
        assert len(lines) == 4 + len(section.rows)
        assert all(line.count("|") == len(section.headers) + 1 for line in lines[2:])
    peers = tables.peers_section(report)
    assert [r[0] for r in peers.rows] == ["shoal-int8", "shoal-int8", "mlx"]
    assert peers.rows[1][-1] == "exit status -6 after: abort"
    assert peers.rows[2][-1] == "skipped: failed: boom"


def test_comparison_with_the_seed() -> None:
    c = _report()["comparison"]
    assert c["api_median_ms"] == {"seed": 2.39, "shoal": 0.6, "seed_over_shoal": 2.39 / 0.6}
    assert c["api_goal"] == {"median_below_ms": 1.0, "met": True}
    assert c["listing"]["shoal"] == {"models": 23, "ms": 0.6}
    assert c["rtt_p95_ms"]["seed"] == 2674.0


def test_an_engines_only_report_has_only_the_engines_table() -> None:
    report = {"settings": {}, "seed": SEED, "peers": _report()["peers"]}
    assert [s.title.split(",")[0] for s in tables.sections(report)] == [
        "Engines in-process on the same GGUF"
    ]


def test_the_steady_decode_rate_counts_only_while_every_stream_decodes() -> None:
    # Stream a: prompt at 0, tokens at 1..10 (one a second). Stream b: prompt at 0, its first
    # token at 4 (a later prefill), then 5..8. All decode from 4 to 8: a gives 4 tokens in that
    # window (5, 6, 7, 8), b gives 4 (5..8): 8 tokens in 4 s.
    a = [0.0, *range(1, 11)]
    b = [0.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert steady_decode_rate([a, b]) == 2.0
    assert steady_decode_rate([a]) == 1.0  # one stream: its own decode rate
    # Never all at once (b starts after a ends): every token over the whole span.
    assert steady_decode_rate([[0.0, 1.0, 2.0], [0.0, 3.0, 4.0]]) == 1.0


def test_streams_are_summarised_as_multiples_of_one_stream() -> None:
    results = {
        "shoal": {
            "samples": [
                {"streams": 1, "run": 0, "prompt_tokens": 8, "tok_s": 100.0},
                {"streams": 8, "run": 0, "prompt_tokens": 8, "tok_s": 380.0},
                {"streams": 8, "run": 1, "prompt_tokens": 8, "tok_s": 420.0},
                {"prompt_tokens": 8, "gen_tokens": 4, "run": 0}
                | {"generated": 4, "ttft_s": 0.1, "decode_s": 0.1},
            ]
        },
        "llamacpp": {"samples": []},
    }
    summary = summarise_streams(results)
    assert summary == {"shoal": {"1": 100.0, "8": 400.0, "x8": 4.0}}
    assert [r["peer"] for r in summarise(results)] == ["shoal"]  # stream samples left out
    report = {"peers": {"streams": summary}}
    section = tables.streams_section(report)
    assert section.headers[1:] == ("1 streams tok/s", "8 streams tok/s", "8 ÷ 1")
    assert section.rows == [("shoal", "100.0", "400.0", "4.00")]


def test_the_noisy_neighbour_summary_and_its_table() -> None:
    from shoal.bench import noisy

    # alone: TTFT 100, gaps 20 (median) and 30 (largest); a 256-token prompt alone 100 ms (one
    # chunk), the 1024-token one 480 ms in 4 chunks of 256 → 120 ms a chunk on average; beside
    # it: TTFT 250, largest gap 150 > 2 × 20 + 100
    run = {
        "long_prompt_tokens": 1024,
        "long_alone_ttft_ms": 480.0,
        "chunk_alone_ttft_ms": 100.0,
        "alone_ttft_ms": 100.0,
        "alone_max_gap_ms": 30.0,
        "decode_step_ms": 20.0,
        "alone_tokens": 32,
        "with_prefill_ttft_ms": 250.0,
        "with_prefill_max_gap_ms": 150.0,
        "with_prefill_tokens": 32,
    }
    summary = noisy.summarise([run, run | {"with_prefill_max_gap_ms": 130.0}, run], 256)
    assert summary["prefill_chunks"] == 4 and summary["prefill_chunk_ms"] == 100.0
    assert summary["prefill_chunk_mean_ms"] == 120.0
    assert summary["ttft_ratio"] == 2.5 and summary["max_gap_ratio"] == 5.0
    assert summary["gap_budget_ms"] == 140.0 and summary["gap_within_budget"] is False
    stamps = noisy.StreamSample(start=0.0, stamps=[1.0, 1.02, 1.1, 1.12])
    assert noisy.largest_gap_s(stamps) == pytest.approx(0.08)
    assert noisy.median_gap_s(stamps) == pytest.approx(0.02)
    report = {"noisy": {"gen_tokens": 32, "summary": summary, "runs": [run] * 3}}
    (section,) = tables.sections(report)
    assert section.title.startswith("Noisy neighbour: a 32-token chat beside a 1024-token")
    assert [r[0] for r in section.rows][:2] == ["short chat TTFT", "short chat largest gap"]
    assert section.rows[1][1:] == ("30.0", "150.0", "5.00")
    assert section.rows[4][2] == "140.0 (NO)"
    assert len(tables.to_markdown(section).splitlines()) == 4 + len(section.rows)
