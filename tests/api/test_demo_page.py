"""The demo page's files as the app serves them: content types, caching, the Content-Security-Policy
and markup that a strict policy lets run (what the page does in a browser: tests/browser/)."""
from html.parser import HTMLParser
from typing import List

from fastapi.testclient import TestClient

from app.config import Settings
from app.demo import STATIC_DIR
from app.main import create_app


def asset_links(html: str) -> List[str]:
    return [part.split('"')[0] for part in html.split('"/static/')[1:]]


def test_the_page_is_html_revalidated_on_each_load_under_a_strict_policy(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache" and page.headers["x-content-type-options"] == "nosniff"
    policy = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
    assert policy["connect-src"] == "'self'" and policy["img-src"] == "'self' data:"
    assert client.get("/", headers={"if-none-match": page.headers["etag"]}).status_code == 304
    assert client.head("/").status_code == 200


def test_the_assets_are_linked_by_digest_and_cached_for_good_at_it(client) -> None:
    links = asset_links(client.get("/").text)
    assert sorted(link.split("?")[0] for link in links) == ["demo.css", "demo.js"]
    types = {"demo.css": "text/css", "demo.js": "text/javascript"}
    for link in links:
        name = link.split("?")[0]
        asset = client.get(f"/static/{link}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(types[name])
        assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert asset.content == (STATIC_DIR / name).read_bytes()
        # By hand or from an old page: the file, revalidated.
        assert client.get(f"/static/{name}?v=old").headers["cache-control"] == "no-cache"
        assert client.get(f"/static/{name}", headers={"if-none-match": asset.headers["etag"]}).status_code == 304


class InlineCode(HTMLParser):
    """What a strict policy would block: inline scripts, style elements and attributes, handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.found: List[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        names = {name for name, _ in attrs}
        if (tag == "script" and "src" not in names) or tag == "style" or "style" in names:
            self.found.append(tag)
        self.found += [name for name in names if name.startswith("on")]


def test_the_markup_has_nothing_inline_that_the_policy_would_block(client) -> None:
    parser = InlineCode()
    parser.feed(client.get("/").text)
    assert parser.found == []


def test_the_page_can_be_turned_off_and_is_not_in_the_api_schema(client) -> None:
    assert "/" not in client.get("/openapi.json").json()["paths"]
    plain = TestClient(create_app(Settings(demo_page=False)))  # no lifespan, so no model: routes only
    for path in ("/", "/static/demo.js"):
        response = plain.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "http_error"
