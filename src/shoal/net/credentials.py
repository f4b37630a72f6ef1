"""A cluster's credentials on disk: its CA, this node's certificate, and TLS contexts built on them.

The first node of a cluster makes an X.509 CA (Ed25519) and signs its own certificate with it;
a node that joins receives its certificate from a member (see `net/enrol.py`). A node's TLS key
is its identity key (`identity.key`, Ed25519), and its certificate's common name is its node id,
so the peer of a verified TLS connection is a node id: `peer_node_id()`.

Files, in `<data_dir>/tls/` (keys mode 0600):
    ca.pem      the cluster CA certificate (every node)
    ca.key      the CA's private key (only the node that made the cluster: it signs joiners)
    node.pem    this node's certificate, signed by the CA
    join.json   the members and control endpoints this node was given when it joined (its seed)
The node's private key stays `<data_dir>/identity.key`.

API (what other parts of shoal use):
    Credentials.load(data_dir) -> Credentials              NoCredentials if the files are missing
    Credentials.create(data_dir, cluster) -> Credentials   a new cluster: CA + this node's cert
    Credentials.load_or_create(data_dir, cluster)          the first start of `shoal node`
    creds.server_ssl_context() -> ssl.SSLContext    mutual TLS server: demands a client cert
                                                    signed by the cluster CA
    creds.client_ssl_context() -> ssl.SSLContext    presents this node's cert; verifies the
                                                    server against the cluster CA (no host name
                                                    check: nodes are known by id, not name)
    peer_node_id(ssl_socket_or_object) -> NodeId    the node id of a verified peer
    creds.node_id, creds.cluster, creds.fingerprint (sha256 of the CA certificate, hex),
    creds.can_sign (this node holds ca.key), creds.paths (file paths, e.g. for zenoh's config)
    server_ssl_context(data_dir) / client_ssl_context(data_dir): the same from a data dir.

Everything here is X.509 and TLS from `cryptography` and the stdlib `ssl`; nothing home-made.
"""

import datetime
import hashlib
import json
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal.errors import ShoalError
from shoal.net.identity import KEY_FILE, Identity, node_id_of
from shoal.types.ids import NodeId

log = logging.getLogger(__name__)

TLS_DIR = "tls"
CA_VALID = datetime.timedelta(days=3650)
NODE_VALID = datetime.timedelta(days=3650)  # revocation is by the replicated member list
NODE_DNS_NAME = "shoal-node"  # every node certificate's name; identity is the common name


class NoCredentials(ShoalError):
    """This data dir holds no cluster credentials (start a cluster, or join one with a token)."""


class BadCertificate(ShoalError):
    """A certificate or signing request that this cluster does not accept."""


@dataclass(frozen=True)
class CredentialPaths:
    """Where one data dir keeps its credentials."""

    ca_cert: Path
    ca_key: Path
    node_cert: Path
    node_key: Path
    joined: Path

    @classmethod
    def of(cls, data_dir: Path) -> "CredentialPaths":
        tls = data_dir / TLS_DIR
        return cls(
            tls / "ca.pem", tls / "ca.key", tls / "node.pem", data_dir / KEY_FILE, tls / "join.json"
        )


def _pem_key(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file atomically with mode 0600 (replacing an older one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate atomically (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def fingerprint(cert: x509.Certificate) -> str:
    """sha256 of the certificate's DER bytes, hex: how a join token names its cluster's CA."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _ca_name(cluster: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster),
            x509.NameAttribute(NameOID.COMMON_NAME, f"shoal cluster {cluster} CA"),
        ]
    )


def make_ca(cluster: str) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """A new cluster CA: its key and self-signed certificate (the cluster name inside)."""
    key = Ed25519PrivateKey.generate()
    name = _ca_name(cluster)
    now = _now()
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, None)
    )
    return key, cert


def make_csr(identity: Identity) -> x509.CertificateSigningRequest:
    """A signing request for this node's key, named by its node id (proves we hold the key)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.node_id)])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(identity.private_key, None)
    )


def _common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode()


def csr_node_id(csr: x509.CertificateSigningRequest) -> NodeId:
    """The node id a signing request is for; BadCertificate unless its key and name agree."""
    key = csr.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise BadCertificate("a node's key must be Ed25519")
    if not csr.is_signature_valid:
        raise BadCertificate("the signing request's signature does not verify")
    node_id = node_id_of(key)
    if _common_name(csr.subject) != node_id:
        raise BadCertificate("the signing request's name is not the node id of its key")
    return node_id


def issue(
    ca_key: Ed25519PrivateKey, ca_cert: x509.Certificate, csr: x509.CertificateSigningRequest
) -> x509.Certificate:
    """A node certificate for the checked request, signed by the CA (client and server use)."""
    node_id = csr_node_id(csr)
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + NODE_VALID)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(NODE_DNS_NAME)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, None)
    )


def check_issued(ca_cert: x509.Certificate, cert: x509.Certificate) -> NodeId:
    """The node id of a certificate the CA signed; BadCertificate otherwise."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise BadCertificate(f"certificate not signed by this cluster's CA: {exc}") from exc
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey) or _common_name(cert.subject) != node_id_of(key):
        raise BadCertificate("certificate's name is not the node id of its key")
    return node_id_of(key)


def peer_node_id(conn: ssl.SSLSocket | ssl.SSLObject) -> NodeId:
    """The node id of the peer of a verified TLS connection (its certificate's common name)."""
    der = conn.getpeercert(binary_form=True)
    if not der:
        raise BadCertificate("the peer presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey) or _common_name(cert.subject) != node_id_of(key):
        raise BadCertificate("the peer's certificate does not name its key's node id")
    return node_id_of(key)


@dataclass(frozen=True)
class Credentials:
    """A node's view of its cluster's trust: the CA, its own certificate, maybe the CA key."""

    paths: CredentialPaths
    ca_cert: x509.Certificate
    node_cert: x509.Certificate
    node_id: NodeId

    @property
    def cluster(self) -> str:
        """The cluster name the CA was made for."""
        attrs = self.ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        value = attrs[0].value if attrs else ""
        return value if isinstance(value, str) else value.decode()

    @property
    def fingerprint(self) -> str:
        """sha256 of the CA certificate (hex)."""
        return fingerprint(self.ca_cert)

    @property
    def can_sign(self) -> bool:
        """Whether this node holds the CA key (and so can admit new nodes)."""
        return self.paths.ca_key.exists()

    def ca_key(self) -> Ed25519PrivateKey:
        """The CA's private key; NoCredentials on a node that does not hold it."""
        if not self.can_sign:
            raise NoCredentials(
                f"{self.paths.ca_key} is not here: only the cluster's first node signs"
            )
        key = serialization.load_pem_private_key(self.paths.ca_key.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise BadCertificate(f"{self.paths.ca_key} does not hold an Ed25519 key")
        return key

    def seed(self) -> tuple[list[NodeId], list[str]]:
        """The members and control endpoints this node was given when it joined (or itself)."""
        if not self.paths.joined.exists():
            return [self.node_id], []
        data = json.loads(self.paths.joined.read_text())
        return [NodeId(m) for m in data["members"]], [str(e) for e in data["endpoints"]]

    def save_seed(self, members: list[NodeId], endpoints: list[str]) -> None:
        """Remember what joining gave us (members to trust until our log has them; peers)."""
        data = {"members": sorted(members), "endpoints": endpoints}
        write_public(self.paths.joined, json.dumps(data, indent=1).encode())

    @classmethod
    def load(cls, data_dir: Path) -> "Credentials":
        """The credentials in data_dir; NoCredentials if missing, BadCertificate if inconsistent."""
        paths = CredentialPaths.of(data_dir)
        if not (paths.ca_cert.exists() and paths.node_cert.exists() and paths.node_key.exists()):
            raise NoCredentials(f"no cluster credentials in {data_dir / TLS_DIR}")
        ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        node = x509.load_pem_x509_certificate(paths.node_cert.read_bytes())
        node_id = check_issued(ca, node)
        identity = Identity.load_or_create(data_dir)
        if identity.node_id != node_id:
            raise BadCertificate(
                f"{paths.node_cert} is for {node_id}, this node is {identity.node_id}"
            )
        return cls(paths, ca, node, node_id)

    @classmethod
    def create(cls, data_dir: Path, cluster: str) -> "Credentials":
        """Make a new cluster: a CA, and this node's certificate signed by it."""
        paths = CredentialPaths.of(data_dir)
        if paths.ca_cert.exists():
            raise ShoalError(f"{paths.ca_cert} exists: this data dir already belongs to a cluster")
        identity = Identity.load_or_create(data_dir)
        ca_key, ca_cert = make_ca(cluster)
        cert = issue(ca_key, ca_cert, make_csr(identity))
        write_private(paths.ca_key, _pem_key(ca_key))
        write_public(paths.node_cert, _pem_cert(cert))
        write_public(paths.ca_cert, _pem_cert(ca_cert))  # last: its presence means "complete"
        log.info(
            "created cluster %r (CA %s…) in %s",
            cluster,
            fingerprint(ca_cert)[:16],
            paths.ca_cert.parent,
        )
        return cls(paths, ca_cert, cert, identity.node_id)

    @classmethod
    def load_or_create(cls, data_dir: Path, cluster: str) -> "Credentials":
        """This data dir's credentials, made on the first start of a cluster's first node."""
        try:
            return cls.load(data_dir)
        except NoCredentials:
            return cls.create(data_dir, cluster)

    @classmethod
    def install(cls, data_dir: Path, ca_pem: bytes, cert_pem: bytes) -> "Credentials":
        """Store a CA and this node's certificate received when joining; checked first."""
        paths = CredentialPaths.of(data_dir)
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
        node_id = check_issued(ca, cert)
        identity = Identity.load_or_create(data_dir)
        if node_id != identity.node_id:
            raise BadCertificate(
                f"received a certificate for {node_id}, this node is {identity.node_id}"
            )
        write_public(paths.node_cert, _pem_cert(cert))
        write_public(paths.ca_cert, _pem_cert(ca))
        return cls(paths, ca, cert, node_id)

    def server_ssl_context(self) -> ssl.SSLContext:
        """TLS 1.3 server context: our certificate; clients must present one from our CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.paths.node_cert, self.paths.node_key)
        ctx.load_verify_locations(cafile=self.paths.ca_cert)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """TLS 1.3 client context: our certificate; the server must hold one from our CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # peers are named by node id (peer_node_id), not host
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(self.paths.node_cert, self.paths.node_key)
        ctx.load_verify_locations(cafile=self.paths.ca_cert)
        return ctx


def server_ssl_context(data_dir: Path) -> ssl.SSLContext:
    """Credentials.load(data_dir).server_ssl_context()."""
    return Credentials.load(data_dir).server_ssl_context()


def client_ssl_context(data_dir: Path) -> ssl.SSLContext:
    """Credentials.load(data_dir).client_ssl_context()."""
    return Credentials.load(data_dir).client_ssl_context()
