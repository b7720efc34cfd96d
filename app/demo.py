"""The demo page, for a person with a browser: ``/`` and its files under ``/static/`` (app/static/).

Caching: the page names its script and style sheet with their content's digest (``demo.js?v=...``),
so a browser keeps those for a year, unchanged; the page itself is revalidated on every load (an
ETag, so a 304 when nothing changed), so a new release shows at once. Every response carries a
strict Content-Security-Policy: scripts and styles from this origin only, nothing inline, images
from here or ``data:`` URLs (the heatmap PNGs the API returns), requests to this origin only.
"""
import hashlib
import os
from pathlib import Path
from typing import Dict

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import QueryParams
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
ASSETS = ("demo.css", "demo.js")  # what index.html links, by these names
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
                    "referrer-policy": "no-referrer"}
IMMUTABLE = "public, max-age=31536000, immutable"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class DemoPage:
    """index.html with its assets' links versioned by their digests, read once at start."""

    def __init__(self):
        self.digests: Dict[str, str] = {name: _digest((STATIC_DIR / name).read_bytes()) for name in ASSETS}
        html = (STATIC_DIR / "index.html").read_text()
        for name, digest in self.digests.items():
            link = f'"/static/{name}"'
            if link not in html:
                raise ValueError(f"{STATIC_DIR / 'index.html'} does not link {link}")
            html = html.replace(link, f'"/static/{name}?v={digest}"')
        self.html = html.encode()
        self.etag = f'"{_digest(self.html)}"'

    def response(self, request: Request) -> Response:
        headers = {**SECURITY_HEADERS, "cache-control": "no-cache", "etag": self.etag}
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(self.html, media_type="text/html; charset=utf-8", headers=headers)


class StaticAssets(StaticFiles):
    """The files of app/static/: cached for good when asked for at their current digest (the page's
    links), revalidated otherwise (an old link, or a file asked for by hand)."""

    def __init__(self, digests: Dict[str, str]):
        super().__init__(directory=STATIC_DIR)
        self.digests = digests

    def file_response(self, full_path: os.PathLike, stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        version = QueryParams(scope["query_string"]).get("v")
        current = self.digests.get(Path(full_path).name)
        response.headers.update(SECURITY_HEADERS)
        response.headers["cache-control"] = IMMUTABLE if version is not None and version == current else "no-cache"
        return response


def install(app: FastAPI) -> None:
    """Serve the demo page at ``/`` and its files at ``/static/``."""
    page = DemoPage()

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def demo_page(request: Request) -> Response:
        return page.response(request)

    app.mount("/static", StaticAssets(page.digests), name="static")
