"""Shards against the whole model: the same greedy tokens as transformers' generate(), logits within 1e-4."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.worker.conftest import TINY_LAYERS
from worker.errors import CheckpointError, ModelIdentityError
from worker.identity import MANIFEST_FILE, Manifest
from worker.shard import LayerSpan, Shard, load_shard
from worker.testing.tiny import ARCHITECTURES, BOS

CPU = torch.device("cpu")
PROMPT = torch.tensor([[BOS, *b"Strata splits models by layer. "]])
NEW_TOKENS = 12
SPLITS = {1: ["0:6"], 2: ["0:3", "3:6"], 3: ["0:2", "2:5", "5:6"]}


def generate_over(
    shards: list[Shard], prompt: torch.Tensor, new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding through a chain of shards: prefill, then one decode step per token."""
    caches = [shard.new_cache() for shard in shards]
    tokens: list[int] = []
    step_logits = []
    inputs = prompt
    for _ in range(new_tokens):
        hidden: torch.Tensor | None = None
        for shard, cache in zip(shards, caches, strict=True):
            hidden = (
                shard.forward(cache=cache, input_ids=inputs)
                if shard.span.first
                else shard.forward(cache=cache, hidden=hidden)
            )
        assert hidden is not None
        logits = hidden[:, -1, :]
        step_logits.append(logits)
        inputs = logits.argmax(-1, keepdim=True)
        tokens.append(int(inputs))
    return tokens, torch.cat(step_logits)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("providers", [1, 2, 3])
def test_spans_match_the_whole_model(tiny_models: dict[str, Path], arch: str, providers: int) -> None:
    directory = tiny_models[arch]
    reference = AutoModelForCausalLM.from_pretrained(directory).eval()
    expected = reference.generate(
        PROMPT,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=reference.config.pad_token_id,
    )
    shards = [load_shard(directory, span, device=CPU) for span in SPLITS[providers]]
    tokens, logits = generate_over(shards, PROMPT, NEW_TOKENS)
    assert tokens == expected.sequences[0, PROMPT.shape[1] :].tolist()
    torch.testing.assert_close(logits, torch.cat(expected.logits), rtol=0, atol=1e-4)


def test_all_spans_name_the_same_model(tiny_models: dict[str, Path]) -> None:
    roots = {load_shard(tiny_models["llama"], span, device=CPU).root for span in ("0:2", "2:4", "4:6")}
    assert len(roots) == 1


def _weight_bytes(shard: Shard) -> int:
    return sum(p.numel() * p.element_size() for p in shard.model.parameters())


def test_a_third_of_the_layers_uses_well_under_half_the_memory(tmp_path: Path) -> None:
    # A vocabulary much larger than the tiny one, so embeddings weigh what they do in real models.
    from worker.testing.tiny import write_tiny_checkpoint

    directory = write_tiny_checkpoint(tmp_path / "m", arch="llama", layers=9, hidden=256)
    full = _weight_bytes(load_shard(directory, "0:9", device=CPU))
    for span in ("0:3", "3:6", "6:9"):
        assert _weight_bytes(load_shard(directory, span, device=CPU)) < 0.45 * full


def test_middle_span_holds_no_embedding_or_head(tiny_models: dict[str, Path]) -> None:
    shard = load_shard(tiny_models["qwen2"], "2:4", device=CPU)
    names = [name for name, _ in shard.model.named_parameters()]
    assert names and all(name.startswith("model.layers.") for name in names)
    assert {int(name.split(".")[2]) for name in names} == {0, 1}


def _copy(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / directory.name
    shutil.copytree(directory, target)
    return target


def test_tampered_layer_is_refused_only_where_it_is_loaded(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    directory = _copy(tiny_models["llama"], tmp_path)
    load_shard(directory, "0:6", device=CPU)  # writes the manifest from the honest weights
    weights = load_file(directory / "model.safetensors")
    weights["model.layers.4.mlp.down_proj.weight"][0, 0] += 1e-3
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelIdentityError, match="layer 4"):
        load_shard(directory, "3:6", device=CPU)
    load_shard(directory, "0:3", device=CPU)


def test_manifest_that_does_not_add_up_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(tiny_models["llama"], tmp_path)
    load_shard(directory, "0:2", device=CPU)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["layers"][0] = "00" * 32
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelIdentityError, match="does not match its contents"):
        load_shard(directory, "0:2", device=CPU)


def test_manifest_saved_while_others_read_it_is_never_seen_half_written(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    # Providers started together on a fresh checkpoint all hash it and save the manifest at once.
    directory = _copy(tiny_models["llama"], tmp_path)
    load_shard(directory, "0:2", device=CPU)
    path = directory / MANIFEST_FILE
    manifest = Manifest.load(path)
    stop = threading.Event()

    def save_repeatedly() -> None:
        while not stop.is_set():
            manifest.save(path)

    writer = threading.Thread(target=save_repeatedly)
    writer.start()
    try:
        for _ in range(2000):
            assert Manifest.load(path) == manifest
    finally:
        stop.set()
        writer.join()
    assert [p.name for p in directory.iterdir() if p.name.startswith(MANIFEST_FILE)] == [MANIFEST_FILE]
    assert path.stat().st_mode & 0o777 == 0o644


def test_gpt2_checkpoint_without_base_prefix_loads_as_the_same_model(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    original = load_shard(tiny_models["gpt2"], "0:6", device=CPU)
    directory = _copy(tiny_models["gpt2"], tmp_path)
    (directory / MANIFEST_FILE).unlink()
    weights = load_file(directory / "model.safetensors")
    renamed = {name.removeprefix("transformer."): tensor for name, tensor in weights.items()}
    save_file(renamed, directory / "model.safetensors", metadata={"format": "pt"})
    stripped = load_shard(directory, "0:6", device=CPU)
    assert stripped.root == original.root
    tokens, _ = generate_over([stripped], PROMPT, 4)
    expected, _ = generate_over([original], PROMPT, 4)
    assert tokens == expected


@pytest.mark.parametrize("text", ["", "3", "a:b", "4:2", "0:7", "-1:3", "2:2"])
def test_bad_spans_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        LayerSpan.parse(text, TINY_LAYERS)


def test_missing_checkpoint_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_shard(tmp_path, "0:1", device=CPU)


def test_wrong_inputs_for_the_span_are_refused(tiny_models: dict[str, Path]) -> None:
    middle = load_shard(tiny_models["llama"], "2:4", device=CPU)
    with pytest.raises(ValueError):
        middle.forward(cache=middle.new_cache(), input_ids=PROMPT)
