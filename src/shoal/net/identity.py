"""A node's identity: an Ed25519 key in the data dir, named by a libp2p-style peer id.

The node id is the libp2p peer id of the public key (protobuf-encoded key in an identity
multihash, base58btc), so ids read `12D3KooW…` like the seed cluster's. The key file is created
once (mode 0600) and reused: a node keeps its id across restarts, and two copies of one data dir
share an id, which the transport detects and refuses.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoal.types.ids import NodeId

log = logging.getLogger(__name__)

KEY_FILE = "identity.key"
# libp2p PublicKey protobuf: field 1 (KeyType) = 1 (Ed25519), field 2 (Data) = 32 bytes.
_PROTOBUF_ED25519 = bytes([0x08, 0x01, 0x12, 0x20])
# multihash header: code 0x00 (identity), length 0x24 (36 bytes: the protobuf above + key).
_IDENTITY_MULTIHASH = bytes([0x00, 0x24])
_PREFIX = _IDENTITY_MULTIHASH + _PROTOBUF_ED25519


def node_id_of(public_key: Ed25519PublicKey) -> NodeId:
    """The libp2p peer id (`12D3KooW…`) of an Ed25519 public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return NodeId(base58.b58encode(_PREFIX + raw).decode("ascii"))


def public_key_of(node_id: NodeId | str) -> Ed25519PublicKey:
    """The Ed25519 public key inside a peer id; ValueError if it is not one."""
    try:
        decoded = base58.b58decode(node_id)
    except ValueError as exc:
        raise ValueError(f"not a base58 peer id: {node_id!r}") from exc
    if len(decoded) != len(_PREFIX) + 32 or not decoded.startswith(_PREFIX):
        raise ValueError(f"not an Ed25519 peer id: {node_id!r}")
    return Ed25519PublicKey.from_public_bytes(decoded[len(_PREFIX) :])


def key_in_id(node_id: NodeId) -> Ed25519PublicKey | None:
    """The public key a peer id carries, or None if node_id is not an Ed25519 peer id."""
    try:
        return public_key_of(node_id)
    except ValueError:
        return None


def verify(node_id: NodeId | str, data: bytes, signature: bytes) -> bool:
    """Whether `signature` over `data` was made by the key behind `node_id`."""
    try:
        public_key_of(node_id).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def _write_new_key(path: Path) -> None:
    """Create the key file atomically with mode 0600; FileExistsError if another process won."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if the file exists: never overwrite an identity
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Identity:
    """This node's key pair and the node id derived from it."""

    private_key: Ed25519PrivateKey
    node_id: NodeId

    @classmethod
    def generate(cls) -> "Identity":
        """A new identity kept in memory only (tests, in-process clusters)."""
        key = Ed25519PrivateKey.generate()
        return cls(private_key=key, node_id=node_id_of(key.public_key()))

    @classmethod
    def load_or_create(cls, data_dir: Path) -> "Identity":
        """Load `<data_dir>/identity.key`, creating it (0600) on first start."""
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / KEY_FILE
        if not path.exists():
            try:
                _write_new_key(path)
                log.info("created a new node identity in %s", path)
            except FileExistsError:
                pass  # another process created it first: use theirs
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("%s is readable by others (mode %o); chmod 600 it", path, mode)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 key")
        return cls(private_key=key, node_id=node_id_of(key.public_key()))

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The public half of the key."""
        return self.private_key.public_key()

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature over data (64 bytes)."""
        return self.private_key.sign(data)

    def verify(self, data: bytes, signature: bytes) -> bool:
        """Whether this node's key made `signature` over `data`."""
        return verify(self.node_id, data, signature)
