"""Reading a Hugging Face checkpoint directory: its config, its tensor index, and single tensors on demand.

Only safetensors checkpoints are read (one ``model.safetensors`` or a sharded set with its index). Tensors are
opened lazily, so a provider touches only the bytes of the layers it serves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from worker.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """A checkpoint directory. Use as a context manager to keep its files open while reading many tensors."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise CheckpointError(f"{self.directory} has no config.json")
        self.files = self._tensor_files()
        self._handles: dict[str, Any] = {}
        self._stack = ExitStack()

    def _tensor_files(self) -> dict[str, str]:
        """Tensor name → the file holding it."""
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a safetensors index: {exc}") from exc
            return {str(name): str(file) for name, file in weight_map.items()}
        single = self.directory / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        with safe_open(str(single), framework="pt") as handle:
            return {name: SINGLE_FILE for name in handle.keys()}  # noqa: SIM118 - safe_open is not a Mapping

    def config(self) -> PretrainedConfig:
        try:
            return AutoConfig.from_pretrained(str(self.directory), local_files_only=True)  # type: ignore[no-any-return]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot read the config in {self.directory}: {exc}") from exc

    def names(self) -> list[str]:
        return sorted(self.files)

    def tensor(self, name: str) -> torch.Tensor:
        file = self.files.get(name)
        if file is None:
            raise CheckpointError(f"{self.directory} has no tensor {name!r}")
        handle = self._handles.get(file)
        if handle is None:
            handle = self._stack.enter_context(safe_open(str(self.directory / file), framework="pt"))
            self._handles[file] = handle
        return handle.get_tensor(name)  # type: ignore[no-any-return]

    def tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.tensor(name)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
