"""A provider's shard: the layers ``[start, end)`` of a model, plus the embeddings on the first span and the
final norm and LM head on the last, loaded from a local checkpoint and checked against the model's hashes.

The shard is the model's own transformers class, built on the meta device and cut down to its span, so every
family runs its own attention, masks, rotary embeddings and MoE routing. Layers are renumbered from zero so the
shard keeps its own KV cache. Parts the span does not need are never materialised.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig

from worker.batching import ATTENTION, PackedBatch, PackedRow, SessionKV, active
from worker.checkpoint import Checkpoint
from worker.errors import CheckpointError, ModelIdentityError, ModelStructureError
from worker.grammar import Vocabulary, vocabulary_at
from worker.identity import MANIFEST_FILE, Manifest, TensorNames, compute_manifest, group_hash, layer_hash
from worker.structure import ModelStructure, build_on_meta, discover

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSpan:
    """Decoder layers ``start`` (inclusive) to ``end`` (exclusive) of a model with ``num_layers`` layers."""

    start: int
    end: int
    num_layers: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.num_layers:
            raise ValueError(f"layer span {self.start}:{self.end} is not within 0:{self.num_layers}")

    @classmethod
    def parse(cls, text: str, num_layers: int) -> LayerSpan:
        start, sep, end = text.partition(":")
        if not sep or not start.isdigit() or not end.isdigit():
            raise ValueError(f"{text!r} is not a layer span like 0:8")
        return cls(int(start), int(end), num_layers)

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.num_layers

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU, where half precision is slow and inexact; bf16 on a GPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class _NoPositions(nn.Module):
    """Stands in for learned position embeddings (GPT-2's ``wpe``) on spans after the first: the first span
    already added them to the hidden states it passed on."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=position_ids.device).expand(
            *position_ids.shape, self.hidden_size
        )


def load_manifest(
    checkpoint: Checkpoint, names: TensorNames, config: PretrainedConfig, path: Path | None
) -> Manifest:
    """The model's manifest, hashing the whole checkpoint once if none is stored yet."""
    path = path or checkpoint.directory / MANIFEST_FILE
    if path.is_file():
        manifest = Manifest.load(path)
        manifest.check(config)
        return manifest
    manifest = compute_manifest(checkpoint, names, config)
    try:
        manifest.save(path)
    except OSError as exc:  # a read-only checkpoint: fine, the hashes are recomputed next time
        log.warning("could not save the model manifest to %s: %s", path, exc)
    return manifest


def model_root(directory: Path) -> str:
    """The root naming the model in a checkpoint directory (hashing it once if it has no manifest yet)."""
    with Checkpoint(directory) as checkpoint:
        config = checkpoint.config()
        return load_manifest(checkpoint, TensorNames(checkpoint, discover(config)), config, None).root


class Shard:
    """One span of a model, ready to run. ``root`` names the model; ``span`` says which layers this is."""

    def __init__(
        self,
        model: PreTrainedModel,
        config: PretrainedConfig,
        span_config: PretrainedConfig,
        structure: ModelStructure,
        span: LayerSpan,
        manifest: Manifest,
        device: torch.device,
        dtype: torch.dtype,
        directory: Path | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.span_config = span_config
        self.structure = structure
        self.span = span
        self.manifest = manifest
        self.device = device
        self.dtype = dtype
        self.directory = directory  # the checkpoint it was loaded from: its tokenizer serves grammars
        self.base: nn.Module = getattr(model, structure.base_prefix)
        self._attention_lock = threading.Lock()
        # Every config object the span's modules read their attention implementation from (the model's and the
        # span's), found once: walking the modules costs a millisecond, every pass.
        self._configs: list[Any] = list(
            {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values()
        )
        # Whether steps can run packed (worker.batching): every attention layer is plain softmax attention, perhaps
        # windowed or soft-capped, none with learned sinks.
        self.packable = not any(hasattr(module, "sinks") for module in model.modules())

    @property
    def root(self) -> str:
        return self.manifest.root

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def vocabulary(self) -> Vocabulary:
        """The checkpoint's tokenizer as grammars see it; raises ValueError when it has none that can."""
        if self.directory is None:
            raise ValueError("this span was not loaded from a checkpoint directory, so it has no tokenizer")
        try:
            return vocabulary_at(self.directory, self.vocab_size)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"the checkpoint's tokenizer cannot serve grammars: {exc}"[:500]) from exc

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.span_config)

    def new_kv(self, capacity: int) -> SessionKV:
        """Buffers for a session's keys and values, of at most ``capacity`` positions, for packed steps."""
        return SessionKV(len(self.span), capacity, self.device, self.dtype)

    @property
    def kv_bytes_per_position(self) -> int:
        """What one position of a session's keys and values takes over the span's layers."""
        config = self.config
        heads = int(getattr(config, "num_attention_heads", 0) or config.n_head)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or self.hidden_size // heads)
        return 2 * len(self.span) * kv_heads * head_dim * torch.empty((), dtype=self.dtype).element_size()

    @torch.inference_mode()
    def forward_packed(self, rows: Sequence[tuple[SessionKV, int, torch.Tensor]]) -> list[torch.Tensor]:
        """Runs the span once over many sessions' new positions: each row is a session's buffers, the positions
        it already holds, and its new input, token ids (1, n) on the first span and hidden states (1, n, hidden)
        on the others. Returns each row's output: hidden states (1, n, hidden), or on the last span its last
        position's logits (1, 1, vocab)."""
        packed, offset = [], 0
        for kv, past, inputs in rows:
            count = int(inputs.shape[1])
            packed.append(PackedRow(kv, past, count, offset))
            offset += count
        position_ids = torch.cat(
            [torch.arange(row.past, row.past + row.count, device=self.device) for row in packed]
        ).unsqueeze(0)
        joined = torch.cat([inputs for _, _, inputs in rows], dim=1) if len(rows) > 1 else rows[0][2]
        model_inputs: dict[str, torch.Tensor] = (
            {"input_ids": joined.to(self.device)}
            if self.span.first
            else {"inputs_embeds": joined.to(self.device, self.dtype)}
        )
        batch = PackedBatch(packed)
        with self._attention(ATTENTION), active(batch):
            if self.span.last:
                ends = torch.tensor([row.offset + row.count - 1 for row in packed], device=self.device)
                logits = self.model(
                    **model_inputs,
                    position_ids=position_ids,
                    cache=batch,
                    use_cache=True,
                    logits_to_keep=ends,
                ).logits
                return [logits[:, i : i + 1] for i in range(len(packed))]
            hidden = self.base(**model_inputs, position_ids=position_ids, cache=batch, use_cache=True)
            return [hidden.last_hidden_state[:, row.offset : row.offset + row.count] for row in packed]

    @contextmanager
    def _attention(self, implementation: str) -> Iterator[None]:
        """Runs the span's layers with ``implementation`` for the duration; one forward at a time on a shard."""
        with self._attention_lock:
            saved = [config._attn_implementation for config in self._configs]
            for config in self._configs:
                config._attn_implementation = implementation
            try:
                yield
            finally:
                for config, before in zip(self._configs, saved, strict=True):
                    config._attn_implementation = before

    @torch.inference_mode()
    def forward(
        self,
        *,
        cache: DynamicCache,
        input_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Runs the span over new positions, appending to ``cache``.

        The first span takes ``input_ids`` (batch, seq); the others take ``hidden`` (batch, seq, hidden). The
        last span returns logits: (batch, seq, vocab) when ``all_logits``, else only the last position's
        (batch, 1, vocab). Other spans return hidden states (batch, seq, hidden).
        """
        if (input_ids is None) == (hidden is None) or (input_ids is not None) != self.span.first:
            raise ValueError("the first span takes input_ids and every other span takes hidden states")
        with self._attention_lock:  # never while forward_packed has the layers on packed attention
            return self._forward(cache, input_ids, hidden, all_logits)

    def _forward(
        self,
        cache: DynamicCache,
        input_ids: torch.Tensor | None,
        hidden: torch.Tensor | None,
        all_logits: bool,
    ) -> torch.Tensor:
        past = cache.get_seq_length()
        seq = int((input_ids if input_ids is not None else hidden).shape[1])  # type: ignore[union-attr]
        position_ids = torch.arange(past, past + seq, device=self.device).unsqueeze(0)
        inputs: dict[str, torch.Tensor] = (
            {"input_ids": input_ids.to(self.device)}
            if input_ids is not None
            else {"inputs_embeds": hidden.to(self.device, self.dtype)}  # type: ignore[union-attr]
        )
        if self.span.last:
            output = self.model(
                **inputs,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                logits_to_keep=0 if all_logits else 1,
            )
            return output.logits
        output = self.base(**inputs, position_ids=position_ids, cache=cache, use_cache=True)
        return output.last_hidden_state


def _span_config(config: PretrainedConfig, span: LayerSpan) -> PretrainedConfig:
    span_config = copy.deepcopy(config)
    span_config.num_hidden_layers = len(span)
    if getattr(config, "layer_types", None) is not None:
        span_config.layer_types = list(config.layer_types[span.start : span.end])
    return span_config


def _cut_to_span(
    model: PreTrainedModel, structure: ModelStructure, span: LayerSpan, span_config: PretrainedConfig
) -> None:
    base = getattr(model, structure.base_prefix)
    layers_attr = structure.layers_prefix.split(".")[-1]
    kept = nn.ModuleList(list(getattr(base, layers_attr))[span.start : span.end])
    for local, layer in enumerate(kept):
        # The KV cache is the span's own, indexed from zero. Layers were built with their global index, so
        # per-index structure (sliding windows, which layers are MoE) is already right.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                setattr(module, "layer_idx", local)  # noqa: B010 - modules declare it untyped
    setattr(base, layers_attr, kept)
    base.config = span_config
    if not span.first:
        for prefix in structure.embedding_prefixes:
            attr = prefix.split(".")[-1]
            if prefix.endswith(".wpe"):
                setattr(base, attr, _NoPositions(int(span_config.hidden_size)))
            else:
                setattr(base, attr, None)
    if not span.last:
        setattr(base, structure.final_norm_prefix.split(".")[-1], nn.Identity())
        model.set_output_embeddings(nn.Identity())


def _local_name(model_name: str, structure: ModelStructure, span: LayerSpan) -> str:
    layer = structure.layer_of(model_name)
    if layer is None:
        return model_name
    return structure.layer_prefix(layer - span.start) + model_name.removeprefix(structure.layer_prefix(layer))


def load_shard(
    directory: Path,
    span_text: str | None = None,
    *,
    span: LayerSpan | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    manifest_path: Path | None = None,
) -> Shard:
    """Loads layers ``span`` (or the span written ``"A:B"``) of the checkpoint in ``directory``."""
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    with Checkpoint(directory) as checkpoint:
        config = checkpoint.config()
        structure = discover(config)
        if span is None:
            span = LayerSpan.parse(span_text or f"0:{structure.num_layers}", structure.num_layers)
        model = build_on_meta(config)
        names = TensorNames(checkpoint, structure)
        manifest = load_manifest(checkpoint, names, config, manifest_path)

        span_config = _span_config(config, span)
        _cut_to_span(model, structure, span, span_config)

        wanted: list[str] = [name for layer in range(span.start, span.end) for name in names.layers[layer]]
        if span.first:
            wanted += names.embedding
        if span.last:
            wanted += names.head
        state = {
            _local_name(names.canonical[name], structure, span): tensor.to(device)
            for name, tensor in checkpoint.tensors(wanted)
        }
        head_weight = f"{structure.head_prefix}.weight"
        if span.last and structure.tied_head and head_weight not in state:
            state[head_weight] = checkpoint.tensor(_token_embedding(names)).to(device)

        for layer in range(span.start, span.end):
            if layer_hash(checkpoint, names, layer) != manifest.layers[layer]:
                raise ModelIdentityError(f"layer {layer} in {directory} does not match model {manifest.root}")
        if span.first and group_hash(checkpoint, names, names.embedding) != manifest.embedding:
            raise ModelIdentityError(f"the embeddings in {directory} do not match model {manifest.root}")
        if span.last and group_hash(checkpoint, names, names.head) != manifest.head:
            raise ModelIdentityError(
                f"the final norm or head in {directory} do not match model {manifest.root}"
            )

    # A tied head shares the embedding's weight; on a span that is not first there is no embedding to tie to.
    model.config.tie_word_embeddings = False
    _load_state(model, state, dtype)
    _materialise_buffers(model, device)
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ModelStructureError(f"span {span} of {directory} lacks tensors: {leftover[:5]}")
    cast(Any, model).to(dtype)  # PreTrainedModel.to's stub takes no dtype
    model.eval()
    if device.type == "cpu" and dtype in PREPACKED_DTYPES and torch.backends.mkldnn.is_available():
        _prepack_linears(model)
    return Shard(model, config, span_config, structure, span, manifest, device, dtype, Path(directory))


# Dtypes whose linear layers oneDNN runs from prepacked weights on CPU.
PREPACKED_DTYPES = (torch.float32, torch.bfloat16)


class PrepackedLinear(nn.Module):
    """A linear layer that runs on oneDNN from a copy of its weight reordered once for oneDNN's kernels.

    On CPU the BLAS path (``F.linear``) is slower than it need be at a decode step's few rows: here it takes twice
    the time to read a weight for 2 to 32 rows as for 1, and 1.8 times what oneDNN takes for 1; prepacked,
    oneDNN reads it at memory speed for one row and takes 2 times as long for 16 rows, not 3. Packing happens at
    the first forward pass, after anything that changes weights at load (the testing cheats do); the
    checkpoint's weight is then dropped, leaving a meta tensor with its shape and dtype for code that reads them.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed: torch.Tensor | None = None
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            with self._lock:
                if self._packed is None:
                    self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
                    self.weight = nn.Parameter(self.weight.detach().to("meta"), requires_grad=False)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


def _prepack_linears(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PrepackedLinear(child))


def _token_embedding(names: TensorNames) -> str:
    """The checkpoint name of the token embedding's weight, which a tied head reuses."""
    wanted = names.structure.token_embedding_prefix + ".weight"
    for name in names.embedding:
        if names.canonical[name] == wanted:
            return name
    raise CheckpointError(
        "the head is tied to the token embedding, but the checkpoint has no token embedding"
    )


def _load_state(model: PreTrainedModel, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Loads checkpoint-named tensors into the span, through the family's own checkpoint-to-module conversions
    (renamings, fused or split matrices) as transformers applies them in ``from_pretrained``."""
    config = LoadStateDictConfig(dtype=dtype, weight_mapping=cast(Any, get_model_conversion_mapping(model)))
    info, _ = convert_and_load_state_dict_in_model(model, state, config)
    if info.mismatched_keys or info.error_msgs or info.conversion_errors:
        raise CheckpointError(
            f"tensors do not fit the model: {sorted(info.mismatched_keys)[:5]} {info.error_msgs[:3]} "
            f"{list(info.conversion_errors)[:3]}"
        )


def _materialise_buffers(model: PreTrainedModel, device: torch.device) -> None:
    """Computed buffers (rotary frequencies, embedding scales) are not in checkpoints: build them for real."""
    for module in model.modules():
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            # _init_weights initialises a module's parameters along with its buffers (Gemma's scaled embedding
            # has both): keep the loaded parameters.
            loaded = {name: p.detach().clone() for name, p in module.named_parameters(recurse=False)}
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)
            with torch.no_grad():
                for name, value in loaded.items():
                    getattr(module, name).copy_(value)
    leftover = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if leftover:
        raise ModelStructureError(f"buffers that could not be built: {leftover[:5]}")
