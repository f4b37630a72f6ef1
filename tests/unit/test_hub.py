"""models/hub.py and hub_card.py against the Hub stand-in (tests/helpers/hub_server.py).

A tiny transformers llama (4 layers over 3 safetensors files, an index) is served as `org/tiny`;
the access log shows which bytes were asked for.
"""

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.models.hub import (
    CorruptFile,
    FileNotOnHub,
    Hub,
    HubAccessDenied,
    HubUnreachable,
    RepoFile,
    RepoListing,
    RepoNotFound,
    files_for_layers,
    repo_dir,
    small_files,
    verify,
)
from shoal.models.hub_card import card_for_repo, card_from_config
from shoal.types.model_card import HubWeights
from tests.helpers.hub_server import HubServer
from tests.helpers.mlx_repos import make_hf_repo

REPO = "org/tiny"
SHARDS = [f"model-{k:05d}-of-00003.safetensors" for k in (1, 2, 3)]


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("repos")
    return {
        "untied": make_hf_repo(base / "untied", layers=4, files=3),
        "tied": make_hf_repo(base / "tied", layers=4, files=3, tie=True),
    }


@pytest.fixture
def server(repos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with HubServer({REPO: repos["untied"], "org/tied": repos["tied"]}) as hub:
        yield hub


@pytest.fixture
def hub(server: HubServer, tmp_path: Path) -> Hub:
    return Hub(tmp_path / "hub", endpoint=server.url, timeout_s=5)


def gets(server: HubServer, path: str) -> list[tuple[str | None, int]]:
    return [(a.range, a.sent) for a in server.downloads(REPO, path)]


# --- listing -------------------------------------------------------------------------------------


def test_listing_has_sizes_hashes_and_commit(hub: Hub, server: HubServer) -> None:
    listing = hub.listing(REPO)
    served = server.repos[REPO]
    assert listing.commit == served.commit
    assert {f.path for f in listing.files} == set(served.entries)
    shard = listing.file(SHARDS[0])
    assert shard.sha256 == served.entries[SHARDS[0]].sha256 and shard.blob_id is None
    config = listing.file("config.json")
    assert config.sha256 is None and config.blob_id == served.entries["config.json"].oid
    assert config.size == (server.repos[REPO].directory / "config.json").stat().st_size
    assert RepoListing.from_json(json.loads(json.dumps(listing.to_json()))) == listing


def test_listing_is_kept_for_offline_use(hub: Hub, server: HubServer) -> None:
    listing = hub.listing(REPO)
    ref = hub.root / "org--tiny" / "refs" / "main"
    assert ref.read_text() == listing.commit
    assert (repo_dir(hub.root, REPO, listing.commit) / ".shoal" / "listing.json").is_file()
    server.down = True
    assert hub.cached_listing(REPO) == listing
    assert hub.cached_listing(REPO, listing.commit) == listing
    assert hub.listing(REPO) == listing  # the Hub is down: the saved one
    assert hub.cached_listing("org/other") is None


def test_unsafe_paths_are_refused() -> None:
    for bad in ("../x", "/etc/passwd", "a/../../b", ".shoal/x.ok"):
        with pytest.raises(ValueError, match="unsafe"):
            RepoFile(bad, 1, None, None)
    with pytest.raises(RepoNotFound):
        repo_dir(Path("/tmp"), "../etc", "a" * 40)


# --- downloads -----------------------------------------------------------------------------------


def test_download_verifies_and_marks(hub: Hub, server: HubServer) -> None:
    listing = hub.listing(REPO)
    seen: list[tuple[int, int]] = []
    path = hub.download(listing, SHARDS[0], lambda done, total: seen.append((done, total)))
    source = server.repos[REPO].directory / SHARDS[0]
    assert path == repo_dir(hub.root, REPO, listing.commit) / SHARDS[0]
    assert path.read_bytes() == source.read_bytes()
    assert seen[-1] == (source.stat().st_size, source.stat().st_size)
    marker = json.loads((path.parent / ".shoal" / f"{SHARDS[0]}.ok").read_text())
    assert (
        marker["size"] == path.stat().st_size and marker["sha256"] == listing.file(SHARDS[0]).sha256
    )
    assert not (path.parent / ".shoal" / f"{SHARDS[0]}.part").exists()
    # here now: no second request
    assert hub.download(listing, SHARDS[0]) == path
    assert hub.local(listing, SHARDS[0]) == path
    assert len(gets(server, SHARDS[0])) == 1


def test_a_part_left_by_a_dead_process_is_continued_by_range(hub: Hub, server: HubServer) -> None:
    listing = hub.listing(REPO)
    source = (server.repos[REPO].directory / SHARDS[1]).read_bytes()
    part = repo_dir(hub.root, REPO, listing.commit) / ".shoal" / f"{SHARDS[1]}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(source[:100_000])
    path = hub.download(listing, SHARDS[1])
    assert path.read_bytes() == source
    assert gets(server, SHARDS[1]) == [("bytes=100000-", len(source) - 100_000)]


def test_a_cut_transfer_resumes_in_the_same_call(hub: Hub, server: HubServer) -> None:
    listing = hub.listing(REPO)
    source = (server.repos[REPO].directory / SHARDS[0]).read_bytes()
    server.cut_after = 200_000  # every body is dropped after 200 kB
    path = hub.download(listing, SHARDS[0])
    assert path.read_bytes() == source
    asked = gets(server, SHARDS[0])
    assert asked[0] == (None, 200_000)
    assert asked[1] == ("bytes=200000-", 200_000)
    assert sum(sent for _, sent in asked) == len(source)


def test_a_transfer_that_makes_no_progress_fails_naming_the_repo(
    hub: Hub, server: HubServer
) -> None:
    listing = hub.listing(REPO)
    server.cut_after = 0
    with pytest.raises(HubUnreachable, match=f"{REPO}.*--model-path"):
        hub.download(listing, SHARDS[0])
    server.cut_after, server.down = None, True
    with pytest.raises(HubUnreachable, match=f"cannot reach the Hub at .* for {REPO}"):
        hub.download(listing, SHARDS[0])


def test_a_bad_download_is_deleted_and_named(hub: Hub, server: HubServer) -> None:
    listing = hub.listing(REPO)
    source = (server.repos[REPO].directory / SHARDS[2]).read_bytes()
    part = repo_dir(hub.root, REPO, listing.commit) / ".shoal" / f"{SHARDS[2]}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"\0" * 1000)  # wrong bytes from an earlier run
    with pytest.raises(CorruptFile, match=f"{REPO}/{SHARDS[2]}: sha256"):
        hub.download(listing, SHARDS[2])
    assert not part.exists()
    assert hub.download(listing, SHARDS[2]).read_bytes() == source  # the retry starts over
    assert gets(server, SHARDS[2])[-1] == (None, len(source))


def test_a_corrupted_file_is_found_deleted_and_fetched_again(
    hub: Hub, server: HubServer, caplog: pytest.LogCaptureFixture
) -> None:
    listing = hub.listing(REPO)
    path = hub.download(listing, SHARDS[0])
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="shoal.models.hub"):
        assert hub.local(listing, SHARDS[0]) is None
    assert not path.exists()
    assert [r.getMessage() for r in caplog.records if SHARDS[0] in r.getMessage()]
    hub.download(listing, SHARDS[0])
    assert len(gets(server, SHARDS[0])) == 2
    size = listing.file(SHARDS[0]).size
    with pytest.raises(CorruptFile, match=f"{SHARDS[0]}: {size} bytes, the listing says"):
        verify(path, listing.file("config.json"))


def test_a_json_file_is_checked_by_its_git_blob_id(hub: Hub) -> None:
    listing = hub.listing(REPO)
    path = hub.download(listing, "config.json")
    verify(path, listing.file("config.json"))
    path.write_text(path.read_text().replace("llama", "LLAMA"))
    assert hub.local(listing, "config.json") is None


# --- errors: one line naming the repo -----------------------------------------------------------


def test_unknown_repo_revision_and_file(hub: Hub) -> None:
    with pytest.raises(RepoNotFound, match="org/nope") as err:
        hub.listing("org/nope")
    assert "\n" not in str(err.value)
    with pytest.raises(RepoNotFound, match="no revision 'v9'"):
        hub.listing(REPO, "v9")
    listing = hub.listing(REPO)
    with pytest.raises(FileNotOnHub, match="missing.bin"):
        listing.file("missing.bin")
    ghost = RepoListing(REPO, listing.commit, (RepoFile("ghost.json", 3, None, None),))
    with pytest.raises(FileNotOnHub, match=f"{REPO} has no file 'ghost.json'"):
        hub.download(ghost, "ghost.json")


def test_gated_repo_wants_a_token(
    server: HubServer, repos: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.add("org/gated", repos["untied"], gated=True)
    anonymous = Hub(tmp_path / "a", endpoint=server.url)
    with pytest.raises(HubAccessDenied, match="org/gated.*401.*HF_TOKEN") as err:
        anonymous.listing("org/gated")
    assert "\n" not in str(err.value)
    with pytest.raises(HubAccessDenied, match="403"):
        Hub(tmp_path / "b", endpoint=server.url, token="hf_wrong").listing("org/gated")
    listing = Hub(tmp_path / "c", endpoint=server.url, token=server.token).listing("org/gated")
    monkeypatch.setenv("HF_TOKEN", server.token)  # the default: huggingface_hub's HF_TOKEN
    assert Hub(tmp_path / "c", endpoint=server.url).download(listing, SHARDS[0]).is_file()


def test_the_endpoint_is_hf_endpoint_as_it_is_now(
    server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # after huggingface_hub was imported
    assert Hub(tmp_path).listing(REPO).commit == server.repos[REPO].commit


def test_hub_down_or_gone(hub: Hub, server: HubServer, tmp_path: Path) -> None:
    server.down = True
    with pytest.raises(HubUnreachable, match=f"cannot reach the Hub at .* for {REPO}"):
        hub.listing(REPO)
    nobody = Hub(tmp_path / "x", endpoint="http://127.0.0.1:9", timeout_s=2)
    with pytest.raises(HubUnreachable, match="org/tiny.*HF_ENDPOINT"):
        nobody.listing(REPO)


# --- which files a stage needs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "shards"),
    [
        (0, 4, SHARDS),
        (0, 2, SHARDS[:1]),
        (2, 4, SHARDS[1:]),
        (1, 2, SHARDS[:1]),
        (3, 4, SHARDS[2:]),
    ],
)
def test_files_for_layers(hub: Hub, start: int, end: int, shards: list[str]) -> None:
    listing = hub.listing(REPO)
    directory = repo_dir(hub.root, REPO, listing.commit)
    with pytest.raises(Exception, match="index"):
        files_for_layers(listing, directory, start, end, 4)
    hub.download(listing, "model.safetensors.index.json")
    got = files_for_layers(listing, directory, start, end, 4)
    small = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert small_files(listing) == small
    assert got == [*small, "model.safetensors.index.json", *shards]


def test_kimis_tiktoken_vocabulary_is_a_small_file() -> None:
    """Kimi K2 ships tiktoken.model instead of tokenizer.json (its tokenization_kimi.py is code,
    which shoal never runs: models/tiktoken_codec.py reads the vocabulary itself)."""
    names = ["tiktoken.model", "tokenization_kimi.py", "model-00001-of-00002.safetensors"]
    listing = RepoListing(
        repo="moonshotai/Kimi-K2-Instruct",
        commit="c" * 40,
        files=tuple(RepoFile(n, 1, None, None) for n in names),
    )
    assert small_files(listing) == ["tiktoken.model"]


def test_a_tied_head_needs_the_embeddings_in_the_last_stage(hub: Hub) -> None:
    listing = hub.listing("org/tied")
    hub.download(listing, "model.safetensors.index.json")
    directory = repo_dir(hub.root, "org/tied", listing.commit)
    assert files_for_layers(listing, directory, 3, 4, 4)[-2:] == [SHARDS[0], SHARDS[2]]
    assert files_for_layers(listing, directory, 1, 3, 4)[-2:] == SHARDS[:2]


def test_without_an_index_the_single_file(hub: Hub) -> None:
    single = RepoListing(
        REPO,
        "a" * 40,
        (
            RepoFile("config.json", 1, None, "b" * 40),
            RepoFile("model.safetensors", 9, "c" * 64, None),
        ),
    )
    assert files_for_layers(single, Path("/nonexistent"), 2, 3, 4) == [
        "config.json",
        "model.safetensors",
    ]
    with pytest.raises(ValueError, match="layers"):
        files_for_layers(single, Path("/nonexistent"), 3, 5, 4)


# --- cards from repos ---------------------------------------------------------------------------


def test_card_for_repo(hub: Hub, server: HubServer) -> None:
    card = card_for_repo(hub, REPO)
    config = json.loads((server.repos[REPO].directory / "config.json").read_text())
    assert card.id == REPO and card.hf_repo == REPO
    assert (card.architecture, card.layers, card.hidden_size) == ("llama", 4, config["hidden_size"])
    assert (card.heads, card.kv_heads, card.head_dim) == (4, 2, config["head_dim"])
    assert card.vocab_size == config["vocab_size"] and card.context_length == 256
    assert card.storage_bytes == sum(server.repos[REPO].entries[s].size for s in SHARDS)
    assert (card.quantization, card.quant) == ("bf16", "fp16")
    assert card.weights == (HubWeights(format="safetensors", repo=REPO),)
    # only config.json was downloaded
    assert {a.path.rsplit("/", 1)[-1] for a in server.downloads(REPO)} == {"config.json"}


@pytest.mark.parametrize(("bits", "label", "quant"), [(4, "4bit", "int4"), (8, "8bit", "int8")])
def test_card_of_an_mlx_repo(hub: Hub, bits: int, label: str, quant: str) -> None:
    listing = hub.listing(REPO)
    config = {
        "model_type": "qwen3",
        "num_hidden_layers": 28,
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "quantization": {"group_size": 64, "bits": bits},
    }
    card = card_from_config("mlx-community/Qwen3-0.6B", config, listing)
    assert (card.quantization, card.quant, card.weights[0].format) == (label, quant, "mlx")
    assert (card.layers, card.head_dim, card.context_length) == (28, 128, 40960)


def test_a_repo_without_weights_has_no_card(tmp_path: Path, server: HubServer, hub: Hub) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(server.repos[REPO].directory / "config.json", bare / "config.json")
    server.add("org/bare", bare)
    with pytest.raises(Exception, match="no safetensors or GGUF"):
        card_for_repo(hub, "org/bare")


def test_huggingface_hub_itself_reads_the_stand_in(server: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    got = hf_hub_download(REPO, SHARDS[1], cache_dir=tmp_path, endpoint=server.url)
    assert Path(got).read_bytes() == (server.repos[REPO].directory / SHARDS[1]).read_bytes()
    snapshot = Path(snapshot_download(REPO, cache_dir=tmp_path, endpoint=server.url))
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(server.repos[REPO].entries)
