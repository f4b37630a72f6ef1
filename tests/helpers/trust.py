"""Cluster credentials for tests: a CA and member certificates, made as enrolment makes them."""

from pathlib import Path

from cryptography.hazmat.primitives import serialization

from shoal.net.credentials import Credentials, issue, make_csr
from shoal.net.identity import Identity


def signed_by(first: Credentials, data: Path) -> Credentials:
    """Credentials for a new identity in data, signed by first's CA (without telling anyone)."""
    csr = make_csr(Identity.load_or_create(data))
    cert = issue(first.ca_key(), first.ca_cert, csr).public_bytes(serialization.Encoding.PEM)
    return Credentials.install(data, first.paths.ca_cert.read_bytes(), cert)


def members(root: Path, count: int, cluster: str = "t") -> list[Credentials]:
    """`count` data dirs under root: the first made the cluster, the others were signed by it."""
    first = Credentials.create(root / "m0", cluster)
    return [first] + [signed_by(first, root / f"m{i}") for i in range(1, count)]
