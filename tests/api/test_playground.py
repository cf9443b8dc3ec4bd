"""The playground's static files: content types, the CSP, 404s, and no way out of its folder."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from localvl.api.errors import install_error_handlers
from localvl.api.playground import CONTENT_SECURITY_POLICY, PLAYGROUND_DIR, asset_path, router

KEY = "sk-playground-test"


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    with TestClient(app) as test_client:
        yield test_client


def test_the_page_is_served_at_the_root_and_at_playground(client):
    for path in ("/", "/playground"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.text == (PLAYGROUND_DIR / "index.html").read_text()


@pytest.mark.parametrize("path", ["/", "/playground", "/playground/playground.js"])
def test_head_answers_as_get_does_without_a_body(client, path):
    head, get = client.head(path), client.get(path)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert head.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


@pytest.mark.parametrize(
    "name, content_type",
    [
        ("playground.js", "text/javascript; charset=utf-8"),
        ("markdown.js", "text/javascript; charset=utf-8"),
        ("playground.css", "text/css; charset=utf-8"),
    ],
)
def test_assets_have_their_content_types(client, name, content_type):
    response = client.get(f"/playground/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == (PLAYGROUND_DIR / name).read_bytes()


def test_every_file_the_page_loads_exists(client):
    """index.html and the modules name each other; a missing file would only show in a browser."""
    import re

    html = client.get("/").text
    names = re.findall(r'(?:src|href)="/playground/([^"]+)"', html)
    assert "playground.js" in names and "playground.css" in names
    for script in PLAYGROUND_DIR.glob("*.js"):
        names += re.findall(r'from "\./([^"]+)"', script.read_text())
    for name in names:
        assert client.get(f"/playground/{name}").status_code == 200, name


def test_a_strict_content_security_policy_on_every_file(client):
    directives = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval'
    assert set(directives["img-src"].split()) == {"'self'", "data:", "blob:"}
    assert directives["object-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    for path in ("/", "/playground", "/playground/playground.js", "/playground/playground.css"):
        assert client.get(path).headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_no_inline_script_or_style_in_the_page(client):
    """The CSP would block them: everything lives in the served files."""
    import re

    html = client.get("/").text
    assert "<script>" not in html and "<style" not in html
    assert not re.search(r"\s(?:style|on[a-z]+)=", html)


def test_unknown_assets_are_404_envelopes(client):
    for path in ("/playground/nothing.js", "/playground/index.htm", "/playground/README.md"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "not_found_error"


TRAVERSALS = [
    "../api/playground.py",
    "../../localvl/__init__.py",
    "..",
    "..\\api\\playground.py",
    "/etc/passwd",
    "playground.js\x00.py",
    "./playground.js/../../api/app.py",
]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_asset_lookup_never_leaves_the_folder(name):
    from localvl.errors import NotFoundError

    with pytest.raises(NotFoundError):
        asset_path(name)


async def raw_get(app, path: str) -> tuple[int, bytes]:
    """One GET with ``path`` exactly as given: an HTTP client would normalise the dots away."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode("latin-1"), "root_path": "", "query_string": b"", "headers": [],
             "server": ("testserver", 80), "client": ("127.0.0.1", 1)}
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("name", TRAVERSALS + ["%2e%2e%2fapi%2fapp.py", "..%2F..%2Flocalvl%2F__init__.py"])
def test_no_path_traversal_over_http(client, name):
    import anyio

    status, body = anyio.run(raw_get, client.app, "/playground/" + name)
    assert status == 404, name
    assert b"import" not in body and b"root:" not in body


def test_the_page_needs_no_key_but_the_api_does(loaded_model, tmp_path_factory):
    """A browser cannot attach a key to a navigation: the page is public, the data behind it is not."""
    from localvl.api.app import create_app
    from localvl.engine.local import LocalEngine
    from localvl.settings import Settings

    settings = Settings(api_key=[KEY], served_model_name="tiny-vl", data_dir=tmp_path_factory.mktemp("data"))
    with TestClient(create_app(settings, LocalEngine(loaded_model("qwen2_5_vl")))) as app_client:
        page = app_client.get("/")
        assert page.status_code == 200 and page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert app_client.get("/playground/api.js").status_code == 200
        assert app_client.get("/v1/models").status_code == 401
        assert app_client.get("/v1/models", headers={"x-api-key": KEY}).status_code == 200


def test_every_playground_file_ships_in_the_package():
    """The wheel takes package data by glob: a file with another suffix would work from a checkout
    and be missing once installed."""
    import fnmatch
    import tomllib
    from pathlib import Path

    from localvl.api.playground import CONTENT_TYPES

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["localvl"]
    for path in PLAYGROUND_DIR.iterdir():
        if path.is_file():
            assert path.suffix in CONTENT_TYPES, path.name
            assert any(fnmatch.fnmatch(f"playground/{path.name}", pattern) for pattern in patterns), path.name
