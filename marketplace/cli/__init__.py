"""The `strata` command line."""

from __future__ import annotations

import logging
import os

import typer

from marketplace.cli import chain, client, demo, gateway, model, provider, settlement, up

app = typer.Typer(
    name="strata",
    help="Strata: a marketplace for LLM inference on pooled GPUs, settled on an EVM chain.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(chain.app, name="chain")
app.add_typer(model.app, name="model")
app.add_typer(provider.app, name="provider")
app.add_typer(gateway.app, name="gateway")
app.add_typer(client.app, name="client")
app.add_typer(settlement.app, name="settlement")
app.command("up")(up.up_command)
app.command("demo")(demo.demo_command)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Rich spinners say what is going on; transformers' own progress bars would only interleave with them. Set
    # before transformers is first imported (commands import it only when they load a model), and inherited by
    # the processes `strata up` starts.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    app()
