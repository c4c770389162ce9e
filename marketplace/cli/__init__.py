"""The `strata` command line."""

from __future__ import annotations

import logging

import typer

from marketplace.cli import chain

app = typer.Typer(
    name="strata",
    help="Strata: a marketplace for LLM inference on pooled GPUs, settled on an EVM chain.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(chain.app, name="chain")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()
