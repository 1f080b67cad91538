"""Swagger UI (``/docs``) and ReDoc (``/redoc``) served from package data, for air-gapped sites.

FastAPI's own pages load their scripts, styles and favicon from CDNs and render blank without
Internet. Here the same pages point at assets vendored under app/api/static/ (versions and
licences in app/api/static/THIRD_PARTY.md) and served by this app, so the pages reference no
URL outside the coordinator. ``create_app`` builds the FastAPI app with ``docs_url=None,
redoc_url=None`` and calls :func:`install_offline_docs`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSET_PREFIX = "/docs/assets/"
# The only files served under ASSET_PREFIX (name -> media type): the vendored bundles.
DOC_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-favicon-32x32.png": "image/png",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
}
# The assets are versioned with the package: a browser may keep them for a day.
_CACHE = {"Cache-Control": "public, max-age=86400"}
# The browser itself refuses anything from outside the coordinator: ReDoc's footer, for one,
# shows a logo from its CDN (hidden when it fails to load). Inline scripts and styles: the
# pages' init script and the bundles' injected styles; blob: workers: ReDoc's search.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'"
)
# No validator badge (it loads an image from validator.swagger.io).
_SWAGGER_PARAMETERS = {"validatorUrl": None, "deepLinking": True, "displayRequestDuration": True}


def doc_asset(name: str) -> FileResponse:
    if name not in DOC_ASSETS:
        raise HTTPException(status_code=404, detail=f"no documentation asset {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=DOC_ASSETS[name], headers=_CACHE)


def install_offline_docs(app: FastAPI) -> None:
    """Add ``/docs``, ``/docs/oauth2-redirect``, ``/redoc`` and their assets to ``app`` (built
    with ``docs_url=None, redoc_url=None``); none of them is part of the OpenAPI schema."""
    openapi_url = app.openapi_url
    if openapi_url is None:
        raise ValueError("the app has no OpenAPI schema (openapi_url=None) to document")
    for route in app.router.routes:
        path = getattr(route, "path", None)
        if path in {"/docs", "/redoc"}:
            raise ValueError(
                f"the app already serves {path}: build it with docs_url=None, redoc_url=None"
            )
    title = app.title
    oauth2_redirect = "/docs/oauth2-redirect"

    def swagger_ui(request: Request) -> HTMLResponse:
        # Behind a proxy that strips a path prefix (root_path), every URL carries it.
        root = request.scope.get("root_path", "").rstrip("/")
        page = get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{title} - Swagger UI",
            swagger_js_url=root + ASSET_PREFIX + "swagger-ui-bundle.js",
            swagger_css_url=root + ASSET_PREFIX + "swagger-ui.css",
            swagger_favicon_url=root + ASSET_PREFIX + "swagger-ui-favicon-32x32.png",
            oauth2_redirect_url=root + oauth2_redirect,
            swagger_ui_parameters=_SWAGGER_PARAMETERS,
        )
        page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return page

    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        page = get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{title} - ReDoc",
            redoc_js_url=root + ASSET_PREFIX + "redoc.standalone.js",
            redoc_favicon_url=root + ASSET_PREFIX + "swagger-ui-favicon-32x32.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return page

    app.add_api_route("/docs", swagger_ui, include_in_schema=False, response_class=HTMLResponse)
    app.add_api_route(
        oauth2_redirect,
        get_swagger_ui_oauth2_redirect_html,
        include_in_schema=False,
        response_class=HTMLResponse,
    )
    app.add_api_route("/redoc", redoc, include_in_schema=False, response_class=HTMLResponse)
    app.add_api_route(ASSET_PREFIX + "{name}", doc_asset, include_in_schema=False)
