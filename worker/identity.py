"""Content hashes that name a model: one per layer, and a root over them and the config.

A layer's hash is sha256 over its tensors in canonical order: names relative to the layer (so two checkpoints
that name the stack differently still agree), sorted, each followed by its dtype, shape and raw bytes. The
embeddings form one more group, the final norm and LM head another. The root hashes the canonical config and
every group hash in order; asks, receipts and validation name a model by it.

Hashing a model reads every tensor once. The result is kept in ``strata-manifest.json`` next to the weights
(or wherever the caller says), and a provider re-hashes only the layers it loads, checking them against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from worker.checkpoint import Checkpoint
from worker.errors import CheckpointError, ModelIdentityError
from worker.structure import ModelStructure

MANIFEST_FILE = "strata-manifest.json"
MANIFEST_VERSION = 1

# Config keys that describe where or how a checkpoint was saved rather than what the model computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "_commit_hash",
    "use_cache",
    "dtype",
    "torch_dtype",
}


def canonical_config(config: PretrainedConfig) -> dict[str, Any]:
    return {key: value for key, value in sorted(config.to_dict().items()) if key not in _VOLATILE_CONFIG_KEYS}


def hash_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        flat = tensor.detach().contiguous().cpu()
        header = f"{name}|{str(flat.dtype).removeprefix('torch.')}|{','.join(map(str, flat.shape))}|"
        digest.update(header.encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def root_hash(config: dict[str, Any], embedding: str, layers: list[str], head: str) -> str:
    document = json.dumps(
        {"config": config, "embedding": embedding, "layers": layers, "head": head},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return "0x" + hashlib.sha256(document.encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    version: int
    root: str
    model_type: str
    embedding: str
    layers: list[str]
    head: str

    def check(self, config: PretrainedConfig) -> None:
        """Refuses a manifest whose root does not follow from its own hashes and ``config``."""
        expected = root_hash(canonical_config(config), self.embedding, self.layers, self.head)
        if expected != self.root:
            raise ModelIdentityError(f"manifest root {self.root} does not match its contents ({expected})")

    def save(self, path: Path) -> None:
        """Writes to a temporary name, then renames: providers starting together on one checkpoint may all
        save it, and none of them may read a half-written file."""
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, delete=False) as file:
            file.write(json.dumps(asdict(self), indent=2) + "\n")
        try:
            os.chmod(file.name, 0o644)  # readable like any other file of the checkpoint
            os.replace(file.name, path)
        except OSError:
            os.unlink(file.name)
            raise

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
            manifest = cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ModelIdentityError(f"{path} is not a model manifest: {exc}") from exc
        if manifest.version != MANIFEST_VERSION:
            raise ModelIdentityError(
                f"{path} has manifest version {manifest.version}, expected {MANIFEST_VERSION}"
            )
        return manifest


class TensorNames:
    """Groups a checkpoint's tensor names by the part of the model they belong to.

    Names are the checkpoint's own: a family whose checkpoints store tensors in another layout than its modules
    (Mixtral's per-expert matrices, fused in the module) is converted only when loading, so hashes always cover
    the bytes on disk.
    """

    def __init__(self, checkpoint: Checkpoint, structure: ModelStructure) -> None:
        self.structure = structure
        self.layers: list[list[str]] = [[] for _ in range(structure.num_layers)]
        self.embedding: list[str] = []
        self.head: list[str] = []
        self.canonical: dict[str, str] = {}
        for name in checkpoint.names():
            canonical = self._canonical(name)
            self.canonical[name] = canonical
            layer = structure.layer_of(canonical)
            if layer is not None and layer < structure.num_layers:
                self.layers[layer].append(name)
            elif structure.is_embedding(canonical):
                self.embedding.append(name)
            elif structure.is_head(canonical):
                self.head.append(name)
        missing = [i for i, names in enumerate(self.layers) if not names]
        if missing or not self.embedding:
            raise CheckpointError(f"checkpoint lacks tensors for layers {missing or '-'} or the embeddings")

    def _canonical(self, name: str) -> str:
        # Some checkpoints (the original GPT-2) store the base model's tensors without its prefix.
        base = self.structure.base_prefix + "."
        if name.startswith(base) or name.startswith(self.structure.head_prefix + "."):
            return name
        return base + name

    def relative(self, name: str, layer: int) -> str:
        return self.canonical[name].removeprefix(self.structure.layer_prefix(layer))


def layer_hash(checkpoint: Checkpoint, names: TensorNames, layer: int) -> str:
    return hash_tensors(
        (names.relative(name, layer), tensor) for name, tensor in checkpoint.tensors(names.layers[layer])
    )


def group_hash(checkpoint: Checkpoint, names: TensorNames, group: list[str]) -> str:
    return hash_tensors((names.canonical[name], tensor) for name, tensor in checkpoint.tensors(group))


def compute_manifest(checkpoint: Checkpoint, names: TensorNames, config: PretrainedConfig) -> Manifest:
    embedding = group_hash(checkpoint, names, names.embedding)
    layers = [layer_hash(checkpoint, names, i) for i in range(names.structure.num_layers)]
    head = group_hash(checkpoint, names, names.head)
    root = root_hash(canonical_config(config), embedding, layers, head)
    return Manifest(MANIFEST_VERSION, root, names.structure.model_type, embedding, layers, head)
