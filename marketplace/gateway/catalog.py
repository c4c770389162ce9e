"""The models a gateway serves: what it needs of each to quote, tokenize and match, read from a local
Hugging Face checkpoint directory (config, tokenizer, and the manifest that names the model by its root).

The gateway never loads weights. If the directory has no ``strata-manifest.json`` yet, the model is hashed
once to make one, as providers do.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from marketplace.gateway.errors import InvalidRequest, NotFound
from worker.checkpoint import Checkpoint
from worker.errors import WorkerError
from worker.grammar import Vocabulary
from worker.identity import TensorNames
from worker.shard import load_manifest
from worker.structure import discover

# Used when a model's config names no context length.
DEFAULT_CONTEXT = 2048


@dataclass(frozen=True)
class ServedModel:
    name: str
    root: str  # 0x-prefixed model root
    num_layers: int
    context_length: (
        int  # positions a request may use, prompt and generated: the model's, within the session limit
    )
    vocab_size: int
    directory: Path
    tokenizer: PreTrainedTokenizerBase
    stop_token_ids: frozenset[int]
    model_context_length: int = 0  # the checkpoint's own (max_position_embeddings)

    def encode_prompt(self, text: str) -> list[int]:
        with _encoding():
            return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of a conversation (messages as chat templates take them), ready for the assistant's turn.

        Uses the tokenizer's chat template. A checkpoint without one gets a plain one: each message as
        ``<|role|>\\ncontent\\n``, then ``<|assistant|>\\n``, after the BOS token if the tokenizer has one; it
        takes no tools, nor tool calls and results (InvalidRequest).
        """
        if tools and not self.takes_tools:
            raise InvalidRequest(
                "unsupported_parameter", f"{self.name}'s chat template does not take tools", param="tools"
            )
        if self.tokenizer.chat_template:
            with _encoding():
                text = self.tokenizer.apply_chat_template(
                    [dict(message) for message in messages],
                    tools=[dict(tool) for tool in tools] if tools else None,
                    add_generation_prompt=True,
                    tokenize=False,
                )
                return list(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])
        if any(message.get("tool_calls") or message["role"] == "tool" for message in messages):
            raise InvalidRequest(
                "unsupported_parameter", f"{self.name} has no chat template for tool calls", param="messages"
            )
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
        with _encoding():
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = self.tokenizer.bos_token_id
        return [bos, *ids] if isinstance(bos, int) else ids

    @property
    def takes_tools(self) -> bool:
        """Whether the chat template renders tools (it reads the ``tools`` variable)."""
        template = self.tokenizer.chat_template
        return isinstance(template, str) and "tools" in template

    @functools.cached_property
    def vocabulary(self) -> Vocabulary:
        """The tokenizer as grammars see it: to check a request's grammar before it costs anything."""
        return Vocabulary(self.tokenizer, self.vocab_size)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a byte-level token may be part of a character)."""
        return self.vocabulary.token_bytes(token)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "object": "model",
            "created": 0,
            "owned_by": "strata",
            "root": self.root,
            "layers": self.num_layers,
            "context_length": self.context_length,
            "model_context_length": self.model_context_length,
        }


@contextlib.contextmanager
def _encoding() -> Iterator[None]:
    """What a client's text can make a tokenizer or a chat template refuse is the client's error, not ours."""
    try:
        yield
    except jinja2.TemplateError as exc:  # a template's own rule: roles must alternate, say
        raise InvalidRequest(
            "chat_template_refused", f"the model's chat template refused: {exc}"[:500]
        ) from exc
    except (
        TypeError,
        ValueError,
        UnicodeError,
    ) as exc:  # a lone surrogate, which JSON allows and Unicode does not
        raise InvalidRequest("unencodable_text", f"text the tokenizer cannot encode: {exc}"[:500]) from exc


def _ids(value: Any) -> set[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, list | tuple):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def load_model(
    directory: Path, name: str | None = None, *, max_session_positions: int | None = None
) -> ServedModel:
    """The checkpoint at ``directory``. Requests get at most ``max_session_positions`` positions, the providers'
    session limit, when that is below the model's own context."""
    directory = Path(directory)
    with Checkpoint(directory) as checkpoint:
        config = checkpoint.config()
        structure = discover(config)
        manifest = load_manifest(checkpoint, TensorNames(checkpoint, structure), config, None)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    stops = _ids(getattr(config, "eos_token_id", None)) | _ids(tokenizer.eos_token_id)
    if (directory / "generation_config.json").is_file():
        stops |= _ids(GenerationConfig.from_pretrained(str(directory)).eos_token_id)
    context = int(
        getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None)
        or DEFAULT_CONTEXT
    )
    return ServedModel(
        name=name or directory.name,
        root=manifest.root,
        num_layers=structure.num_layers,
        context_length=min(context, max_session_positions or context),
        model_context_length=context,
        vocab_size=int(config.vocab_size),
        directory=directory,
        tokenizer=tokenizer,
        stop_token_ids=frozenset(stops),
    )


def parse_entry(entry: str) -> tuple[str | None, Path]:
    """``PATH`` or ``NAME=PATH``."""
    name, sep, path = entry.partition("=")
    if sep and name and "/" not in name:
        return name, Path(path)
    return None, Path(entry)


class Catalog:
    def __init__(self, models: Iterable[ServedModel]) -> None:
        self._by_name: dict[str, ServedModel] = {}
        self._by_root: dict[str, ServedModel] = {}
        for model in models:
            if model.name in self._by_name:
                raise InvalidRequest("duplicate_model", f"two models are named {model.name!r}")
            self._by_name[model.name] = model
            self._by_root[model.root.lower()] = model

    @classmethod
    def load(cls, entries: Iterable[str], *, max_session_positions: int | None = None) -> Catalog:
        models = []
        for entry in entries:
            name, path = parse_entry(entry)
            try:
                models.append(load_model(path, name, max_session_positions=max_session_positions))
            except (WorkerError, OSError, ValueError) as exc:
                raise InvalidRequest("bad_model", f"cannot serve {path}: {exc}") from exc
        return cls(models)

    def get(self, name_or_root: str) -> ServedModel:
        """A model by its name or its root; raises NotFound (``unknown_model``)."""
        model = self._by_name.get(name_or_root) or self._by_root.get(name_or_root.lower())
        if model is None:
            raise NotFound("unknown_model", f"this gateway serves no model {name_or_root!r}")
        return model

    def by_root(self, root: str) -> ServedModel | None:
        return self._by_root.get(root.lower())

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)
