"""Hugging Face Hub downloads into shoal's own cache: listed, resumable across processes, verified.

The cache (`<data_dir>/hub`, see `repo_dir`) holds, per repo and commit, only complete and
verified files at their repo paths, so `<root>/<org>--<name>/<commit>/` is a model directory
even when it holds a stage's shards only. Bookkeeping lives beside them in `.shoal/`: the
listing (`listing.json`), partial downloads (`<path>.part`) and verified markers (`<path>.ok`:
size, mtime and sha256; a file whose size or mtime changed is hashed again).

huggingface_hub (>= 0.23) answers the metadata: the commit a revision names (`model_info`) and
the file tree at that commit with sizes and LFS sha256 (`list_repo_tree`). The bytes are moved
here with httpx, because huggingface_hub 2.4 resumes an interrupted download only within one
`hf_hub_download` call, not after a crash or kill -9: a `.part` file left by a dead process is
continued by an HTTP `Range: bytes=N-` request.
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from shoal.errors import ModelNotFound, ModelUnavailable

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (done_bytes, total_bytes)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_STATE = ".shoal"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_CHUNK = 1 << 20
_HINT = "use --model-path with local files, or let a peer that holds them serve them"


# --- errors: one line naming the repo and what to do ------------------------------------------


class HubError(ModelUnavailable):
    """The Hub could not give us a repo's files (the message says which repo and what to do)."""


class HubUnreachable(HubError):
    """No answer from the Hub: no network, or the endpoint is down."""


class HubAccessDenied(HubError):
    """401/403: the repo is gated or private and we sent no token, or one without access."""


class RepoNotFound(ModelNotFound):
    """The Hub has no such repo (or revision)."""


class FileNotOnHub(ModelNotFound):
    """The repo has no such file at that commit."""


class CorruptFile(HubError):
    """A file's size or hash differs from the repo listing; it was deleted."""


# --- the listing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoFile:
    """One file of a repo at a commit: size, and sha256 (LFS files) or git blob sha1 (others)."""

    path: str
    size: int
    sha256: str | None
    blob_id: str | None

    def __post_init__(self) -> None:
        parts = self.path.split("/")
        if self.path.startswith("/") or ".." in parts or _STATE in parts or "" in parts:
            raise ValueError(f"unsafe path in a repo listing: {self.path!r}")


@dataclass(frozen=True)
class RepoListing:
    """A repo's files at one commit."""

    repo: str
    commit: str
    files: tuple[RepoFile, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "commit": self.commit,
            "files": [
                {"path": f.path, "size": f.size, "sha256": f.sha256, "blob_id": f.blob_id}
                for f in self.files
            ],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RepoListing":
        files = tuple(
            RepoFile(str(f["path"]), int(f["size"]), f.get("sha256"), f.get("blob_id"))
            for f in d["files"]
        )
        return cls(_checked_repo(str(d["repo"])), _checked_commit(str(d["commit"])), files)

    def file(self, path: str) -> RepoFile:
        """The listed file at `path`; FileNotOnHub if the repo has none."""
        for f in self.files:
            if f.path == path:
                return f
        raise FileNotOnHub(f"{self.repo} has no file {path!r} at {self.commit[:12]}")

    def has(self, path: str) -> bool:
        return any(f.path == path for f in self.files)


def _checked_repo(repo: str) -> str:
    if not _REPO_ID.fullmatch(repo) or ".." in repo:
        raise RepoNotFound(f"{repo!r} is not a Hugging Face repo id (org/name)")
    return repo


def _checked_commit(commit: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{7,64}", commit):
        raise HubError(f"the Hub gave {commit!r} as a commit id")
    return commit


def repo_dir(root: Path, repo: str, commit: str) -> Path:
    """Where a repo's files at a commit live: <root>/<org>--<name>/<commit>."""
    return root / _checked_repo(repo).replace("/", "--") / _checked_commit(commit)


# --- verifying files --------------------------------------------------------------------------


def _hashes(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file's bytes."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest()


def _check(path: Path, expected: RepoFile, name: str) -> str:
    """The file's sha256 if it matches the listing; CorruptFile naming `name` otherwise."""
    size = path.stat().st_size
    if size != expected.size:
        raise CorruptFile(f"{name}: {size} bytes, the listing says {expected.size}")
    sha256, blob = _hashes(path)
    if expected.sha256 is not None and sha256 != expected.sha256:
        raise CorruptFile(
            f"{name}: sha256 {sha256[:12]}…, the listing says {expected.sha256[:12]}…"
        )
    if expected.sha256 is None and expected.blob_id is not None and blob != expected.blob_id:
        raise CorruptFile(
            f"{name}: git blob {blob[:12]}…, the listing says {expected.blob_id[:12]}…"
        )
    return sha256


def verify(path: Path, expected: RepoFile) -> None:
    """Check size and sha256 (LFS) or git blob sha1 (others); CorruptFile naming the file."""
    _check(path, expected, str(path))


# --- which files a stage needs ----------------------------------------------------------------

_SMALL = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens"
    r"|preprocessor_config|chat_template)\.(json|jinja)|tokenizer\.model|vocab\.json|merges\.txt"
    r"|.*\.tiktoken|tiktoken\.model|chat_template.*\.jinja"
)
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_EMBED = ("embed_tokens", "wte", "tok_embeddings", "word_embeddings", "embeddings")


def small_files(listing: RepoListing) -> list[str]:
    """Config, tokenizer and chat template files (top level): every stage wants them."""
    return [f.path for f in listing.files if "/" not in f.path and _SMALL.fullmatch(f.path)]


def files_for_layers(
    listing: RepoListing, directory: Path, start: int, end: int, n_layers: int
) -> list[str]:
    """The files a stage of layers [start, end) needs: config, tokenizer and template files, the
    index, and the safetensors files holding its layers (embeddings when start == 0; the norm and
    head when end == n_layers, and the embeddings too when the head is tied to them).

    The index is read from `directory` (download it first). Without an index: the single
    model.safetensors, else the one GGUF file, else every safetensors file.
    """
    if not 0 <= start < end <= n_layers:
        raise ValueError(f"layers [{start}, {end}) are not within [0, {n_layers})")
    wanted = small_files(listing)
    if listing.has(INDEX_FILE):
        index = directory / INDEX_FILE
        if not index.is_file():
            raise HubError(f"{listing.repo}: download {INDEX_FILE} before choosing a stage's files")
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        tied = not any(name.startswith("lm_head.") or ".lm_head." in name for name in weight_map)
        shards: set[str] = set()
        for name, file in weight_map.items():
            if _tensor_needed(name, start, end, n_layers, tied):
                shards.add(file)
        return [*wanted, INDEX_FILE, *(f.path for f in listing.files if f.path in shards)]
    if listing.has(SINGLE_FILE):
        return [*wanted, SINGLE_FILE]
    ggufs = [f.path for f in listing.files if f.path.endswith(".gguf")]
    if len(ggufs) == 1:
        return [*wanted, ggufs[0]]
    weights = [f.path for f in listing.files if f.path.endswith(".safetensors")]
    if not weights:
        raise HubError(f"{listing.repo}: no safetensors weights (GGUF: name the file in the card)")
    return [*wanted, *weights]


def _tensor_needed(name: str, start: int, end: int, n_layers: int, tied: bool) -> bool:
    layer = _LAYER.search(name)
    if layer is not None:
        return start <= int(layer.group(1)) < end
    if any(part in name for part in _EMBED):
        return start == 0 or (tied and end == n_layers)
    return end == n_layers  # final norm, lm_head and the like


# --- the Hub ----------------------------------------------------------------------------------


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network errors of httpx, and of the HTTP client huggingface_hub uses (requests before 1.0:
    an OSError; httpx2 in 2.x)."""
    errors: list[type[BaseException]] = [OSError, httpx.TransportError]
    with contextlib.suppress(ImportError):
        import httpx2  # type: ignore[import-not-found, unused-ignore]

        errors.append(httpx2.TransportError)
    return tuple(errors)


class Hub:
    """A Hub endpoint and the local cache under `root`.

    endpoint None: HF_ENDPOINT as it is now (huggingface_hub reads it only when imported, which
    may have been before a test or a launcher set it), else huggingface.co; token None:
    huggingface_hub's (HF_TOKEN, read at each request, else the saved login).
    """

    def __init__(
        self,
        root: Path,
        endpoint: str | None = None,
        token: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        from huggingface_hub import constants

        self.root = Path(root)
        endpoint = endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        self.endpoint = endpoint.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    # --- listings ---

    def listing(self, repo: str, revision: str = "main") -> RepoListing:
        """The repo's files at a revision, from the Hub (saved for `cached_listing`); the saved one
        when the Hub cannot be reached."""
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile as HfFile

        _checked_repo(repo)
        api = HfApi(endpoint=self.endpoint, token=self.token)
        try:
            with self._errors(repo, revision):
                info = api.model_info(repo, revision=revision, timeout=self.timeout_s)
                commit = _checked_commit(str(info.sha))
                tree = list(api.list_repo_tree(repo, revision=commit, recursive=True))
        except HubUnreachable:
            cached = self.cached_listing(repo, revision)
            if cached is None:
                raise
            log.info("the Hub is unreachable: using the saved listing of %s", repo)
            return cached
        files = tuple(
            RepoFile(
                path=f.path,
                size=int(f.size),
                sha256=f.lfs.sha256 if f.lfs is not None else None,
                blob_id=None if f.lfs is not None else f.blob_id,
            )
            for f in sorted((f for f in tree if isinstance(f, HfFile)), key=lambda f: f.path)
        )
        listing = RepoListing(repo, commit, files)
        self.save_listing(listing, revision)
        return listing

    def save_listing(self, listing: RepoListing, revision: str) -> None:
        """Keep a listing (from the Hub or a peer) so that `cached_listing` finds it offline."""
        directory = repo_dir(self.root, listing.repo, listing.commit)
        _write_atomic(directory / _STATE / "listing.json", json.dumps(listing.to_json()))
        _write_atomic(self._ref(listing.repo, revision), listing.commit)

    def cached_listing(self, repo: str, revision: str = "main") -> RepoListing | None:
        """The saved listing of the commit a revision last resolved to (or of a commit id)."""
        ref = self._ref(repo, revision)
        commit = ref.read_text().strip() if ref.is_file() else revision
        try:
            path = repo_dir(self.root, repo, commit) / _STATE / "listing.json"
        except (HubError, ModelNotFound):
            return None
        if not path.is_file():
            return None
        return RepoListing.from_json(json.loads(path.read_text()))

    def _ref(self, repo: str, revision: str) -> Path:
        if ".." in revision.split("/") or revision.startswith("/"):
            raise RepoNotFound(f"{repo}: {revision!r} is not a revision")
        return self.root / _checked_repo(repo).replace("/", "--") / "refs" / revision

    # --- files ---

    def local(self, listing: RepoListing, path: str) -> Path | None:
        """The file if it is here, complete and verified (hashed again when its size or mtime
        changed since it was verified); a corrupt file is deleted, named in a warning, and None."""
        expected = listing.file(path)
        directory = repo_dir(self.root, listing.repo, listing.commit)
        final, marker = directory / path, directory / _STATE / f"{path}.ok"
        try:
            st = final.stat()
        except FileNotFoundError:
            return None
        with contextlib.suppress(OSError, ValueError):
            seen = json.loads(marker.read_text())
            if seen["size"] == st.st_size == expected.size and seen["mtime_ns"] == st.st_mtime_ns:
                return final
        try:
            sha256 = _check(final, expected, f"{listing.repo}/{path}")
        except CorruptFile as exc:
            log.warning("deleted a corrupt file: %s", exc)
            final.unlink(missing_ok=True)
            marker.unlink(missing_ok=True)
            return None
        _mark(final, marker, sha256)
        return final

    def download(self, listing: RepoListing, path: str, progress: ProgressFn | None = None) -> Path:
        """The verified file, downloaded (or its `.part` continued by byte range) if not here.

        A file that fails verification is deleted and CorruptFile names it (retrying once is the
        caller's choice). One process downloads a file at a time (a lock file beside the .part).
        """
        expected = listing.file(path)
        directory = repo_dir(self.root, listing.repo, listing.commit)
        part = directory / _STATE / f"{path}.part"
        part.parent.mkdir(parents=True, exist_ok=True)
        with _locked(part.with_name(f"{part.name}.lock")):
            found = self.local(listing, path)
            if found is not None:
                if progress is not None:
                    progress(expected.size, expected.size)
                return found
            self._transfer(listing, expected, part, progress)
            name = f"{listing.repo}/{path}"
            try:
                sha256 = _check(part, expected, name)
            except CorruptFile:
                part.unlink(missing_ok=True)
                log.warning("%s failed verification: deleted it", name)
                raise
            final = directory / path
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, final)
            _mark(final, directory / _STATE / f"{path}.ok", sha256)
            log.info("downloaded %s (%d B)", name, expected.size)
            return final

    def _transfer(
        self, listing: RepoListing, file: RepoFile, part: Path, progress: ProgressFn | None
    ) -> None:
        """Bring `part` to the file's size: one GET from where it stops, again after a cut."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(listing.repo, file.path, revision=listing.commit, endpoint=self.endpoint)
        headers = build_hf_headers(token=self.token)
        headers["Accept-Encoding"] = "identity"
        timeout = httpx.Timeout(self.timeout_s)
        have = part.stat().st_size if part.exists() else 0
        if have > file.size:
            part.unlink()
            have = 0
        if progress is not None:
            progress(have, file.size)
        with httpx.Client(follow_redirects=True, timeout=timeout) as client:
            while have < file.size:  # each round moves bytes, or raises
                before = have
                try:
                    with self._errors(listing.repo, listing.commit, file.path):
                        have = self._get(client, url, headers, part, have, file, progress)
                except HubUnreachable:
                    if part.exists():
                        have = part.stat().st_size
                    if have == before:
                        raise
                    log.info("%s/%s: cut off at %d B, resuming", listing.repo, file.path, have)

    def _get(
        self,
        client: httpx.Client,
        url: str,
        headers: dict[str, str],
        part: Path,
        have: int,
        file: RepoFile,
        progress: ProgressFn | None,
    ) -> int:
        if have:
            headers = {**headers, "Range": f"bytes={have}-"}
        with client.stream("GET", url, headers=headers) as r:
            if r.status_code >= 400:
                r.read()
                raise _StatusError(r.status_code, r.headers.get("X-Error-Code"))
            if have and r.status_code != 206:  # the server ignored the range: start over
                have = 0
            with part.open("r+b" if have else "wb") as f:
                f.seek(have)
                f.truncate()
                for chunk in r.iter_bytes():
                    f.write(chunk)
                    have += len(chunk)
                    if progress is not None:
                        progress(have, file.size)
        return have

    @contextlib.contextmanager
    def _errors(self, repo: str, revision: str, path: str | None = None) -> Iterator[None]:
        """Turn what the Hub (or the lack of it) answered into one line naming the repo.

        With a path (our own transfer): only httpx's network errors, so that a full disk is
        not reported as an unreachable Hub."""
        from huggingface_hub.utils import HfHubHTTPError

        network = _transport_errors() if path is None else (httpx.TransportError,)
        try:
            yield
        except _StatusError as exc:
            raise self._http_error(repo, revision, path, exc.status, exc.code) from None
        except HfHubHTTPError as exc:
            response = getattr(exc, "response", None)
            status = getattr(response, "status_code", 0) or 0
            code = response.headers.get("X-Error-Code") if response is not None else None
            raise self._http_error(repo, revision, path, status, code) from None
        except network as exc:
            raise HubUnreachable(
                f"cannot reach the Hub at {self.endpoint} for {repo} ({type(exc).__name__}): "
                f"check the network or HF_ENDPOINT, {_HINT}"
            ) from None

    def _http_error(
        self, repo: str, revision: str, path: str | None, status: int, code: str | None
    ) -> Exception:
        what = f"{repo}/{path}" if path else repo
        if code == "EntryNotFound" and path:
            return FileNotOnHub(f"{repo} has no file {path!r} at {revision[:12]} (404)")
        if code == "RevisionNotFound":
            return RepoNotFound(f"{repo} has no revision {revision!r} (404)")
        if status in (401, 403) and code != "RepoNotFound":
            ask = "set HF_TOKEN to a token" if status == 401 else "HF_TOKEN's token has no access:"
            return HubAccessDenied(
                f"{what}: the Hub answered {status} (gated or private repo): {ask} with access "
                f"to {repo} (accept its terms on the Hub), or {_HINT}"
            )
        if status in (401, 404):
            return RepoNotFound(
                f"{repo} is not on the Hub at {self.endpoint} ({status}): check the id; if it is "
                f"private set HF_TOKEN; or {_HINT}"
            )
        return HubUnreachable(f"{what}: the Hub at {self.endpoint} answered {status}: {_HINT}")


class _StatusError(Exception):
    def __init__(self, status: int, code: str | None) -> None:
        super().__init__(status)
        self.status = status
        self.code = code


# --- small file helpers -----------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _mark(final: Path, marker: Path, sha256: str) -> None:
    st = final.stat()
    _write_atomic(
        marker, json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256})
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (flock: released if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
