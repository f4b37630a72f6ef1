"""The dashboard: GET / and its static files under /dashboard/, read once from the package.

The files hold no data and no secret, so api/auth.py lets them through without a key; every
call the page makes for data goes through the API with the key the user gives it.
"""

from importlib.resources import files

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

router = APIRouter(include_in_schema=False)

PREFIX = "/dashboard/"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
# The page may load only files of this package, from this origin, and no other site may frame
# it (its Place and Delete buttons must not be clicked through another page).
HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}


def _assets() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, media type) for every shipped file with a known type."""
    found: dict[str, tuple[bytes, str]] = {}
    for entry in files("shoal.dashboard").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in MEDIA_TYPES:
            found[entry.name] = (entry.read_bytes(), MEDIA_TYPES[suffix])
    return found


ASSETS = _assets()


def _serve(name: str) -> Response:
    if name not in ASSETS:  # only listed names: no path ever reaches the file system
        raise HTTPException(404, f"no dashboard file {name}")
    body, media_type = ASSETS[name]
    return Response(body, media_type=media_type, headers=HEADERS)


@router.get("/")
async def index() -> Response:
    return _serve("index.html")


@router.get(PREFIX + "{name}")
async def asset(name: str) -> Response:
    return _serve(name)
