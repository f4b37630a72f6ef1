"""Node identity: a persisted Ed25519 key named by a libp2p peer id."""

import stat
from pathlib import Path

import base58
import pytest
from cryptography.hazmat.primitives import serialization

from shoal.net.identity import KEY_FILE, Identity, node_id_of, public_key_of, verify


def _raw(identity: Identity) -> bytes:
    return identity.public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def test_created_once_with_private_mode(tmp_path: Path) -> None:
    identity = Identity.load_or_create(tmp_path / "data")
    key_file = tmp_path / "data" / KEY_FILE
    assert key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert [p.name for p in key_file.parent.iterdir()] == [KEY_FILE]  # no temp file left
    assert identity.node_id.startswith("12D3KooW")


def test_stable_across_reloads(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path)
    second = Identity.load_or_create(tmp_path)
    assert first.node_id == second.node_id
    assert _raw(first) == _raw(second)


def test_distinct_dirs_distinct_ids(tmp_path: Path) -> None:
    a = Identity.load_or_create(tmp_path / "a")
    b = Identity.load_or_create(tmp_path / "b")
    assert a.node_id != b.node_id


def test_peer_id_layout_decodes_to_the_public_key(tmp_path: Path) -> None:
    identity = Identity.load_or_create(tmp_path)
    decoded = base58.b58decode(identity.node_id)
    # identity multihash (0x00, 36 bytes) of protobuf {KeyType=Ed25519, Data=<32 bytes>}
    assert decoded[:6] == bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
    assert decoded[6:] == _raw(identity)
    assert public_key_of(identity.node_id).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    ) == _raw(identity)
    assert node_id_of(public_key_of(identity.node_id)) == identity.node_id


def test_sign_and_verify(tmp_path: Path) -> None:
    identity = Identity.load_or_create(tmp_path / "a")
    other = Identity.load_or_create(tmp_path / "b")
    signature = identity.sign(b"hello")
    assert identity.verify(b"hello", signature)
    assert verify(identity.node_id, b"hello", signature)
    assert not verify(identity.node_id, b"hullo", signature)
    assert not verify(other.node_id, b"hello", signature)
    assert not verify("not-a-peer-id!", b"hello", signature)


@pytest.mark.parametrize("bad", ["", "0OIl", base58.b58encode(b"\x00\x24" + bytes(36)).decode()])
def test_public_key_of_rejects_non_ed25519_ids(bad: str) -> None:
    with pytest.raises(ValueError):
        public_key_of(bad)


def test_refuses_a_non_ed25519_key_file(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / KEY_FILE).write_bytes(pem)
    with pytest.raises(ValueError, match="Ed25519"):
        Identity.load_or_create(tmp_path)
