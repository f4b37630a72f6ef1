"""Joining a cluster by invitation: join tokens, and the enrolment service that honours them.

A join token (`shoal invite`) holds the cluster name, the sha256 fingerprint of the cluster's CA
certificate, a one-time secret and the address of the enrolment service of the node that holds
the CA key. Never the CA key. Joining (like kubeadm/k3s join tokens):

1. The joiner opens TLS to that address without trusting it yet, asks for the CA certificate and
   keeps it only if its fingerprint is the token's.
2. It connects again, now verifying the server against that CA, and sends the secret with a
   certificate signing request for its own node key (the request proves it holds the key).
3. The server takes the secret only if it is an outstanding invite (kept as a hash, with an
   expiry, and consumed on first use), refuses a node id the cluster revoked, signs the
   certificate, has the master record the node as a member, and answers with the certificate,
   the members it may trust until its log catches up, and control endpoints to connect to.

The same service, over mutual TLS with a member's certificate, carries `shoal remove`. Messages
are one JSON line each way; every connection is bounded in size and time.
"""

import asyncio
import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shoal.errors import ShoalError
from shoal.net.credentials import (
    BadCertificate,
    Credentials,
    NoCredentials,
    csr_node_id,
    fingerprint,
    issue,
    make_csr,
    peer_node_id,
    write_private,
)
from shoal.net.identity import Identity
from shoal.types.ids import NodeId

log = logging.getLogger(__name__)

TOKEN_PREFIX = "shoal1."
INVITE_TTL_S = 24 * 3600.0
MAX_LINE = 64 * 1024
IO_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 32
JOIN_WAIT_S = 60.0  # how long a joiner keeps trying to reach the enrolment service


class JoinError(ShoalError):
    """Joining failed: a bad or used token, a CA that is not the token's, or a refusal."""


@dataclass(frozen=True)
class JoinToken:
    """What `shoal invite` prints: cluster, CA fingerprint, one-time secret, where to enrol."""

    cluster: str
    ca_fingerprint: str
    secret: str
    address: str  # host:port of the enrolment service

    def encode(self) -> str:
        data = {"c": self.cluster, "f": self.ca_fingerprint, "s": self.secret, "a": self.address}
        raw = json.dumps(data, separators=(",", ":")).encode()
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> "JoinToken":
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise JoinError("not a shoal join token (they start with 'shoal1.')")
        body = text[len(TOKEN_PREFIX) :]
        try:
            data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            token = cls(str(data["c"]), str(data["f"]), str(data["s"]), str(data["a"]))
        except (binascii.Error, ValueError, KeyError, TypeError) as exc:
            raise JoinError(f"a damaged join token: {exc}") from exc
        host, _, port = token.address.rpartition(":")
        if not host or not port.isdigit() or len(token.ca_fingerprint) != 64:
            raise JoinError("a damaged join token")
        return token

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)


# --- invites, on the node that holds the CA key ---------------------------------------------


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Invites:
    """Outstanding invites in `<data_dir>/tls/invites.json`: secret hashes and expiry times.

    `shoal invite` adds one while the node runs; the node consumes it. A file lock keeps the
    two processes from losing each other's writes.
    """

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / "tls" / "invites.json"
        self._lock = data_dir / "tls" / "invites.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, float]]:
        self._lock.parent.mkdir(parents=True, exist_ok=True)
        with self._lock.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held = json.loads(self._path.read_text()) if self._path.exists() else {}
            now = time.time()
            live = {k: float(v) for k, v in held.items() if float(v) > now}
            yield live
            write_private(self._path, json.dumps(live).encode())

    def create(self, ttl_s: float = INVITE_TTL_S) -> str:
        """A new one-time secret, valid for ttl_s."""
        secret = secrets.token_urlsafe(32)
        with self._locked() as live:
            live[_digest(secret)] = time.time() + ttl_s
        return secret

    def consume(self, secret: str) -> bool:
        """Whether secret was an outstanding invite; it is not any more."""
        digest = _digest(secret)
        with self._locked() as live:
            found = next((k for k in live if hmac.compare_digest(k, digest)), None)
            if found is not None:
                del live[found]
        return found is not None


def invite(creds: Credentials, address: str, ttl_s: float = INVITE_TTL_S) -> JoinToken:
    """A join token for this cluster (run on the node that holds the CA key)."""
    if not creds.can_sign:
        raise JoinError("only the cluster's first node (it holds tls/ca.key) can invite")
    secret = Invites(creds.paths.ca_cert.parent.parent).create(ttl_s)
    return JoinToken(creds.cluster, creds.fingerprint, secret, address)


# --- the service ------------------------------------------------------------------------------

Admit = Callable[[NodeId], Awaitable[list[NodeId]]]  # record a member; the members now
Remove = Callable[[NodeId], Awaitable[str]]  # revoke a member; what happened
Trusts = Callable[[NodeId], bool]


class EnrolServer:
    """The enrolment service of one node: CA for anyone, joins with a token, removal by members."""

    def __init__(
        self,
        creds: Credentials,
        data_dir: Path,
        *,
        admit: Admit,
        remove: Remove,
        trusts: Trusts,
        endpoints: Callable[[], list[str]],
    ) -> None:
        self._creds = creds
        self._invites = Invites(data_dir)
        self._admit = admit
        self._remove = remove
        self._trusts = trusts
        self._endpoints = endpoints
        self._busy = asyncio.Semaphore(MAX_CONNECTIONS)
        ctx = creds.server_ssl_context()
        ctx.verify_mode = ssl.CERT_OPTIONAL  # joiners have no certificate yet; members do
        self._ctx = ctx

    async def start(self, host: str, port: int) -> asyncio.Server:
        """Listen; the caller serves it (`async with server: await server.serve_forever()`)."""
        return await asyncio.start_server(
            self._serve, host, port, ssl=self._ctx, ssl_handshake_timeout=IO_TIMEOUT_S
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._busy.locked():
            writer.close()
            return
        async with self._busy:
            try:
                async with asyncio.timeout(IO_TIMEOUT_S * 3):
                    request = json.loads(await reader.readuntil(b"\n"))
                    if not isinstance(request, dict):
                        raise JoinError("a request is a JSON object")
                    answer = await self._answer(request, writer.get_extra_info("ssl_object"))
            except (JoinError, BadCertificate) as exc:
                answer = {"ok": False, "message": str(exc)}
            except (TimeoutError, ValueError, asyncio.LimitOverrunError, ConnectionError) as exc:
                log.info("enrolment connection dropped: %s", exc)
                answer = None
            except asyncio.IncompleteReadError:
                answer = None
            with contextlib.suppress(ConnectionError, TimeoutError):
                if answer is not None:
                    writer.write(json.dumps(answer).encode() + b"\n")
                    async with asyncio.timeout(IO_TIMEOUT_S):
                        await writer.drain()
                writer.close()
                async with asyncio.timeout(IO_TIMEOUT_S):
                    await writer.wait_closed()

    async def _answer(self, request: dict[str, Any], conn: ssl.SSLObject) -> dict[str, Any]:
        op = request.get("op")
        ca_pem = self._creds.paths.ca_cert.read_text()
        if op == "ca":
            return {"ok": True, "ca": ca_pem}
        if op == "join":
            return await self._join(request, ca_pem)
        if op == "remove":
            member = peer_node_id(conn)  # BadCertificate without a (verified) certificate
            if not self._trusts(member):
                raise JoinError(f"{member} is not a member")
            node = NodeId(str(request.get("node", "")))
            log.info("member %s asks to remove %s", member, node)
            return {"ok": True, "message": await self._remove(node)}
        raise JoinError(f"unknown request {op!r}")

    async def _join(self, request: dict[str, Any], ca_pem: str) -> dict[str, Any]:
        if not self._creds.can_sign:
            raise JoinError("this node cannot sign certificates: use a token from the first node")
        secret, csr_pem = request.get("secret"), request.get("csr")
        if not isinstance(secret, str) or not isinstance(csr_pem, str):
            raise JoinError("a join needs a secret and a signing request")
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise JoinError(f"not a signing request: {exc}") from exc
        node_id = csr_node_id(csr)
        if not self._trusts(node_id) and not self._invites.consume(secret):
            log.warning("refused a join by %s: unknown, expired or used token", node_id)
            raise JoinError("the token is unknown, expired or already used")
        cert = issue(self._creds.ca_key(), self._creds.ca_cert, csr)
        try:
            members = await self._admit(node_id)
        except ShoalError as exc:
            log.warning("refused a join by %s: %s", node_id, exc)
            raise JoinError(str(exc)) from exc
        log.info("enrolled %s as a member", node_id)
        return {
            "ok": True,
            "ca": ca_pem,
            "cert": cert.public_bytes(serialization.Encoding.PEM).decode(),
            "cluster": self._creds.cluster,
            "members": members,
            "endpoints": self._endpoints(),
        }


# --- the joiner's side ------------------------------------------------------------------------


async def _ask(host: str, port: int, ctx: ssl.SSLContext, request: dict[str, Any]) -> Any:
    async with asyncio.timeout(IO_TIMEOUT_S * 3):
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx, limit=MAX_LINE)
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            answer = json.loads(await reader.readuntil(b"\n"))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
    if not isinstance(answer, dict) or not answer.get("ok"):
        message = answer.get("message") if isinstance(answer, dict) else answer
        raise JoinError(f"the cluster refused: {message}")
    return answer


def _unverified_context() -> ssl.SSLContext:
    """For fetching the CA only: what it returns is checked against the token's fingerprint."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def join(token: JoinToken, data_dir: Path, wait_s: float = JOIN_WAIT_S) -> Credentials:
    """Enrol this data dir's node with the cluster of token; its credentials, stored.

    While the enrolment service cannot be reached (machines start in any order), it is tried
    again for up to wait_s; a refusal is final."""
    identity = Identity.load_or_create(data_dir)
    host, port = token.host_port()
    deadline = time.monotonic() + wait_s
    tries = 0
    while True:
        try:
            got = await _ask(host, port, _unverified_context(), {"op": "ca"})
            break
        except (OSError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise JoinError(f"cannot reach {token.address} to join: {exc}") from exc
            tries += 1
            if tries == 1:
                log.info("cannot reach %s to join yet (%s): trying again", token.address, exc)
            await asyncio.sleep(0.1)
    try:
        ca_pem = str(got["ca"]).encode()
        ca = x509.load_pem_x509_certificate(ca_pem)
        if not hmac.compare_digest(fingerprint(ca), token.ca_fingerprint):
            raise JoinError(f"{token.address} is not the token's cluster (CA fingerprint differs)")
        pinned = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.minimum_version = ssl.TLSVersion.TLSv1_3
        pinned.check_hostname = False
        pinned.load_verify_locations(cadata=ca_pem.decode())
        csr = make_csr(identity).public_bytes(serialization.Encoding.PEM).decode()
        answer = await _ask(host, port, pinned, {"op": "join", "secret": token.secret, "csr": csr})
    except (OSError, TimeoutError, ValueError, KeyError) as exc:
        raise JoinError(f"cannot enrol with {token.address}: {exc}") from exc
    if answer.get("ca") != ca_pem.decode():
        raise JoinError("the cluster answered with another CA")
    creds = Credentials.install(data_dir, ca_pem, str(answer["cert"]).encode())
    members = [NodeId(str(m)) for m in answer.get("members", [])]
    creds.save_seed(members, [str(e) for e in answer.get("endpoints", [])])
    log.info("joined cluster %r as %s (%d members)", creds.cluster, creds.node_id, len(members))
    return creds


async def remove(creds: Credentials, address: str, node: NodeId) -> str:
    """Ask a running member (over mutual TLS, as this node) to have `node` revoked."""
    host, _, port = address.rpartition(":")
    answer = await _ask(
        host.strip("[]"), int(port), creds.client_ssl_context(), {"op": "remove", "node": node}
    )
    return str(answer.get("message", ""))


async def credentials_for(data_dir: Path, cluster: str, token: str | None) -> Credentials:
    """This node's credentials: loaded; received by joining with token; or a new cluster's."""
    try:
        creds = Credentials.load(data_dir)
    except NoCredentials:
        if token is None:
            return Credentials.create(data_dir, cluster)
        return await join(JoinToken.decode(token), data_dir)
    if token is not None:
        log.info("this node is already a member of %r: the join token is not used", creds.cluster)
    return creds
