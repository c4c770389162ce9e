"""`strata gateway`: run the marketplace's HTTP gateway, or only migrate its database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from pydantic import SecretStr

from marketplace.cli.common import console, fail, reported
from marketplace.cli.keys import KeyFileOption, KeystoreOption, load_account, missing_key_message
from marketplace.gateway.config import GatewaySettings
from marketplace.gateway.errors import GatewayError
from settlement.deploy import Deployment

app = typer.Typer(
    help="Run the gateway: the OpenAI-compatible, x402-paid API and the order book.", no_args_is_help=True
)


def _settings(
    database_url: str | None, models: list[str] | None, key_file: Path | None, keystore: Path | None
) -> GatewaySettings:
    overrides: dict[str, object] = {}
    if database_url:
        overrides["database_url"] = database_url
    if models:
        overrides["models"] = models
    settings = GatewaySettings(**overrides)  # type: ignore[arg-type]
    account = load_account(
        key_file=key_file, keystore=keystore, env_key=settings.gateway_key, env_name="GATEWAY_KEY"
    )
    if account is not None:
        settings.gateway_key = SecretStr("0x" + bytes(account.key).hex())
    return settings


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    model: Annotated[
        list[str] | None,
        typer.Option(help="checkpoint directory to serve, PATH or NAME=PATH [default: MODELS]"),
    ] = None,
    database_url: Annotated[str | None, typer.Option(help="[default: DATABASE_URL or sqlite]")] = None,
    key_file: KeyFileOption = None,
    keystore: KeystoreOption = None,
    ssl_keyfile: Annotated[
        Path | None, typer.Option(help="serve HTTPS with this TLS private key (PEM), with --ssl-certfile")
    ] = None,
    ssl_certfile: Annotated[
        Path | None, typer.Option(help="the TLS certificate chain (PEM) for --ssl-keyfile")
    ] = None,
) -> None:
    """Serve the gateway until Ctrl-C. Chain and deployment come from RPC_URL and DEPLOYMENT_FILE."""
    from marketplace.gateway.api.app import create_app

    settings = _settings(database_url, model, key_file, keystore)
    if settings.gateway_key is None:
        fail(missing_key_message("gateway", "GATEWAY_KEY"), "missing_key")
    if (ssl_keyfile is None) != (ssl_certfile is None):
        raise typer.BadParameter("give --ssl-keyfile and --ssl-certfile together", param_hint="--ssl-keyfile")
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
            uvicorn.run(
                create_app(settings),
                host=host,
                port=port,
                log_level="warning",
                access_log=False,
                ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
                ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
            )
        except GatewayError as exc:
            console.print(f"[bold red]error[/] [dim]({exc.code})[/] {exc.message}")
            raise typer.Exit(1) from exc


@app.command("migrate")
def migrate_command(
    database_url: Annotated[str | None, typer.Option(help="[default: DATABASE_URL or sqlite]")] = None,
) -> None:
    """Bring the gateway's database up to the newest schema."""
    from settlement.db.engine import migrate

    settings = _settings(database_url, None, None, None)
    with reported(), console.status("Migrating…"):
        migrate(settings.database_url)
    console.print(f"Database at [bold]{settings.database_url}[/] is up to date.")
