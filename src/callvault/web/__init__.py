"""The web app and JSON API over the archive: search, play, export, users and audit.

Build it with `create_app(index, storage)` and serve it with any ASGI server (uvicorn).
"""

from callvault.web._app import create_app

__all__ = ["create_app"]
