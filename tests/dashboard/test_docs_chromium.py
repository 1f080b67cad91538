"""/docs (Swagger UI) and /redoc (ReDoc) work without Internet: the pages and their assets come
from package data (app.api.docs), headless Chromium renders every operation with every
request beyond 127.0.0.1 sent to a proxy that records it and answers nothing, and the rendered
page loads nothing from outside. Screenshots: out/docs/{swagger,redoc}.png (gitignored)."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.api.docs import (
    ASSET_PREFIX,
    CONTENT_SECURITY_POLICY,
    DOC_ASSETS,
    STATIC_DIR,
    install_offline_docs,
)
from tests.api.conftest import ROOT, make_settings
from tests.dashboard.browser import NoNetwork, free_port, parse, run_chromium

SHOTS = ROOT / "out" / "docs"


def offline_app(url: str) -> FastAPI:
    """The coordinator's app with the offline docs (installed here if create_app does not
    yet: its CDN pages are removed first)."""
    app = create_app(make_settings(url), background=False)
    paths = {getattr(route, "path", None) for route in app.router.routes}
    if ASSET_PREFIX + "{name}" not in paths:
        cdn = {"/docs", "/docs/oauth2-redirect", "/redoc"}
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in cdn]
        install_offline_docs(app)
    return app


@pytest.fixture
def served(sqlite_url: str) -> Iterator[tuple[str, FastAPI]]:
    app = offline_app(sqlite_url)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def operation_ids(schema: dict[str, Any]) -> list[str]:
    return [
        operation["operationId"]
        for operations in schema["paths"].values()
        for operation in operations.values()
        if isinstance(operation, dict) and "operationId" in operation
    ]


def test_docs_pages_reference_only_local_assets(sqlite_url: str) -> None:
    with TestClient(offline_app(sqlite_url)) as client:
        for page, asset_names in (
            ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css"}),
            ("/redoc", {"redoc.standalone.js"}),
        ):
            html = client.get(page)
            assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
            assert "http://" not in html.text and "https://" not in html.text, page
            assert html.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            for name in asset_names | {"swagger-ui-favicon-32x32.png"}:
                assert f'"{ASSET_PREFIX}{name}"' in html.text, (page, name)
        assert "validatorUrl" in client.get("/docs").text  # no badge from validator.swagger.io
        for name, media_type in DOC_ASSETS.items():
            asset = client.get(ASSET_PREFIX + name)
            assert asset.status_code == 200 and asset.headers["content-type"] == media_type
            assert asset.content == (STATIC_DIR / name).read_bytes()
        assert client.get(ASSET_PREFIX + "index.html").status_code == 404
        assert client.get(ASSET_PREFIX + "..%2Fdocs.py").status_code == 404
        assert client.get("/docs/oauth2-redirect").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        assert not any(path.startswith(("/docs", "/redoc")) for path in paths)


def test_install_refuses_an_app_that_already_has_docs() -> None:
    with pytest.raises(ValueError, match="docs_url=None"):
        install_offline_docs(FastAPI())
    with pytest.raises(ValueError, match="openapi_url=None"):
        install_offline_docs(FastAPI(openapi_url=None, docs_url=None, redoc_url=None))


def test_third_party_notes_match_the_vendored_files() -> None:
    notes = (STATIC_DIR / "THIRD_PARTY.md").read_text()
    rows = re.findall(
        r"^\| (\S+) \| (\S+) \| ([\d.]+) \| (\S+) \| `([0-9a-f]{16})…` \|$", notes, re.M
    )
    assert {row[0] for row in rows} >= set(DOC_ASSETS) | {"uPlot.iife.min.js", "uPlot.min.css"}
    for name, package, version, licence, digest in rows:
        path = STATIC_DIR / name
        assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(digest), name
        assert licence in {"MIT", "Apache-2.0"}, name
        assert f"## {package} {version}" in notes, name
    # The bundles name their version: the notes cannot drift from the files silently.
    assert 'Version: "2.5.4"' in (STATIC_DIR / "redoc.standalone.js.LICENSE.txt").read_text()
    assert "(v1.6.32)" in (STATIC_DIR / "uPlot.iife.min.js").read_text()[:200]


def _render(base: str, page: str, shot: Path) -> tuple[str, list[str]]:
    with NoNetwork() as proxy:
        dumped = run_chromium(
            "--virtual-time-budget=15000", "--dump-dom", base + page, proxy=proxy.url
        )
        assert dumped.returncode == 0, dumped.stderr[-2000:]
        shot.parent.mkdir(parents=True, exist_ok=True)
        shot.unlink(missing_ok=True)
        taken = run_chromium(
            "--virtual-time-budget=15000",
            f"--screenshot={shot}",
            "--window-size=1400,1000",
            base + page,
            proxy=proxy.url,
        )
        assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"{page} screenshot: {shot}")
    return dumped.stdout, proxy.page_requests()


def test_the_no_network_check_catches_an_external_script() -> None:
    """The control: a page that loads a script from a CDN is caught by the recording proxy."""
    page = 'data:text/html,<script src="https://cdn.jsdelivr.net/npm/x.js"></script><p>x</p>'
    with NoNetwork() as proxy:
        dumped = run_chromium("--dump-dom", page, proxy=proxy.url)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert "CONNECT cdn.jsdelivr.net:443 HTTP/1.1" in proxy.page_requests()
    assert parse(dumped.stdout).external_resources("http://127.0.0.1") == [
        "<script> https://cdn.jsdelivr.net/npm/x.js"
    ]


def test_swagger_ui_renders_offline(served: tuple[str, FastAPI]) -> None:
    base, app = served
    schema = httpx.get(f"{base}/openapi.json").json()
    html, outside = _render(base, "/docs", SHOTS / "swagger.png")
    assert outside == []  # Chromium asked for nothing beyond 127.0.0.1
    dom = parse(html)
    assert dom.external_resources(base) == []
    assert app.title in dom.text
    # One expandable block per operation, ids "operations-<tag>-<operationId>".
    blocks = {attrs["id"] for attrs in dom.with_class("div", "opblock") if "id" in attrs}
    for operation_id in operation_ids(schema):
        assert any(block.endswith("-" + operation_id) for block in blocks), operation_id


def test_redoc_renders_offline(served: tuple[str, FastAPI]) -> None:
    base, app = served
    schema = httpx.get(f"{base}/openapi.json").json()
    html, outside = _render(base, "/redoc", SHOTS / "redoc.png")
    assert outside == []
    dom = parse(html)
    assert dom.external_resources(base) == []
    assert app.title in dom.text
    ids = {attrs.get("id", "") for _, attrs in dom.elements}
    for operation_id in operation_ids(schema):
        assert any(i.endswith("operation/" + operation_id) for i in ids), operation_id
