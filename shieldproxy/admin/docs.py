"""/docs: Swagger UI from the installed swagger-ui-py package (no CDN), pointed at /openapi.json."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from aiohttp import web

# Only what the page loads: the package also ships an editor and multi-MB source maps.
ASSETS = frozenset({"swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png"})

# Relative URLs, so the page also works behind a reverse proxy that mounts the admin API under a
# prefix. Swagger UI 5 (unlike 4.x, which swagger-ui-bundle ships) renders OpenAPI 3.1.
PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>shieldproxy admin API</title>
  <link rel="icon" type="image/png" href="docs/static/favicon-32x32.png">
  <link rel="stylesheet" href="docs/static/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/static/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "openapi.json",
      dom_id: "#swagger-ui",
      persistAuthorization: true,
      deepLinking: true,
    });
  </script>
</body>
</html>
"""


@functools.cache
def _static_dir() -> Path:
    """Found without importing swagger_ui (its __init__ pulls in jinja2 and every handler)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or spec.origin is None:
        raise RuntimeError("the swagger-ui-py package is not installed")
    return Path(spec.origin).parent / "static"


async def page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


async def asset(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    response = web.FileResponse(_static_dir() / name)
    response.headers["Cache-Control"] = "public, max-age=86400"
    return response


def register(app: web.Application) -> None:
    app.router.add_get("/docs", page)
    app.router.add_get("/docs/static/{name}", asset)
