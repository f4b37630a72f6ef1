"""The report's frame: machine, versions, settings, the comparison with the seed cluster; and
writing benchmark_results.json, the markdown report and the plots next to each other."""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

import psutil

from shoal import __version__
from shoal.bench.seed import SEED

DISTRIBUTIONS = {
    "shoal": "shoal",
    "torch": "torch",
    "llama_cpp": "llama_cpp_python",
    "transformers": "transformers",
    "zenoh": "eclipse-zenoh",
    "numpy": "numpy",
    "mlx": "mlx",
    "matplotlib": "matplotlib",
}


def _cpu_model() -> str:
    with_name = Path("/proc/cpuinfo")
    if with_name.exists():
        for line in with_name.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where the numbers come from."""
    return {
        "platform": platform.platform(),
        "arch": platform.machine(),
        "cpu": _cpu_model(),
        "cores_logical": os.cpu_count() or 1,
        "cores_physical": psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        "ram_bytes": psutil.virtual_memory().total,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_avg_at_start": list(os.getloadavg()),
    }


def versions() -> dict[str, str]:
    """Versions of shoal and of the frameworks it was measured with (those installed)."""
    out = {}
    for name, dist in DISTRIBUTIONS.items():
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every knob of the run, as given or defaulted."""
    skip = {"func", "command"}
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in skip and v is not None
    }


def comparison(report: dict[str, Any]) -> dict[str, Any]:
    """The seed cluster's published figures beside this run's (entry node = the seed's
    "localhost"); seed ÷ shoal > 1 means shoal is faster."""
    out: dict[str, Any] = {}
    entry = report.get("api", {}).get(report["cluster"]["nodes"][0]["node_id"], {})
    if "latency_ms" in entry:
        for stat in ("median", "min", "avg", "max"):
            mine, theirs = entry["latency_ms"][stat], SEED["api_latency_ms"][stat]
            out[f"api_{stat}_ms"] = {
                "seed": theirs,
                "shoal": mine,
                "seed_over_shoal": theirs / mine,
            }
        goal = SEED["api_latency_goal_median_ms"]
        out["api_goal"] = {"median_below_ms": goal, "met": entry["latency_ms"]["median"] < goal}
        ms = entry["listing_ms"]
        out["listing"] = {
            "seed": SEED["listing"],
            "shoal": {"models": entry["models_listed"], "ms": ms},
            "seed_over_shoal": SEED["listing"]["ms"] / ms,
        }
    if "rtt" in report:
        overall = report["rtt"]["overall_ms"]
        for stat in ("min", "avg", "p95"):
            mine, theirs = overall[stat], SEED["rtt_ms"][stat]
            out[f"rtt_{stat}_ms"] = {
                "seed": theirs,
                "shoal": mine,
                "seed_over_shoal": theirs / mine,
            }
    return out


def frame(args: argparse.Namespace) -> dict[str, Any]:
    """What the report says about the run itself, taken before measuring (the start time and
    load average are those of the start)."""
    return {
        "shoal_version": __version__,
        "suite": args.suite,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "settings": settings(args),
        "seed": SEED,
    }


def assemble(head: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """The whole JSON document: the frame, every measured section, the seed comparison."""
    report = head | measured
    if "cluster" in report:
        report["comparison"] = comparison(report)
    return report


def output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """benchmark_results.json and benchmark_report.md: --out names the JSON, else --out-dir."""
    json_path = args.out if args.out is not None else args.out_dir / "benchmark_results.json"
    return json_path, json_path.with_name("benchmark_report.md")


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False))


def _facts(report: dict[str, Any]) -> list[str]:
    m, v = report["machine"], report["versions"]
    cluster = report.get("cluster", {})
    where = (
        f"{len(cluster['nodes'])} nodes, "
        + ("a loopback cluster started by the bench" if cluster["started_by_bench"] else "at ")
        + ("" if cluster["started_by_bench"] else ", ".join(n["url"] for n in cluster["nodes"]))
        if cluster
        else "no cluster (engines only)"
    )
    load = ", ".join(f"{x:.2f}" for x in m["load_avg_at_start"])
    return [
        f"- **Started:** {report['created']}, suite `{report['suite']}`; cluster: {where}",
        f"- **Machine:** {m['cpu']}, {m['cores_logical']} logical cores, {m['ram_gib']} GiB RAM, "
        f"{m['platform']}, Python {m['python']}; load average at start {load}",
        "- **Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "- **Settings:** "
        + ", ".join(f"`{k}={val}`" for k, val in report["settings"].items() if k != "suite"),
    ]


def markdown(report: dict[str, Any]) -> str:
    """benchmark_report.md: the facts of the run, every table, the plots."""
    from shoal.bench.tables import sections, to_markdown

    parts = ["# shoal benchmark report", "", *_facts(report), ""]
    parts += [to_markdown(s) + "\n" for s in sections(report)]
    plots = report.get("files", {}).get("plots", {})
    if plots:
        parts += ["## Plots", ""] + [f"![{name}]({file})\n" for name, file in plots.items()]
    parts.append(
        "How each number is measured, and its caveats: `bench/METHODOLOGY.md` in the shoal "
        f"repository. Every raw sample is in `{report.get('files', {}).get('json', 'the JSON')}`."
    )
    return "\n".join(parts) + "\n"
