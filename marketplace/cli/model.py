"""`strata model`: build small local checkpoints and show what a checkpoint is made of."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from marketplace.cli.common import console, emit_json, fail

# torch and transformers are imported by the commands that use them: every `strata` command would otherwise
# wait seconds for them.

app = typer.Typer(help="Build a tiny local checkpoint, or inspect one.", no_args_is_help=True)


@app.command("tiny")
def tiny_command(
    out: Annotated[Path, typer.Option(help="directory to write the checkpoint to")],
    arch: Annotated[
        str, typer.Option(help="model family: llama, mistral, qwen2, gpt2, mixtral, …")
    ] = "llama",
    layers: Annotated[int, typer.Option(min=1, max=256, help="decoder layers")] = 8,
    hidden: Annotated[int, typer.Option(min=64, max=16_384, help="hidden size, a multiple of 64")] = 256,
    seed: Annotated[int, typer.Option(min=0, help="seed of the random weights")] = 0,
) -> None:
    """Write a small deterministic checkpoint (seeded random weights, byte-level tokenizer)."""
    from worker.testing.tiny import ARCHITECTURES, write_tiny_checkpoint

    if arch not in ARCHITECTURES:
        raise typer.BadParameter(f"{arch!r} is not one of {', '.join(ARCHITECTURES)}", param_hint="--arch")
    if hidden % 64:
        raise typer.BadParameter(f"{hidden} is not a multiple of 64", param_hint="--hidden")
    if out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty", "output_exists")
    with console.status(f"Writing a {layers}-layer {arch} checkpoint…"):
        write_tiny_checkpoint(out, arch=arch, layers=layers, hidden=hidden, seed=seed)
    console.print(f"Wrote [bold]{out}[/]")


@app.command("inspect")
def inspect_command(
    model: Annotated[Path, typer.Option("--model", help="a Hugging Face checkpoint directory")],
    as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
) -> None:
    """Show a checkpoint's structure and the hashes that name it (hashing it once if needed)."""
    from worker.checkpoint import Checkpoint
    from worker.errors import WorkerError
    from worker.identity import TensorNames
    from worker.shard import load_manifest
    from worker.structure import discover

    try:
        with Checkpoint(model) as checkpoint, console.status("Hashing layers…"):
            config = checkpoint.config()
            structure = discover(config)
            manifest = load_manifest(checkpoint, TensorNames(checkpoint, structure), config, None)
    except WorkerError as exc:
        fail(str(exc), exc.code, as_json=as_json)
    if as_json:
        emit_json({"structure": structure.__dict__, "manifest": manifest.__dict__})
        return
    console.print(
        f"[bold]{structure.model_type}[/], {structure.num_layers} layers, root [bold]{manifest.root}[/]"
    )
    table = Table("part", "where", "sha256")
    table.add_row("embeddings", ", ".join(structure.embedding_prefixes), manifest.embedding)
    for index, digest in enumerate(manifest.layers):
        table.add_row(f"layer {index}", structure.layer_prefix(index).rstrip("."), digest)
    table.add_row("norm and head", f"{structure.final_norm_prefix}, {structure.head_prefix}", manifest.head)
    console.print(table)
