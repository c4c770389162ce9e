"""The gateway's HTTP edge: ``uvicorn marketplace.gateway.api:app`` (settings are read when it starts)."""

from marketplace.gateway.api.app import create_app

app = create_app()

__all__ = ["app", "create_app"]
