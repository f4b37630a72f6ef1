"""The report's tables, built once as rows of text and rendered twice: rich for the terminal,
markdown for benchmark_report.md. Each section appears only when its part was measured."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table


@dataclass(frozen=True)
class Section:
    title: str
    headers: tuple[str, ...]
    rows: Sequence[tuple[str, ...]]


def _short(node_id: str) -> str:
    return node_id[:14] + "…" if len(node_id) > 15 else node_id


def _f(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


STATS = ("min", "max", "avg", "median", "p95")


def api_section(report: dict[str, Any]) -> Section:
    n = report["settings"]["requests"]
    rows: list[tuple[str, ...]] = []
    for node, row in report["api"].items():
        if "latency_ms" in row:
            stats = (_f(row["latency_ms"][k]) for k in STATS)
            listed, per_s = str(row["models_listed"]), _f(row["models_per_s"], 0)
            rows.append((_short(node), *stats, listed, per_s))
    seed, listing = report["seed"]["api_latency_ms"], report["seed"]["listing"]
    per_s = _f(listing["models"] / (listing["ms"] / 1000), 0)
    seed_stats = (_f(seed[k]) for k in STATS[:4])
    rows.append(("seed: localhost", *seed_stats, "—", str(listing["models"]), per_s))
    headers = ("node", "min", "max", "avg", "median", "P95", "models", "models/s")
    return Section(f"GET /v1/models latency (ms), {n} requests per node", headers, rows)


def rtt_section(report: dict[str, Any]) -> Section:
    rows: list[tuple[str, ...]] = []
    for source, peers in report["rtt"]["pairs"].items():
        for peer, row in peers.items():
            lat = row.get("rtt_ms")
            stats = (_f(lat["min"]), _f(lat["avg"]), _f(lat["p95"])) if lat else ("—",) * 3
            rows.append((f"{_short(source)} → {_short(peer)}", *stats, str(row["lost"])))
    overall = report["rtt"]["overall_ms"]
    rows.append(("all pairs", _f(overall["min"]), _f(overall["avg"]), _f(overall["p95"]), "—"))
    seed = report["seed"]["rtt_ms"]
    rows.append(
        ("seed: to the remote node (Wi-Fi)", *(_f(seed[k], 0) for k in ("min", "avg", "p95")), "—")
    )
    pings = report["settings"]["pings"]
    title = f"Round trips between nodes over the control plane (ms), {pings} pings per pair"
    return Section(title, ("from → to", "min", "avg", "P95", "lost"), rows)


def availability_section(report: dict[str, Any]) -> Section:
    rows = [
        (
            _short(node),
            "yes" if row["up"] else "no",
            f"{row['answered']}/{row['requests']}",
            f"{row['fraction']:.1%}",
        )
        for node, row in report["availability"].items()
    ]
    return Section("Node availability", ("node", "up", "GETs answered", "fraction"), rows)


def grid_section(report: dict[str, Any]) -> Section:
    inf = report["inference"]
    rows: list[tuple[str, ...]] = []
    for c in inf["grid"]:
        s = c["summary"]
        rows.append(
            (
                c["layout"],
                f"{c['prompt_tokens']} ({s['prompt_tokens']:.0f})",
                f"{c['gen_tokens']} ({s['completion_tokens']:.0f})",
                _f(s["ttft_ms"], 1),
                _f(s["prompt_tok_s"], 0),
                _f(s["decode_tok_s"], 1),
            )
        )
    headers = (
        "layout",
        "prompt (actual)",
        "output (actual)",
        "TTFT ms",
        "prompt tok/s",
        "decode tok/s",
    )
    runs = report["settings"]["runs"]
    title = f"{inf['model']} through the HTTP API, streaming, median of {runs}"
    return Section(title, headers, rows)


def splits_section(report: dict[str, Any]) -> Section:
    rows = [
        (
            layout,
            str(s["stages"]),
            _f(s["decode_ratio_to_1_node"]),
            _f(s["ttft_ratio_to_1_node"]),
            _f(s["added_ms_per_token_per_hop"]),
            _f(s["added_ttft_ms_per_hop"]),
        )
        for layout, s in report["inference"]["splits"].items()
    ]
    headers = (
        "layout",
        "stages",
        "decode × 1 node",
        "TTFT × 1 node",
        "added ms/token/hop",
        "added TTFT ms/hop",
    )
    return Section("Splits against one node (medians over the grid)", headers, rows)


def concurrency_section(report: dict[str, Any]) -> Section:
    rows = [
        (
            c["layout"],
            str(c["streams"]),
            _f(c["summary"]["aggregate_tok_s"], 1),
            _f(c["summary"]["decode_tok_s_per_stream"], 1),
            _f(c["summary"]["ttft_ms"], 0),
        )
        for c in report["inference"]["concurrency"]
    ]
    first = report["inference"]["concurrency"][0]
    title = (
        f"Concurrent streams ({first['prompt_tokens']}-token prompt, {first['gen_tokens']} "
        "tokens each)"
    )
    headers = ("layout", "streams", "aggregate tok/s", "decode tok/s per stream", "TTFT ms")
    return Section(title, headers, rows)


def peers_section(report: dict[str, Any]) -> Section:
    peers = report["peers"]
    rows: list[tuple[str, ...]] = []
    for r in peers["summary"]:
        ratios = (
            (_f(r["decode_x_shoal"]), _f(r["ttft_x_shoal"]))
            if "decode_x_shoal" in r
            else ("—", "—")
        )
        rows.append(
            (
                r["peer"],
                str(r["prompt_tokens"]),
                str(r["gen_tokens"]),
                _f(r["ttft_ms"], 1),
                _f(r["prompt_tok_s"], 0),
                _f(r["decode_tok_s"], 1),
                *ratios,
            )
        )
    for peer, result in peers["results"].items():
        note = ("skipped: " + result["skipped"]) if "skipped" in result else result.get("warning")
        if note:
            rows.append((peer, "—", "—", "—", "—", "—", "—", note))
    headers = (
        "engine",
        "prompt",
        "output",
        "TTFT ms",
        "prompt tok/s",
        "decode tok/s",
        "decode × shoal",
        "TTFT × shoal",
    )
    title = f"Engines in-process on the same GGUF, --threads {peers['threads']}, one process each"
    return Section(title, headers, rows)


def streams_section(report: dict[str, Any]) -> Section:
    streams = report["peers"]["streams"]
    counts = sorted({int(k) for rates in streams.values() for k in rates if k.isdigit()})
    rows = []
    for peer, rates in streams.items():
        cells = [_f(rates[str(k)], 1) if str(k) in rates else "—" for k in counts]
        ratios = [_f(rates[f"x{k}"]) if f"x{k}" in rates else "—" for k in counts if k != 1]
        rows.append((peer, *cells, *ratios))
    headers = (
        "engine",
        *(f"{k} streams tok/s" for k in counts),
        *(f"{k} ÷ 1" for k in counts if k != 1),
    )
    title = "Continuous batching in-process: aggregate decode tok/s while every stream decodes"
    return Section(title, headers, rows)


def failover_section(report: dict[str, Any]) -> Section:
    f = report["failover"]
    stage = f["stage"]
    nodes = len(report["cluster"]["nodes"])
    rows = [
        (f"{nodes} node processes started → one cluster", _f(report["cluster"]["join_s"])),
        ("stage node SIGKILL → stream resumed", _f(stage["kill_to_resumed_s"])),
        ("  longest stall of that stream", _f(stage["longest_stall_s"])),
        ("  its usual gap between tokens", _f(stage["median_gap_before_kill_s"], 3)),
    ]
    if "restart_to_rejoined_s" in stage:
        rows.append(("killed node restarted → rejoined", _f(stage["restart_to_rejoined_s"])))
    rows.append(
        ("master SIGKILL → one new master everywhere", _f(f["master"]["kill_to_new_master_s"]))
    )
    return Section("Joining and failover (seconds)", ("scenario", "s"), rows)


def comparison_section(report: dict[str, Any]) -> Section:
    c = report["comparison"]
    rows: list[tuple[str, ...]] = []
    for key, label in (
        ("api_median_ms", "API latency, median"),
        ("api_min_ms", "API latency, min"),
        ("api_avg_ms", "API latency, avg"),
        ("api_max_ms", "API latency, max"),
        ("rtt_min_ms", "RTT min"),
        ("rtt_avg_ms", "RTT avg"),
        ("rtt_p95_ms", "RTT P95"),
    ):
        if key in c:
            rows.append(
                (
                    label,
                    f"{c[key]['seed']:.2f} ms",
                    f"{c[key]['shoal']:.2f} ms",
                    _f(c[key]["seed_over_shoal"], 1),
                )
            )
    if "listing" in c:
        seed, mine = c["listing"]["seed"], c["listing"]["shoal"]
        rows.append(
            (
                "model listing",
                f"{seed['models']} models in {seed['ms']:.2f} ms",
                f"{mine['models']} models in {mine['ms']:.2f} ms",
                _f(c["listing"]["seed_over_shoal"], 1),
            )
        )
    if "api_goal" in c:
        met = "met" if c["api_goal"]["met"] else "NOT met"
        rows.append(("goal: median API latency < 1 ms", "—", met, "—"))
    return Section(
        "Against the seed cluster's published table", ("", "seed", "shoal", "seed ÷ shoal"), rows
    )


def noisy_section(report: dict[str, Any]) -> Section:
    n = report["noisy"]
    s = n["summary"]
    alone, beside = s["alone"], s["with_prefill"]
    met = "yes" if s["gap_within_budget"] else "NO"
    rows = [
        ("short chat TTFT", _f(alone["ttft_ms"], 1), _f(beside["ttft_ms"], 1), _f(s["ttft_ratio"])),
        (
            "short chat largest gap",
            _f(alone["max_gap_ms"], 1),
            _f(beside["max_gap_ms"], 1),
            _f(s["max_gap_ratio"]),
        ),
        ("decode step (median gap alone)", _f(s["decode_step_ms"], 1), "—", "—"),
        (
            f"prefill chunk ({s['prefill_chunk_tokens']} tokens)",
            "—",
            _f(s["prefill_chunk_ms"], 1),
            "—",
        ),
        ("goal: gap ≤ 2 steps + 1 chunk", "—", f"{_f(s['gap_budget_ms'], 1)} ({met})", "—"),
    ]
    title = (
        f"Noisy neighbour: a {n['gen_tokens']}-token chat beside a "
        f"{s['long_prompt_tokens']:.0f}-token prefill (ms), median of {len(n['runs'])}"
    )
    return Section(title, ("", "alone", "with the prefill", "ratio"), rows)


def prefix_section(report: dict[str, Any]) -> Section:
    n = report["speedups"]["prefix"]
    rows = [
        (
            str(t["turn"]),
            str(t["prompt_tokens"]),
            str(t["reused_tokens"]),
            _f(t["cached_ttft_ms"], 1),
            _f(t["plain_ttft_ms"], 1),
            _f(t["ratio"]),
        )
        for t in n["turns"]
    ]
    title = (
        f"Prefix cache: TTFT of turn N of a chat (ms), {n['max_tokens']}-token answers, "
        f"{n['quant']}; answers identical"
    )
    headers = ("turn", "prompt tokens", "reused", "cached", "plain", "cached ÷ plain")
    return Section(title, headers, rows)


def pipelined_section(report: dict[str, Any]) -> Section:
    n = report["speedups"]["pipelined"]
    rows = [(r["setting"], _f(r["ttft_s"]), _f(r["ratio_to_1_stage"])) for r in n["rows"]]
    runs = len(n["rows"][0]["samples_s"])
    title = (
        f"Pipelined prefill: TTFT of a {n['prompt_tokens']}-token prompt (s), chunks of "
        f"{n['chunk']}, stages {', '.join(n['layers'])}, {n['cores']} cores, median of {runs}"
    )
    return Section(title, ("", "TTFT", "÷ 1 stage"), rows)


def speculation_sections(report: dict[str, Any]) -> list[Section]:
    out = []
    for model in report["speedups"]["speculation"]:
        rows = [
            (
                f"{p['prompt']} ({p['prompt_tokens']} tokens)",
                str(r["drafts"]) if r["drafts"] else "none",
                _f(r["tok_s"], 1),
                _f(r["ratio"]),
                "—" if r["kept_share"] is None else f"{r['kept_share']:.0%}",
            )
            for p in model["prompts"]
            for r in p["rows"]
        ]
        title = (
            f"Speculative decoding (prompt lookup): decode tok/s, {model['model']} "
            f"({model['parameters'] / 1e9:.2f} B parameters, {model['quant']}), "
            f"{model['tokens']} tokens; outputs identical"
        )
        out.append(Section(title, ("prompt", "drafts", "tok/s", "÷ none", "drafts kept"), rows))
    return out


BUILDERS: list[tuple[Callable[[dict[str, Any]], bool], Callable[[dict[str, Any]], Section]]] = [
    (lambda r: bool(r.get("comparison")), comparison_section),
    (lambda r: "api" in r, api_section),
    (lambda r: "rtt" in r, rtt_section),
    (lambda r: "availability" in r, availability_section),
    (lambda r: "inference" in r, grid_section),
    (lambda r: "splits" in r.get("inference", {}), splits_section),
    (lambda r: "inference" in r, concurrency_section),
    (lambda r: "summary" in r.get("peers", {}), peers_section),
    (lambda r: bool(r.get("peers", {}).get("streams")), streams_section),
    (lambda r: "failover" in r, failover_section),
    (lambda r: "noisy" in r, noisy_section),
    (lambda r: "speedups" in r, prefix_section),
    (lambda r: "speedups" in r, pipelined_section),
]


def sections(report: dict[str, Any]) -> list[Section]:
    """Every table the report has data for, in reading order."""
    built = [build(report) for present, build in BUILDERS if present(report)]
    return built + (speculation_sections(report) if "speedups" in report else [])


def to_rich(section: Section) -> Table:
    table = Table(title=section.title)
    for i, header in enumerate(section.headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in section.rows:
        table.add_row(*row)
    return table


def to_markdown(section: Section) -> str:
    lines = [f"### {section.title}", "", "| " + " | ".join(section.headers) + " |"]
    lines.append(
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(section.headers))) + "|"
    )
    lines += ["| " + " | ".join(row) + " |" for row in section.rows]
    return "\n".join(lines)
