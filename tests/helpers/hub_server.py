"""A Hugging Face Hub stand-in: a stdlib HTTP server answering what huggingface_hub asks.

It serves model repos from directories on disk (repo id → directory) at one fixed commit each:
  GET  /api/models/{repo}[/revision/{rev}]        id, sha, siblings (with sizes and LFS: ?blobs)
  GET  /api/models/{repo}/tree/{rev}[/{path}]     [{type, oid, size, path, lfs}] (?recursive=true)
  POST /api/models/{repo}/paths-info/{rev}        the same entries, for the form's `paths`
  HEAD/GET /{repo}/resolve/{rev}/{path}           X-Repo-Commit, quoted ETag, Content-Length,
                                                  Accept-Ranges; Range → 206 (416 past the end)
Unknown repos, revisions and files get 404 with X-Error-Code (RepoNotFound, RevisionNotFound,
EntryNotFound) as the Hub sends them; a gated repo wants `Authorization: Bearer <token>` (401
without one, 403 with a wrong one, X-Error-Code GatedRepo). LFS files (*.safetensors, *.gguf)
have their sha256 as ETag and `lfs` entry, the others their git blob sha1.

Tests read `log` (method, path, range, status, body bytes sent), switch the server `down` (every
connection is closed unanswered), slow bodies down (`rate`, bytes/s) or cut them after
`cut_after` bytes (the connection is dropped, as a crash of the Hub's side would).
"""

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".npz")
CHUNK = 64 * 1024


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One file of a served repo, as the tree API lists it."""

    path: str
    size: int
    oid: str  # git blob sha1 (of the LFS pointer for LFS files)
    sha256: str | None  # LFS files only
    pointer_size: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "file",
            "oid": self.oid,
            "size": self.size,
            "path": self.path,
        }
        if self.sha256 is not None:
            out["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return out

    @property
    def etag(self) -> str:
        return self.sha256 if self.sha256 is not None else self.oid


def _entry(root: Path, file: Path) -> Entry:
    data = file.read_bytes()
    path = file.relative_to(root).as_posix()
    if not path.endswith(LFS_SUFFIXES):
        return Entry(path, len(data), git_blob_sha1(data), None)
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
    ).encode()
    return Entry(path, len(data), git_blob_sha1(pointer), sha256, len(pointer))


@dataclass
class Repo:
    """A directory served as a repo at one commit (the hash of its files' ids)."""

    directory: Path
    gated: bool = False
    entries: dict[str, Entry] = field(default_factory=dict)
    commit: str = ""

    def scan(self) -> None:
        """Read the directory again (after a test changed it): new entries, new commit."""
        files = sorted(p for p in self.directory.rglob("*") if p.is_file())
        self.entries = {e.path: e for e in (_entry(self.directory, f) for f in files)}
        ids = "".join(f"{e.path}\0{e.oid}\n" for e in self.entries.values())
        self.commit = hashlib.sha1(ids.encode()).hexdigest()


@dataclass(frozen=True)
class Access:
    """One request the server answered (or dropped)."""

    method: str
    path: str  # URL path, unquoted, without the query
    range: str | None  # the Range header as sent
    status: int  # 0: dropped unanswered (the server was down)
    sent: int  # body bytes written to the socket


class HubServer:
    """The stand-in on 127.0.0.1:<free port>; `with HubServer({...}) as hub:` runs it."""

    def __init__(
        self, repos: dict[str, Path] | None = None, *, token: str = "hf_test_token"
    ) -> None:
        self.repos: dict[str, Repo] = {}
        self.token = token  # what gated repos accept
        self.log: list[Access] = []
        self.down = False
        self.rate: float | None = None  # body bytes per second; None: as fast as possible
        self.cut_after: int | None = None  # drop a body's connection after this many bytes
        self._lock = threading.Lock()
        self._active = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        for repo, directory in (repos or {}).items():
            self.add(repo, directory)

    @property
    def url(self) -> str:
        """The endpoint to give huggingface_hub (HF_ENDPOINT)."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def add(self, repo: str, directory: Path, *, gated: bool = False) -> Repo:
        """Serve `directory` as `repo` (at a commit made from its files)."""
        served = Repo(Path(directory), gated)
        served.scan()
        self.repos[repo] = served
        return served

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what tests read ---

    def downloads(self, repo: str, path: str | None = None) -> list[Access]:
        """The GETs of files of `repo` (of one file, if given), in order."""
        prefix = f"/{repo}/resolve/"
        return [
            a
            for a in self.access()
            if a.method == "GET"
            and a.path.startswith(prefix)
            and (path is None or a.path.split("/", 5)[-1] == path)
        ]

    def sent(self, repo: str, path: str | None = None) -> int:
        """Body bytes sent for `repo`'s files (one file's, if given)."""
        return sum(a.sent for a in self.downloads(repo, path))

    def access(self) -> list[Access]:
        with self._lock:
            return list(self.log)

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Wait until no request is in flight (a killed client's transfer has been logged)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._active == 0:
                    return
            time.sleep(0.02)
        raise TimeoutError("the Hub stand-in still has requests in flight")

    # --- used by the handler ---

    def _record(self, access: Access) -> None:
        with self._lock:
            self.log.append(access)

    def _busy(self, delta: int) -> None:
        with self._lock:
            self._active += delta


class _Dropped(Exception):
    """The client went away, or the server cut the connection on purpose."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "HubStandIn/1"

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    # --- routing ---

    def _serve(self, method: str) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        path = unquote(url.path)
        self._sent = 0
        self._status = 0
        hub._busy(1)
        try:
            if hub.down:
                self.close_connection = True
                return
            query = parse_qs(url.query)
            if path.startswith("/api/models/"):
                self._api(method, path[len("/api/models/") :], query)
            elif "/resolve/" in path:
                self._resolve(method, path)
            else:
                self._error(404, "EntryNotFound", "no such route")
        except (_Dropped, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            hub._record(Access(method, path, self.headers.get("Range"), self._status, self._sent))
            hub._busy(-1)

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.gated:
            auth = self.headers.get("Authorization")
            if auth is None:
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted")
                return None
            if auth != f"Bearer {self.hub.token}":
                self._error(403, "GatedRepo", f"Access to model {repo_id} is not granted")
                return None
        return repo

    def _revision(self, repo: Repo, rev: str) -> bool:
        if rev in ("main", repo.commit):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return False

    def _api(self, method: str, rest: str, query: dict[str, list[str]]) -> None:
        parts = rest.split("/")
        repo_id, action = "/".join(parts[:2]), parts[2:]
        repo = self._repo(repo_id)
        if repo is None:
            return
        if not action or action[0] == "revision":
            rev = "/".join(action[1:]) or "main"
            if self._revision(repo, rev):
                self._json(self._info(repo_id, repo, "blobs" in query))
        elif action[0] == "tree" and len(action) >= 2:
            if self._revision(repo, action[1]):
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                self._tree(repo, "/".join(action[2:]), recursive)
        elif action[0] == "paths-info" and method == "POST" and len(action) >= 2:
            if self._revision(repo, action[1]):
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                self._json(
                    [repo.entries[p].to_json() for p in form.get("paths", []) if p in repo.entries]
                )
        else:
            self._error(404, "EntryNotFound", "no such route")

    def _info(self, repo_id: str, repo: Repo, blobs: bool) -> dict[str, Any]:
        siblings = []
        for e in repo.entries.values():
            sibling: dict[str, Any] = {"rfilename": e.path}
            if blobs:
                sibling |= {"size": e.size, "blobId": e.oid}
                if e.sha256 is not None:
                    sibling["lfs"] = {
                        "sha256": e.sha256,
                        "size": e.size,
                        "pointerSize": e.pointer_size,
                    }
            siblings.append(sibling)
        return {
            "_id": repo.commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.commit,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }

    def _tree(self, repo: Repo, folder: str, recursive: bool) -> None:
        prefix = f"{folder.rstrip('/')}/" if folder else ""
        inside = [e for e in repo.entries.values() if e.path.startswith(prefix)]
        if folder and not inside:
            self._error(404, "EntryNotFound", f"{folder} does not exist")
            return
        out: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for e in inside:
            rest = e.path[len(prefix) :]
            *subdirs, _ = rest.split("/")
            for depth in range(len(subdirs) if recursive else min(1, len(subdirs))):
                dirs.add(prefix + "/".join(subdirs[: depth + 1]))
            if recursive or not subdirs:
                out.append(e.to_json())
        folders = [
            {"type": "directory", "oid": git_blob_sha1(d.encode()), "size": 0, "path": d}
            for d in sorted(dirs)
        ]
        self._json(folders + out)

    def _resolve(self, method: str, path: str) -> None:
        repo_id, _, rest = path.lstrip("/").partition("/resolve/")
        rev, _, file = rest.partition("/")
        repo = self._repo(repo_id)
        if repo is None or not self._revision(repo, rev):
            return
        entry = repo.entries.get(file)
        if entry is None:
            self._error(404, "EntryNotFound", f"{file} does not exist on {rev}")
            return
        start, end = 0, entry.size
        status = 200
        wanted = self.headers.get("Range")
        if wanted is not None and wanted.startswith("bytes="):
            first, _, last = wanted[len("bytes=") :].partition("-")
            start = int(first or 0)
            end = min(int(last) + 1, entry.size) if last else entry.size
            if start >= entry.size:
                self._status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{entry.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self._status = status
        self.send_response(status)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{entry.etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{entry.size}")
        self.end_headers()
        if method == "GET":
            self._body(repo.directory / file, start, end)

    # --- answers ---

    def _body(self, file: Path, start: int, end: int) -> None:
        hub = self.hub
        with file.open("rb") as f:
            f.seek(start)
            for chunk in _chunks(f, end - start):
                if hub.cut_after is not None and self._sent + len(chunk) > hub.cut_after:
                    chunk = chunk[: max(0, hub.cut_after - self._sent)]
                    self.wfile.write(chunk)
                    self._sent += len(chunk)
                    self.wfile.flush()
                    raise _Dropped
                self.wfile.write(chunk)
                self.wfile.flush()
                self._sent += len(chunk)
                if hub.rate is not None:
                    time.sleep(len(chunk) / hub.rate)

    def _json(self, body: Any) -> None:
        data = json.dumps(body).encode()
        self._status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self._sent = len(data)

    def _error(self, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        self._status = status
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _chunks(f: Any, n: int) -> Iterator[bytes]:
    while n > 0:
        chunk = f.read(min(CHUNK, n))
        if not chunk:
            return
        n -= len(chunk)
        yield chunk
