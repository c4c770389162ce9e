"""The gateway's HTTP API: ``uvicorn marketplace.api:app`` (settings from the environment, read at start)."""

from marketplace.api.app import create_app

app = create_app()

__all__ = ["app", "create_app"]
