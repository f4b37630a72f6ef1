"""What a bench run measures: the nodes of a running cluster, found from the URLs given."""

from dataclasses import dataclass
from typing import Any

import httpx

from shoal.bench.errors import NodeUnreachable


@dataclass(frozen=True)
class Endpoint:
    """One node's id and API URL; `up`: the cluster counts it as connected."""

    node_id: str
    url: str
    up: bool = True


def parse_urls(values: list[str]) -> list[str]:
    """--url given several times and/or comma-separated, without trailing slashes."""
    return [u.strip().rstrip("/") for v in values for u in v.split(",") if u.strip()]


def _get(url: str, path: str) -> Any:
    try:
        r = httpx.get(f"{url}{path}", timeout=10)
    except httpx.HTTPError as exc:
        raise NodeUnreachable(f"cannot reach a shoal node at {url}: {exc}") from exc
    if r.status_code == 401:
        raise NodeUnreachable(
            f"{url} asks for an API key: shoal bench measures clusters without keys (its own "
            "loopback cluster, or a node started without --api-key)"
        )
    if r.status_code != 200:
        raise NodeUnreachable(f"{url} answers {path} with HTTP {r.status_code}: not a shoal node?")
    return r.json()


def discover(urls: list[str]) -> list[Endpoint]:
    """The nodes at `urls` (each must answer), then every other node their cluster knows."""
    given = [Endpoint(str(_get(url, "/node_id")), url) for url in urls]
    seen = {e.node_id for e in given}
    others = [
        Endpoint(n["id"], n["api_url"].rstrip("/"), bool(n["connected"]))
        for n in _get(urls[0], "/v1/nodes")["nodes"]
        if n["id"] not in seen and n.get("api_url")
    ]
    return given + others
