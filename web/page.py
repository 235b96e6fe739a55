"""The search page at `/` and its assets: plain files shipped in the package, no build step, no CDN."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"

# The page loads nothing from elsewhere; images may be blob: URLs (fetched with the API key) or data: URLs.
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; script-src 'self'; "
            "style-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

router = APIRouter(include_in_schema=False)


@router.api_route("/", methods=["GET", "HEAD"])  # HEAD: what uptime monitors send
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})


def mount_static(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
