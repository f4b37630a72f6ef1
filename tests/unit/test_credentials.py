"""Cluster credentials: a CA made once, certificates for joiners, mutual TLS that refuses others."""

import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from shoal.net.credentials import (
    BadCertificate,
    Credentials,
    NoCredentials,
    check_issued,
    csr_node_id,
    issue,
    make_ca,
    make_csr,
    peer_node_id,
)
from shoal.net.identity import Identity


def _join(founder: Credentials, data_dir: Path) -> Credentials:
    """What enrolment does, without the network: sign the joiner's request, install the result."""
    csr = make_csr(Identity.load_or_create(data_dir))
    cert = issue(founder.ca_key(), founder.ca_cert, csr)
    ca_pem = founder.paths.ca_cert.read_bytes()
    return Credentials.install(data_dir, ca_pem, cert.public_bytes(serialization.Encoding.PEM))


def _handshake(
    client: ssl.SSLContext, server: ssl.SSLContext
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake in memory (no sockets); raises ssl.SSLError when either side refuses."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, obj in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server checks the client's certificate after the client is done
            s.write(b"x")
            c_in.write(s_out.read())
            c.write(b"y")
            s_in.write(c_out.read())
            assert s.read(1) == b"y" and c.read(1) == b"x"
            return c, s
    raise AssertionError("handshake did not finish")


def test_first_node_makes_a_ca_and_reloads_it(tmp_path: Path) -> None:
    with pytest.raises(NoCredentials):
        Credentials.load(tmp_path)
    made = Credentials.create(tmp_path, "home")
    again = Credentials.load_or_create(tmp_path, "other")
    assert again.fingerprint == made.fingerprint and again.cluster == "home"
    assert made.node_id == Identity.load_or_create(tmp_path).node_id and made.can_sign
    assert (made.paths.ca_key.stat().st_mode & 0o777) == 0o600
    assert check_issued(made.ca_cert, made.node_cert) == made.node_id


def test_joiner_gets_a_certificate_but_not_the_ca_key(tmp_path: Path) -> None:
    founder = Credentials.create(tmp_path / "a", "home")
    joiner = _join(founder, tmp_path / "b")
    assert joiner.fingerprint == founder.fingerprint and not joiner.can_sign
    assert Credentials.load(tmp_path / "b").node_id == joiner.node_id
    with pytest.raises(NoCredentials):
        joiner.ca_key()


def test_mutual_tls_between_members_names_the_peer(tmp_path: Path) -> None:
    a = Credentials.create(tmp_path / "a", "home")
    b = _join(a, tmp_path / "b")
    client, server = _handshake(b.client_ssl_context(), a.server_ssl_context())
    assert peer_node_id(server) == b.node_id and peer_node_id(client) == a.node_id


def test_mutual_tls_refuses_another_clusters_node(tmp_path: Path) -> None:
    a = Credentials.create(tmp_path / "a", "home")
    stranger = Credentials.create(tmp_path / "x", "home")  # same name, another CA
    with pytest.raises(ssl.SSLError):
        _handshake(stranger.client_ssl_context(), a.server_ssl_context())
    with pytest.raises(ssl.SSLError):
        _handshake(a.client_ssl_context(), stranger.server_ssl_context())


def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path: Path) -> None:
    a = Credentials.create(tmp_path / "a", "home")
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cafile=a.paths.ca_cert)
    with pytest.raises(ssl.SSLError):
        _handshake(bare, a.server_ssl_context())


def test_a_request_must_name_its_own_key(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.x509.oid import NameOID

    me = Identity.load_or_create(tmp_path)
    assert csr_node_id(make_csr(me)) == me.node_id
    other = Ed25519PrivateKey.generate()  # claims me's id with another key
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, me.node_id)])
    forged = x509.CertificateSigningRequestBuilder().subject_name(name).sign(other, None)
    with pytest.raises(BadCertificate):
        csr_node_id(forged)


def test_a_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    key, ca = make_ca("home")
    other_key, _ = make_ca("home")
    cert = issue(other_key, ca, make_csr(Identity.load_or_create(tmp_path)))  # wrong signer
    with pytest.raises(BadCertificate):
        check_issued(ca, cert)
    assert key is not None


def test_a_join_token_round_trips_and_holds_no_key(tmp_path: Path) -> None:
    from shoal.net.enrol import JoinToken, invite

    creds = Credentials.create(tmp_path, "home")
    token = invite(creds, "10.0.0.5:52417")
    text = token.encode()
    assert text.startswith("shoal1.") and JoinToken.decode(text) == token
    assert (token.cluster, token.ca_fingerprint, token.address) == (
        "home",
        creds.fingerprint,
        "10.0.0.5:52417",
    )
    ca_key = creds.paths.ca_key.read_bytes()
    assert ca_key not in text.encode() and len(text) < 300


@pytest.mark.parametrize("bad", ["", "shoal1.", "shoal1.!!!", "k3s::x", "shoal1.e30"])
def test_a_damaged_token_is_refused(bad: str) -> None:
    from shoal.net.enrol import JoinError, JoinToken

    with pytest.raises(JoinError):
        JoinToken.decode(bad)


def test_an_invite_is_used_once_and_expires(tmp_path: Path) -> None:
    from shoal.net.enrol import Invites

    invites = Invites(tmp_path)
    secret, stale = invites.create(), invites.create(ttl_s=-1)
    assert not invites.consume("guess")
    assert invites.consume(secret) and not invites.consume(secret)
    assert not invites.consume(stale)
    assert secret not in (tmp_path / "tls" / "invites.json").read_text()  # only its hash
