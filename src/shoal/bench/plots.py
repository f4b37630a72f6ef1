"""PNG plots of a report with matplotlib's Agg backend (no display needed): tok/s by
configuration, and the latency distributions of GET /v1/models and of TTFT."""

import importlib.util
from pathlib import Path
from typing import Any

from shoal.bench.errors import BenchError


def require() -> None:
    """Fail before measuring, not after, when plots cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError('the plots need matplotlib: pip install "shoal[bench]"')


def _pyplot() -> Any:
    require()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


HISTOGRAM_MIN_SAMPLES = 10


def _bars(report: dict[str, Any]) -> list[tuple[str, float, str]]:
    """(label, tok/s, group) for every configuration measured."""
    bars = []
    inf = report.get("inference", {})
    for c in inf.get("grid", []):
        label = f"{c['layout']} · {c['prompt_tokens']}+{c['gen_tokens']} (decode)"
        bars.append((label, c["summary"]["decode_tok_s"], "HTTP, one stream"))
    for c in inf.get("concurrency", []):
        label = f"{c['layout']} · {c['streams']} streams (aggregate)"
        bars.append((label, c["summary"]["aggregate_tok_s"], "HTTP, concurrent"))
    for r in report.get("peers", {}).get("summary", []):
        label = f"{r['peer']} · {r['prompt_tokens']}+{r['gen_tokens']} (decode)"
        bars.append((label, r["decode_tok_s"], "in-process engines"))
    return bars


def tok_s_chart(report: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    bars = _bars(report)
    groups = list(dict.fromkeys(g for _, _, g in bars))
    colours = {g: f"C{i}" for i, g in enumerate(groups)}
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(bars) + 1.5))
    ax.barh(range(len(bars)), [v for _, v, _ in bars], color=[colours[g] for _, _, g in bars])
    ax.set_yticks(range(len(bars)), [label for label, _, _ in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (median)")
    ax.set_title("tok/s by configuration")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[g]) for g in groups]
    ax.legend(handles, groups, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _distribution(title: str, unit: str, series: dict[str, list[float]], path: Path) -> None:
    """A boxplot per series with every sample as a dot; beside it their histograms (same bins)
    when every series has enough samples for one."""
    import numpy as np

    plt = _pyplot()
    values = list(series.values())
    with_hist = min(len(v) for v in values) >= HISTOGRAM_MIN_SAMPLES
    fig, axes = plt.subplots(1, 2 if with_hist else 1, figsize=(11, 0.3 * len(series) + 2.5))
    box = axes[0] if with_hist else axes
    box.boxplot(values, vert=False, showfliers=False)
    for i, v in enumerate(values, start=1):
        jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(v))
        box.plot(v, i + jitter, ".", markersize=3, alpha=0.5)
    box.set_yticks(range(1, len(series) + 1), list(series), fontsize=7)
    box.set_xlabel(unit)
    if with_hist:
        _histograms(axes[1], series, unit)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _histograms(hist: Any, series: dict[str, list[float]], unit: str) -> None:
    import numpy as np

    values = list(series.values())
    pooled = np.concatenate([np.asarray(v, dtype=float) for v in values])
    edges = np.histogram_bin_edges(pooled, bins=min(40, max(5, len(pooled) // 4)))
    for name, v in series.items():
        hist.hist(v, bins=edges, alpha=0.5, label=name)
    hist.set_xlabel(unit)
    hist.set_ylabel("requests")
    hist.legend(fontsize=6)


def _ttft_series(report: dict[str, Any]) -> dict[str, list[float]]:
    series = {}
    for c in report.get("inference", {}).get("grid", []):
        key = f"{c['layout']} · {c['prompt_tokens']}+{c['gen_tokens']}"
        series[key] = [s["ttft_ms"] for s in c["samples"]]
    for peer, result in report.get("peers", {}).get("results", {}).items():
        for s in result.get("samples", []):
            if "streams" in s:
                continue  # an aggregate rate, no TTFT
            key = f"{peer} · {s['prompt_tokens']}+{s['gen_tokens']}"
            series.setdefault(key, []).append(s["ttft_s"] * 1000)
    return series


def write_plots(report: dict[str, Any], folder: Path) -> dict[str, str]:
    """Every plot the report has data for; name → file name (relative to folder)."""
    written = {}
    if _bars(report):
        tok_s_chart(report, folder / "tok_s.png")
        written["tok_s"] = "tok_s.png"
    api = {
        k[:14] + "…": v["samples_ms"] for k, v in report.get("api", {}).items() if "samples_ms" in v
    }
    if api:
        _distribution("GET /v1/models latency", "ms", api, folder / "api_latency.png")
        written["api_latency"] = "api_latency.png"
    ttft = _ttft_series(report)
    if ttft:
        _distribution("Time to first token", "ms", ttft, folder / "ttft.png")
        written["ttft"] = "ttft.png"
    return written
