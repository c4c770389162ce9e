"""`strata gateway`: run the marketplace's HTTP gateway, or only migrate its database."""

from __future__ import annotations

from typing import Annotated

import typer
import uvicorn

from marketplace.cli.common import console, fail, parse_key, reported
from marketplace.gateway.config import GatewaySettings
from marketplace.gateway.errors import GatewayError
from settlement.deploy import Deployment

app = typer.Typer(
    help="Run the gateway: the OpenAI-compatible, x402-paid API and the order book.", no_args_is_help=True
)


def _settings(database_url: str | None, models: list[str] | None, key: str | None) -> GatewaySettings:
    overrides: dict[str, object] = {}
    if database_url:
        overrides["database_url"] = database_url
    if models:
        overrides["models"] = models
    if key:
        parse_key(key)
        overrides["gateway_key"] = key
    return GatewaySettings(**overrides)  # type: ignore[arg-type]


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    model: Annotated[
        list[str] | None,
        typer.Option(help="checkpoint directory to serve, PATH or NAME=PATH [default: MODELS]"),
    ] = None,
    database_url: Annotated[str | None, typer.Option(help="[default: DATABASE_URL or sqlite]")] = None,
    key: Annotated[str | None, typer.Option(help="gateway's hex private key [default: GATEWAY_KEY]")] = None,
) -> None:
    """Serve the gateway until Ctrl-C. Chain and deployment come from RPC_URL and DEPLOYMENT_FILE."""
    from marketplace.gateway.api.app import create_app

    settings = _settings(database_url, model, key)
    if settings.gateway_key is None:
        fail("no gateway key: pass --key or set GATEWAY_KEY", "missing_key")
    if not settings.models:
        fail("no model to serve: pass --model or set MODELS", "missing_model")
    from marketplace.gateway.catalog import parse_entry

    for entry in settings.models:
        path = parse_entry(entry)[1]
        if not (path / "config.json").is_file():
            raise typer.BadParameter(f"{path} is not a checkpoint directory", param_hint="--model")
    with reported():
        Deployment.load(settings.deployment_file)
        try:
            uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)
        except GatewayError as exc:
            console.print(f"[bold red]error[/] [dim]({exc.code})[/] {exc.message}")
            raise typer.Exit(1) from exc


@app.command("migrate")
def migrate_command(
    database_url: Annotated[str | None, typer.Option(help="[default: DATABASE_URL or sqlite]")] = None,
) -> None:
    """Bring the gateway's database up to the newest schema."""
    from settlement.db.engine import migrate

    settings = _settings(database_url, None, None)
    with reported(), console.status("Migrating…"):
        migrate(settings.database_url)
    console.print(f"Database at [bold]{settings.database_url}[/] is up to date.")
