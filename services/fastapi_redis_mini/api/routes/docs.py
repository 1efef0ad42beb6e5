"""GET /docs (Swagger UI) and GET /redoc (ReDoc), with their assets served by the api itself.

FastAPI's own pages load Swagger UI, ReDoc, Google Fonts and a favicon from the public internet,
which leaves them blank in a cluster that cannot reach it. The assets here come from the
fastapi-standalone-docs wheel: current Swagger UI and ReDoc builds with their licences, and a
ReDoc build patched to load its logo from beside the page rather than from a CDN.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

ASSETS_PACKAGE = "fastapi_standalone_docs"

router = APIRouter(include_in_schema=False)


def _root_path(request: Request) -> str:
    """The prefix a proxy serves the api under, as FastAPI's own pages read it."""
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI for the app's OpenAPI schema."""
    app: FastAPI = request.app
    root = _root_path(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - Swagger UI",
        swagger_js_url=f"{root}/docs/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/fastapi/favicon.png",
        swagger_ui_parameters=app.swagger_ui_parameters,
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc for the app's OpenAPI schema."""
    app: FastAPI = request.app
    root = _root_path(request)
    return get_redoc_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}/redoc/redoc.standalone.js",
        redoc_favicon_url=f"{root}/docs/fastapi/favicon.png",
        with_google_fonts=False,
    )


@router.get("/docs/")
@router.get("/redoc/")
async def page_with_slash(request: Request) -> RedirectResponse:
    """/docs/ and /redoc/ lead to their page; the asset mounts under them would answer 404.

    The target is relative ("../docs"), so it holds under whatever prefix a proxy adds.
    """
    page = request.url.path.rstrip("/").rsplit("/", 1)[-1]
    return RedirectResponse(f"../{page}", status_code=308)


def _assets(directory: str) -> StaticFiles:
    return StaticFiles(packages=[(ASSETS_PACKAGE, f"static/{directory}")])


# EdgeMiddleware leaves static files uncounted: a file name is no route template.
# /redoc/ holds the ReDoc build and the logo it asks for at the page's own path.
routes = [
    *router.routes,
    Mount("/docs/fastapi", _assets("fastapi")),
    Mount("/docs", _assets("swagger")),
    Mount("/redoc", _assets("redoc")),
]
