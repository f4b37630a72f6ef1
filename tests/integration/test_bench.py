"""`shoal bench` end to end on small settings: a 2-node loopback cluster it starts itself, the
JSON filled from real measurements, valid PNG plots, the markdown; and one clear line when the
node it is pointed at is down."""

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from shoal.bench.nodes import free_port
from tests.helpers.cli import shoal
from tests.helpers.nodes import running_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SMALL = [
    "--nodes", "2", "--requests", "5", "--pings", "5", "--prompt-tokens", "16",
    "--gen-tokens", "4", "--concurrency", "1", "2", "--runs", "1", "--failover-tokens", "24",
]  # fmt: skip
MEASURED = ("cluster", "api", "availability", "rtt", "inference", "failover", "comparison")
PNG = b"\x89PNG\r\n\x1a\n"


def leftover_nodes() -> list[psutil.Process]:
    """`shoal node` processes whose bench data dir is gone (the bench deletes it after stopping
    them), i.e. nodes a bench run left behind."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        data = cmd[cmd.index("--data-dir") + 1] if "--data-dir" in cmd[:-1] else ""
        if "shoal-bench-" in data and not Path(data).exists():
            found.append(p)
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    done = shoal("bench", *SMALL, "--no-peers", "--out-dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "benchmark_results.json").read_text())
    yield {"dir": out, "report": report, "stdout": done.stdout}


def _walk(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        assert value, f"{path} is empty"
        for k, v in value.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        assert value, f"{path} is empty"
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, value


def test_every_measurement_is_filled_with_a_real_number(run: dict[str, Any]) -> None:
    report = run["report"]
    for section in MEASURED:
        assert section in report, section
        for path, value in _walk(report[section], section):
            assert value is not None and value != "", path
            if isinstance(value, float | int) and not isinstance(value, bool):
                assert math.isfinite(value), path
                key = path.rsplit(".", 1)[-1]
                if key.startswith("added_"):
                    continue  # a hop can cost less than the noise: any sign is a measurement
                assert value >= 0 if key in ("lost", "hops") else value > 0, path


def test_the_json_covers_both_nodes_and_every_part(run: dict[str, Any]) -> None:
    report = run["report"]
    nodes = [n["node_id"] for n in report["cluster"]["nodes"]]
    assert len(nodes) == 2 and report["cluster"]["started_by_bench"]
    for node in nodes:
        api = report["api"][node]
        assert api["answered"] == 5 and len(api["samples_ms"]) == 5
        assert api["models_listed"] >= 22
        assert report["availability"][node]["fraction"] == 1.0
        peer = next(n for n in nodes if n != node)
        assert len(report["rtt"]["pairs"][node][peer]["samples_ms"]) == 5
    inference = report["inference"]
    assert [c["layout"] for c in inference["grid"]] == ["1 node", "2 stages"]
    assert all(s["completion_tokens"] == 4 for c in inference["grid"] for s in c["samples"])
    assert [(c["layout"], c["streams"]) for c in inference["concurrency"]] == [
        ("1 node", 1), ("1 node", 2), ("2 stages", 1), ("2 stages", 2),
    ]  # fmt: skip
    assert len(inference["concurrency"][1]["runs"][0]["samples"]) == 2
    assert set(inference["splits"]) == {"2 stages"}
    assert report["failover"]["stage"]["kill_to_resumed_s"] > 0
    assert report["failover"]["master"]["kill_to_new_master_s"] > 0
    assert report["peers"] == {"skipped": "--no-peers"}
    assert {"shoal", "torch", "zenoh"} <= set(report["versions"])
    assert {"platform", "cpu", "cores_logical", "ram_bytes", "python"} <= set(report["machine"])
    assert report["comparison"]["api_median_ms"]["seed"] == 2.39


def test_plots_are_pngs_that_read_back(run: dict[str, Any]) -> None:
    import matplotlib.image

    plots = run["report"]["files"]["plots"]
    assert set(plots) == {"tok_s", "api_latency", "ttft"}
    for name in plots.values():
        path = run["dir"] / name
        assert path.read_bytes()[:8] == PNG, name
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name


def test_markdown_report_has_the_tables_and_links_the_plots(run: dict[str, Any]) -> None:
    text = (run["dir"] / "benchmark_report.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("### ")]
    for heading in (
        "Against the seed cluster's published table",
        "GET /v1/models latency (ms)",
        "Round trips between nodes",
        "Node availability",
        "through the HTTP API",
        "Splits against one node",
        "Concurrent streams",
        "Joining and failover (seconds)",
    ):
        assert any(heading in h for h in headings), heading
    assert "| API latency, median | 2.39 ms |" in text
    for name in run["report"]["files"]["plots"].values():
        assert f"]({name})" in text
    assert "GET /v1/models latency" in run["stdout"]  # and the terminal got the tables


def test_the_bench_leaves_no_node_running(run: dict[str, Any]) -> None:
    deadline = time.monotonic() + 10
    while leftover_nodes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not leftover_nodes()


def test_a_running_cluster_is_measured_and_left_as_it_was(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "nodes", 1) as nodes:
        out = tmp_path / "report"
        tiny = ["--requests", "3", "--prompt-tokens", "8", "--gen-tokens", "2"]
        tiny += ["--concurrency", "2", "--runs", "1", "--out", str(out / "r.json")]
        done = shoal("bench", "cluster", "--url", nodes[0].url, *tiny)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads((out / "r.json").read_text())
        assert not report["cluster"]["started_by_bench"]
        assert report["cluster"]["nodes"][0]["url"] == nodes[0].url
        assert "failover" not in report and "peers" not in report
        assert list(report["inference"]["layouts"]) == ["1 node"]
        assert (out / "benchmark_report.md").exists()
        assert nodes[0].proc.poll() is None  # nothing killed
        assert nodes[0].get("/v1/instances")["data"] == []  # what it placed, it deleted


def test_a_stopped_node_fails_with_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = shoal("bench", "--url", url, "--no-peers", "--out-dir", str(tmp_path), timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("shoal: cannot reach a shoal node at " + url)
    assert not list(tmp_path.iterdir())  # no half report


def test_an_unknown_peer_fails_with_one_line(tmp_path: Path) -> None:
    done = shoal("bench", "engines", "--peers", "shoal,nosuch", "--out-dir", str(tmp_path))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown peer(s) nosuch" in lines[0], done.stderr
