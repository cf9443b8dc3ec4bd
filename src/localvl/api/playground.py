"""The browser playground: the static files of ``localvl/playground``, at ``/`` and ``/playground``.

The page is public on purpose: it holds no data, and a browser cannot attach an ``x-api-key``
header to a navigation. Everything it does goes through the API (``/v1/models``,
``/v1/messages``) with the key the user types into it, so it gets no more than curl would.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from localvl.errors import NotFoundError

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "playground"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

# Model output ends up in this page, so the page may run only its own files: no inline script or
# style, nothing fetched from elsewhere. Attached images are previewed from blob:/data: URLs.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])

SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Revalidate every time (the ETag makes that cheap) so an upgraded server never runs old JS.
    "cache-control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def asset_path(name: str, directory: Path = PLAYGROUND_DIR) -> Path:
    """The file called ``name`` directly inside ``directory``, if it is one the playground serves.

    Names are looked up among the directory's own entries rather than joined onto its path, so no
    spelling of ``..`` or of a separator can reach anything else.
    """
    if Path(name).suffix not in CONTENT_TYPES:
        raise NotFoundError("no such playground file")
    for entry in directory.iterdir():
        if entry.name == name and entry.is_file():
            return entry
    raise NotFoundError("no such playground file")


def asset_response(name: str) -> FileResponse:
    path = asset_path(name)
    return FileResponse(path, media_type=CONTENT_TYPES[path.suffix], headers=SECURITY_HEADERS)


# HEAD too, as any static file server answers it: link checkers and `curl -I` ask that way.
@router.api_route("/", methods=["GET", "HEAD"])
@router.api_route("/playground", methods=["GET", "HEAD"])
async def playground_page() -> FileResponse:
    return asset_response("index.html")


@router.api_route("/playground/{name}", methods=["GET", "HEAD"])
async def playground_asset(name: str) -> FileResponse:
    return asset_response(name)
