"""`shoal pull` as a real process against the Hub stand-in: kill -9 mid-file and run it again.

The stand-in's access log shows what each run asked for: the second run continues the killed
run's file with `Range: bytes=N-` (N = the bytes on disk) and the Hub sends about one file's
worth in all, not two. Also: a corrupted file is found, named and fetched again; a gated repo
needs HF_TOKEN; an unknown repo and a Hub that is down end in one line naming the repo.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.models.hub import repo_dir
from tests.helpers.hub_server import HubServer
from tests.helpers.mlx_repos import hf_config

ROOT = Path(__file__).resolve().parents[2]
REPO = "org/big"
WEIGHTS = "model.safetensors"
SIZE = 6 * 1024 * 1024
RATE = 1.5 * 1024 * 1024  # bytes/s while the first run is to be killed


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config (4 layers) and one 6 MiB weights file (random bytes: they are only moved)."""
    path = tmp_path_factory.mktemp("big")
    (path / "config.json").write_text(json.dumps(hf_config(4)))
    (path / WEIGHTS).write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def hub(repo: Path) -> Iterator[HubServer]:
    with HubServer({REPO: repo}) as server:
        yield server


def pull(
    hub: HubServer, data_dir: Path, *args: str, token: str | None = None
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(data_dir)}
    if token is not None:
        env["HF_TOKEN"] = token
    cmd = [sys.executable, "-m", "shoal.cli", "pull", *args, "--data-dir", str(data_dir)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def weights_dir(hub: HubServer, data_dir: Path) -> Path:
    return repo_dir(data_dir / "hub", REPO, hub.repos[REPO].commit)


def test_kill_9_mid_file_then_the_rerun_fetches_only_the_rest(
    hub: HubServer, tmp_path: Path, repo: Path
) -> None:
    hub.rate = RATE
    proc = pull(hub, tmp_path, REPO)
    part = weights_dir(hub, tmp_path) / ".shoal" / f"{WEIGHTS}.part"
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size > SIZE // 4):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the first run never got a quarter of the file"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    hub.wait_idle()
    have = part.stat().st_size
    assert 0 < have < SIZE
    hub.rate = None

    code, out, err = finish(pull(hub, tmp_path, REPO))
    assert code == 0, err
    assert REPO in out
    first, second = hub.downloads(REPO, WEIGHTS)
    assert (first.range, second.range) == (None, f"bytes={have}-")
    assert second.status == 206 and second.sent == SIZE - have
    assert first.sent + second.sent < 1.2 * SIZE  # not twice: only what was in flight at the kill
    assert (weights_dir(hub, tmp_path) / WEIGHTS).read_bytes() == (repo / WEIGHTS).read_bytes()
    assert not part.exists()

    # a third run has everything: it asks for the listing only
    before = len(hub.downloads(REPO))
    code, out, err = finish(pull(hub, tmp_path, REPO))
    assert code == 0 and "(0 fetched now)" in out and len(hub.downloads(REPO)) == before


def test_a_corrupted_file_is_named_deleted_and_fetched_again(
    hub: HubServer, tmp_path: Path, repo: Path
) -> None:
    assert finish(pull(hub, tmp_path, REPO))[0] == 0
    path = weights_dir(hub, tmp_path) / WEIGHTS
    with path.open("r+b") as f:  # flip some bytes in the middle
        f.seek(SIZE // 2)
        chunk = f.read(16)
        f.seek(SIZE // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    code, _, err = finish(pull(hub, tmp_path, REPO))
    assert code == 0, err
    assert f"{REPO}/{WEIGHTS}" in err and "corrupt" in err
    last = hub.downloads(REPO, WEIGHTS)[-1]
    assert (last.range, last.sent) == (None, SIZE)
    assert path.read_bytes() == (repo / WEIGHTS).read_bytes()


def test_layers_of_a_split_repo(hub: HubServer, tmp_path: Path, repo: Path) -> None:
    split = tmp_path / "split"
    split.mkdir()
    (split / "config.json").write_text(json.dumps(hf_config(4)))
    weight_map: dict[str, str] = {}
    for k, layers in enumerate([(0, 1), (2, 3)], start=1):
        name = f"model-{k:05d}-of-00002.safetensors"
        (split / name).write_bytes(os.urandom(1000 * k))
        weight_map |= {f"model.layers.{i}.mlp.up_proj.weight": name for i in layers}
    weight_map |= {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}
    weight_map |= {"lm_head.weight": "model-00002-of-00002.safetensors"}
    index = {"metadata": {}, "weight_map": weight_map}
    (split / "model.safetensors.index.json").write_text(json.dumps(index))
    hub.add("org/split", split)
    code, out, err = finish(pull(hub, tmp_path / "d", "org/split", "--layers", "0-2"))
    assert code == 0, err
    fetched = {a.path.rsplit("/", 1)[-1] for a in hub.downloads("org/split")}
    assert fetched == {
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
    }
    code, _, err = finish(pull(hub, tmp_path / "d", "org/split", "--layers", "2-9"))
    assert code == 1 and "4 layers" in err


def test_a_gated_repo_needs_hf_token(hub: HubServer, tmp_path: Path, repo: Path) -> None:
    hub.add("org/gated", repo, gated=True)
    code, _, err = finish(pull(hub, tmp_path, "org/gated"))
    assert code == 1
    assert err.count("\n") == 1 and "org/gated" in err and "HF_TOKEN" in err
    code, _, err = finish(pull(hub, tmp_path, "org/gated", token=hub.token))
    assert code == 0, err


def test_an_unknown_repo_is_one_line(hub: HubServer, tmp_path: Path) -> None:
    code, _, err = finish(pull(hub, tmp_path, "org/nope"))
    assert code == 1
    assert err.count("\n") == 1 and "org/nope" in err and "--model-path" in err


def test_the_hub_down_is_one_line_naming_the_repo(hub: HubServer, tmp_path: Path) -> None:
    hub.down = True
    code, _, err = finish(pull(hub, tmp_path, REPO))
    assert code == 1
    assert err.count("\n") == 1 and f"cannot reach the Hub at {hub.url} for {REPO}" in err
