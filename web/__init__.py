"""The clipsearch web app: REST API, clip-back compatible endpoints and the search page.

Build an app with `create_app(ServerSettings(...))`; `clipsearch serve` runs it under uvicorn.
"""

from .app import create_app
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
