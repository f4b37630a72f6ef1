"""Model files between members: a node serves the Hub files it holds, and copies files from
several peers at once by byte range.

Members only: the server speaks mutual TLS with the cluster's contexts (`net/credentials.py`),
so a plain TCP client or one from another CA fails the handshake; each request's peer is the
node id in its certificate, and revoked ids get 403. It serves only what the Hub cache holds
complete and verified (`models/hub.py`'s layout: `<root>/<org>--<name>/<commit>/<path>` whose
`.shoal/<path>.ok` marker matches its size and mtime) and is named in the repo's listing, so a
path cannot leave the commit directory or reach `.shoal/`.

    GET /v1/repos/{org}/{name}/{revision}             {"listing": RepoListing, "held": [paths]}
    GET /v1/repos/{org}/{name}/{commit}/files/{path}  the bytes; one Range → 206, else 416/400

The client splits a file into ranges and pulls them from every given peer at once: each peer
takes the next range when it finishes one, and when none is left an idle peer takes the second
half of the largest range still in flight, so a slow peer's work goes to the fast ones and a
failed peer's rest goes back on the queue. The bytes land at their offsets in
`.shoal/<path>.part`; the file is then checked (size, sha256 or git blob id) and moved into place
with its `.ok` marker, as a Hub download is.

Resuming: a `.part` without a `.part.ranges` record is a Hub download, valid up to its size;
with one, the record says which ranges are there (it is rewritten as each range completes, so a
kill -9 loses at most the ranges in flight). A copy that fails or is cancelled cuts the `.part`
back to its contiguous start and drops the record, so the Hub's resume by size stays right.
"""

import asyncio
import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shoal.errors import ShoalError
from shoal.models.hub import RepoFile, RepoListing, repo_dir, verify
from shoal.net.credentials import BadCertificate, peer_node_id
from shoal.types.ids import NodeId

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (bytes of this file here, its size)

RANGE_BYTES = 32 << 20  # one request's share of a large file
MIN_STEAL_BYTES = 4 << 20  # an idle peer splits a range in flight only above twice this
CHUNK_BYTES = 1 << 20  # the server's read size (Starlette's default 64 KiB costs ~20 % here)
SHOAL_DIR = ".shoal"  # the cache's private files: listings, .part, .ok (never served)
LISTING = "listing.json"
_PEER = "shoal.peer"  # the scope key that carries the verified peer's node id
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # an org, a name, a revision, a commit


class PeerFetchFailed(ShoalError):
    """No peer could send a file (all failed or refused); the message names the file."""


# -- the cache layout, read-only: which files this node holds ------------------------------


def _segment_ok(s: str) -> bool:
    return _SEGMENT.fullmatch(s) is not None and ".." not in s


def _rel_ok(path: str) -> bool:
    """A repo-relative file path that stays inside its commit directory and out of .shoal/."""
    parts = path.split("/")
    return (
        "\\" not in path
        and "\0" not in path
        and all(p not in ("", ".", "..") for p in parts)
        and parts[0] != SHOAL_DIR
    )


def marker_path(commit_dir: Path, path: str) -> Path:
    """Where the verified marker of a file lives."""
    return commit_dir / SHOAL_DIR / f"{path}.ok"


def part_path(commit_dir: Path, path: str) -> Path:
    """Where a file's partial download lives."""
    return commit_dir / SHOAL_DIR / f"{path}.part"


def holds(commit_dir: Path, file: RepoFile) -> bool:
    """Whether the file is here complete and verified: its marker matches its size and mtime."""
    try:
        st = (commit_dir / file.path).stat()
        mark = json.loads(marker_path(commit_dir, file.path).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(mark, dict)
        and st.st_size == file.size == mark.get("size")
        and st.st_mtime_ns == mark.get("mtime_ns")
    )


def write_marker(commit_dir: Path, path: str, sha256: str) -> None:
    """Record a verified file: {"size", "mtime_ns", "sha256"}, written atomically."""
    st = (commit_dir / path).stat()
    mark = marker_path(commit_dir, path)
    mark.parent.mkdir(parents=True, exist_ok=True)
    tmp = mark.with_name(f".{mark.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}))
    os.replace(tmp, mark)


def _commit_dir(root: Path, repo: str, commit: str) -> Path | None:
    """repo_dir, or None for what is not a repo id and a commit id."""
    try:
        return repo_dir(root, repo, commit)
    except ShoalError:
        return None


def _commit_of(root: Path, repo: str, revision: str) -> str | None:
    """The commit a revision stands for here: refs/<revision>, or a commit held by that name."""
    with contextlib.suppress(OSError):
        return (root / repo.replace("/", "--") / "refs" / revision).read_text().strip()
    return revision


def _listing(directory: Path) -> RepoListing | None:
    """The listing saved in a commit directory, if any."""
    try:
        return RepoListing.from_json(json.loads((directory / SHOAL_DIR / LISTING).read_text()))
    except (OSError, ValueError, KeyError, TypeError, ShoalError):
        return None


# -- the server ------------------------------------------------------------------------------


class _PeerProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, handing the node id in the client's certificate to the app
    (uvicorn puts nothing of TLS in the scope; asyncio calls this after the handshake)."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        peer: NodeId | None = None
        conn = transport.get_extra_info("ssl_object")
        if conn is not None:
            with contextlib.suppress(BadCertificate):
                peer = peer_node_id(conn)
        inner = self.app

        async def with_peer(scope: Scope, receive: Receive, send: Send) -> None:
            scope[_PEER] = peer
            await inner(scope, receive, send)

        self.app = with_peer


class _MembersOnly:
    """403 unless the request came over TLS from a member not revoked; counts bytes sent."""

    def __init__(self, app: ASGIApp, revoked: Callable[[], Collection[NodeId]]) -> None:
        self.app = app
        self.revoked = revoked
        self.sent_bytes = 0
        self.peers: collections.Counter[NodeId] = collections.Counter()  # file bytes, by peer
        self._warned: set[NodeId | None] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        peer = scope.get(_PEER)
        if peer is None or peer in self.revoked():
            if peer not in self._warned:
                self._warned.add(peer)
                log.warning("refusing model files to %s: not a member", peer or "a peer")
            await PlainTextResponse("not a member of this cluster", 403)(scope, receive, send)
            return

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.body":
                self.sent_bytes += len(message.get("body", b""))
                self.peers[peer] += len(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, counting)


class _File(FileResponse):
    chunk_size = CHUNK_BYTES
    max_ranges = 1  # the client asks for one range at a time; for more, the whole file


def _app(root: Path) -> Starlette:
    """The two routes, over the cache at root."""

    def repo_of(request: Request) -> str | None:
        org, name = request.path_params["org"], request.path_params["name"]
        return f"{org}/{name}" if _segment_ok(org) and _segment_ok(name) else None

    def listing(request: Request) -> Response:
        repo, revision = repo_of(request), request.path_params["revision"]
        commit = _commit_of(root, repo, revision) if repo and _segment_ok(revision) else None
        directory = _commit_dir(root, repo, commit) if repo and commit else None
        found = _listing(directory) if directory else None
        if directory is None or found is None:
            return PlainTextResponse("no such repo or revision here", 404)
        held = [f.path for f in found.files if _rel_ok(f.path) and holds(directory, f)]
        return JSONResponse({"listing": found.to_json(), "held": held})

    def file(request: Request) -> Response:
        repo, commit = repo_of(request), request.path_params["commit"]
        path = request.path_params["path"]
        missing = PlainTextResponse("no such file held here", 404)
        directory = _commit_dir(root, repo, commit) if repo and _segment_ok(commit) else None
        if directory is None or not _rel_ok(path):
            return missing
        found = _listing(directory)
        wanted = next((f for f in found.files if f.path == path), None) if found else None
        if wanted is None or not holds(directory, wanted):
            return missing
        real = (directory / path).resolve()
        if not real.is_relative_to(directory.resolve()) or not real.is_file():
            return missing  # a symlink out of the commit directory
        log.debug(
            "serving %s/%s to %s (%s)",
            repo,
            path,
            request.scope[_PEER],
            request.headers.get("range", "whole"),
        )
        return _File(real, stat_result=real.stat(), media_type="application/octet-stream")

    routes = [
        Route("/v1/repos/{org}/{name}/{revision}", listing, methods=["GET"]),
        Route("/v1/repos/{org}/{name}/{commit}/files/{path:path}", file, methods=["GET"]),
    ]
    return Starlette(routes=routes)


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the node owns SIGINT/SIGTERM


class FileServer:
    """Serves the Hub cache at root to members over mutual TLS; start() it, then stop() it."""

    def __init__(
        self,
        root: Path,
        ssl_context: ssl.SSLContext,  # Credentials.server_ssl_context(): demands a member cert
        revoked: Callable[[], Collection[NodeId]],
        *,
        max_connections: int = 64,  # past it, 503
    ) -> None:
        self.root = root
        self._members = _MembersOnly(_app(root), revoked)
        self._config = uvicorn.Config(
            self._members,
            log_config=None,  # the node configures logging
            log_level="warning",
            lifespan="off",
            http=_PeerProtocol,
            ssl_context_factory=lambda _config, _default: ssl_context,
            limit_concurrency=max_connections,
            timeout_graceful_shutdown=5,
        )
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def sent_bytes(self) -> int:
        """Body bytes sent to members so far (listings and files)."""
        return self._members.sent_bytes

    @property
    def sent_to(self) -> collections.Counter[NodeId]:
        """Body bytes sent so far, by member."""
        return self._members.peers

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on host:port (0: any free port); returns the bound port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self._server = server = _Uvicorn(self._config)
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="file-server")
        while not server.started:
            if self._task.done():
                self._task.result()
                raise ShoalError("the file server stopped while starting")
            await asyncio.sleep(0.01)
        bound: int = sock.getsockname()[1]
        log.info("serving model files to members on %s:%d", host, bound)
        return bound

    async def stop(self) -> None:
        """Stop listening; transfers in progress get a few seconds, then are cut."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._server = self._task = None


# -- the client ------------------------------------------------------------------------------


@dataclass
class _Span:
    """Bytes [pos, end) still to fetch; [begin, pos) are written."""

    begin: int
    end: int  # an idle peer may take the second half, lowering it
    pos: int = field(init=False)

    def __post_init__(self) -> None:
        self.pos = self.begin


class _Bad(Exception):
    """A peer answered something other than the bytes asked for."""


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(s for s in spans if s[0] < s[1]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class _Copy:
    """One file from several peers: the queue of ranges, the ranges done, the .part file."""

    def __init__(self, file: RepoFile, part: Path, range_bytes: int, min_steal: int) -> None:
        self.file = file
        self.part = part
        self.record = part.with_name(part.name + ".ranges")
        self.min_steal = min_steal
        self.done = self._resumed()
        gaps = self._gaps()
        self.queue = collections.deque(
            _Span(a, min(a + range_bytes, b)) for a, b in gaps for a in range(a, b, range_bytes)
        )
        self.spans: dict[int, _Span] = {}  # in flight, by id
        self.changed = asyncio.Condition()

    def _resumed(self) -> list[tuple[int, int]]:
        size = self.file.size
        with contextlib.suppress(OSError, ValueError, TypeError):
            record = json.loads(self.record.read_text())
            if record["size"] == size and self.part.stat().st_size <= size:
                return _merge([(int(a), min(int(b), size)) for a, b in record["done"]])
        with contextlib.suppress(OSError):
            have = self.part.stat().st_size
            if have <= size:
                return _merge([(0, have)])  # a Hub download's start
            os.truncate(self.part, 0)
        return []

    def _gaps(self) -> list[tuple[int, int]]:
        gaps, at = [], 0
        for a, b in self.done:
            gaps.append((at, a))
            at = b
        gaps.append((at, self.file.size))
        return [(a, b) for a, b in gaps if a < b]

    @property
    def have(self) -> int:
        """Bytes written so far, done ranges and the progress of those in flight."""
        return sum(b - a for a, b in self.done) + sum(s.pos - s.begin for s in self.spans.values())

    def take(self) -> _Span | None:
        """The next range to fetch, or half of the largest one in flight; None: nothing to do."""
        if self.queue:
            span = self.queue.popleft()
        else:
            largest = max(self.spans.values(), key=lambda s: s.end - s.pos, default=None)
            if largest is None or largest.end - largest.pos < 2 * self.min_steal:
                return None
            mid = largest.pos + (largest.end - largest.pos) // 2
            span, largest.end = _Span(mid, largest.end), mid
        self.spans[id(span)] = span
        return span

    async def settle(self, span: _Span, ok: bool) -> None:
        """A span's fetch ended: what it wrote is done; the rest goes back if it failed."""
        del self.spans[id(span)]
        self.done = _merge([*self.done, (span.begin, span.pos)])
        if not ok and span.pos < span.end:
            self.queue.appendleft(_Span(span.pos, span.end))
        with contextlib.suppress(OSError):
            tmp = self.record.with_name(self.record.name + ".tmp")
            tmp.write_text(json.dumps({"size": self.file.size, "done": self.done}))
            os.replace(tmp, self.record)
        async with self.changed:
            self.changed.notify_all()

    @property
    def finished(self) -> bool:
        return self.done == [(0, self.file.size)] or self.file.size == 0

    def abandon(self) -> None:
        """Keep only the contiguous start of the .part (what a Hub resume reads), no record."""
        prefix = self.done[0][1] if self.done and self.done[0][0] == 0 else 0
        with contextlib.suppress(OSError):
            os.truncate(self.part, prefix)
        self.record.unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def _flock(part: Path) -> AsyncIterator[None]:
    """The lock the Hub's download takes beside the .part (flock: one writer per file across
    processes and threads); polled, so that waiting for it can be cancelled."""
    with part.with_name(f"{part.name}.lock").open("a") as f:
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class PeerFiles:
    """Asks members for repo listings and copies files from them (the client half)."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,  # Credentials.client_ssl_context(): presents our cert
        *,
        range_bytes: int = RANGE_BYTES,
        streams_per_peer: int = 2,
        min_steal_bytes: int = MIN_STEAL_BYTES,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,  # a peer silent this long mid-file has failed
    ) -> None:
        timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s, pool=None)
        self._http = httpx.AsyncClient(verify=ssl_context, timeout=timeout, trust_env=False)
        self.range_bytes = range_bytes
        self.streams_per_peer = streams_per_peer
        self.min_steal_bytes = min_steal_bytes
        self.received: collections.Counter[str] = collections.Counter()  # bytes, by address
        self._locks: dict[Path, asyncio.Lock] = {}

    async def aclose(self) -> None:
        """Close the connections kept open to peers."""
        await self._http.aclose()

    async def listing(
        self, addr: str, repo: str, revision: str
    ) -> tuple[RepoListing, set[str]] | None:
        """The peer's listing of repo at revision and the paths it holds; None if it has none."""
        try:
            r = await self._http.get(f"https://{addr}/v1/repos/{repo}/{quote(revision)}")
        except httpx.HTTPError as exc:
            log.debug("no listing of %s from %s: %s", repo, addr, exc)
            return None
        if r.status_code != 200:
            log.debug("no listing of %s from %s: HTTP %d", repo, addr, r.status_code)
            return None
        try:
            body = r.json()
            return RepoListing.from_json(body["listing"]), {str(p) for p in body["held"]}
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s sent a malformed listing of %s: %s", addr, repo, exc)
            return None

    async def fetch(
        self,
        addrs: list[str],
        repo: str,
        commit: str,
        file: RepoFile,
        dest_dir: Path,  # the commit directory: repo_dir(root, repo, commit)
        progress: ProgressFn | None = None,
    ) -> Path:
        """Copy one file from the peers at addrs into dest_dir, checked; returns its path.

        PeerFetchFailed when no peer can send it; the hub's CorruptFile when the copy does not
        match the listing (it is deleted)."""
        final = dest_dir / file.path
        if not _rel_ok(file.path):
            raise PeerFetchFailed(f"{file.path}: not a path inside a repo")
        part = part_path(dest_dir, file.path)
        part.parent.mkdir(parents=True, exist_ok=True)
        async with self._locks.setdefault(final, asyncio.Lock()), _flock(part):
            if holds(dest_dir, file):
                if progress is not None:
                    progress(file.size, file.size)
                return final
            copy = _Copy(file, part, self.range_bytes, self.min_steal_bytes)
            started, first = time.monotonic(), copy.have
            where = f"/v1/repos/{repo}/{commit}/files/{quote(file.path)}"
            fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                errors = await self._pull_all(copy, addrs, where, fd, progress)
                if not copy.finished:
                    raise PeerFetchFailed(f"{file.path}: no peer could send it ({errors})")
                os.fsync(fd)
            except BaseException:
                copy.abandon()
                raise
            finally:
                os.close(fd)
            copy.record.unlink(missing_ok=True)
            sha256 = await asyncio.to_thread(_check, part, file)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, final)
            write_marker(dest_dir, file.path, sha256)
        took = time.monotonic() - started
        log.info(
            "copied %s (%.1f MB) from %d peer(s) in %.1f s (%.0f MB/s)",
            file.path,
            file.size / 1e6,
            len(addrs),
            took,
            (copy.have - first) / 1e6 / max(took, 1e-9),
        )
        return final

    async def _pull_all(
        self, copy: _Copy, addrs: list[str], where: str, fd: int, progress: ProgressFn | None
    ) -> str:
        """Run every peer's streams until the file is whole or every peer failed; the errors."""
        failed: dict[str, str] = {}

        def moved() -> None:
            if progress is not None:
                progress(copy.have, copy.file.size)

        async def stream(addr: str) -> None:
            while addr not in failed and not copy.finished:
                span = copy.take()
                if span is None:
                    if not copy.spans:
                        return  # nothing queued, nothing in flight that could fail
                    async with copy.changed:
                        await copy.changed.wait()
                    continue
                try:
                    await self._pull(addr, f"https://{addr}{where}", copy.file, span, fd, moved)
                except (httpx.HTTPError, OSError, _Bad) as exc:
                    if addr not in failed:
                        failed[addr] = f"{addr}: {exc or type(exc).__name__}"
                        log.info(
                            "peer %s failed sending %s (%s); the others take its part",
                            addr,
                            copy.file.path,
                            exc or type(exc).__name__,
                        )
                    await copy.settle(span, ok=False)
                    return
                await copy.settle(span, ok=True)

        moved()
        async with asyncio.TaskGroup() as group:
            for addr in dict.fromkeys(addrs):
                for _ in range(self.streams_per_peer):
                    group.create_task(stream(addr))
        return "; ".join(failed.values()) or "no peers"

    async def _pull(
        self, addr: str, url: str, file: RepoFile, span: _Span, fd: int, moved: Callable[[], None]
    ) -> None:
        """Fetch span from one peer into fd at its offsets (span.end may shrink meanwhile)."""
        asked = f"{span.pos}-{span.end - 1}"  # span.end may be lowered while we wait
        async with self._http.stream("GET", url, headers={"Range": f"bytes={asked}"}) as r:
            want = f"bytes {asked}/{file.size}"
            if r.status_code != 206 or r.headers.get("content-range") != want:
                raise _Bad(f"HTTP {r.status_code} {r.headers.get('content-range')!r}, not {want}")
            async for chunk in r.aiter_raw():
                n = min(len(chunk), span.end - span.pos)
                os.pwrite(fd, chunk[:n] if n < len(chunk) else chunk, span.pos)
                span.pos += n
                self.received[addr] += n
                moved()
                if span.pos >= span.end:
                    return  # done, or the rest was taken by an idle peer
        if span.pos < span.end:
            raise _Bad(f"the answer ended at byte {span.pos} of {span.end}")


def _check(path: Path, file: RepoFile) -> str:
    """verify() the copy (deleting it on a mismatch); its sha256 for the marker."""
    try:
        verify(path, file)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if file.sha256 is not None:
        return file.sha256
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
