"""Where a decoder-only model keeps its parts: embeddings, decoder layers, final norm and LM head.

Nothing here is written per model family. The structure is read off the model class that transformers builds
for the config (on the meta device, so no memory is allocated): the decoder layers are the base model's
``ModuleList`` with ``num_hidden_layers`` entries, the embeddings are its ``nn.Embedding`` children (token and,
for GPT-2, learned positions), the final norm is its one normalisation child, and the head is the model's
output embedding. This covers Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, GPT-2 and the MoE families
(Mixtral, Qwen2-MoE), where each MoE layer, router and experts together, is one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from worker.errors import ModelStructureError


@dataclass(frozen=True)
class ModelStructure:
    model_type: str
    num_layers: int
    base_prefix: str  # the base model's attribute on the causal LM: "model", "transformer"
    layers_prefix: str  # "model.layers", "transformer.h"
    embedding_prefixes: tuple[str, ...]  # "model.embed_tokens"; GPT-2 adds "transformer.wpe"
    token_embedding_prefix: str  # "model.embed_tokens", "transformer.wte"
    final_norm_prefix: str  # "model.norm", "transformer.ln_f"
    head_prefix: str  # "lm_head"
    tied_head: bool  # the head reuses the token embedding's weight

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}."

    def layer_of(self, name: str) -> int | None:
        """The decoder layer a parameter name belongs to, or None for embeddings, norm and head."""
        prefix = self.layers_prefix + "."
        if not name.startswith(prefix):
            return None
        index = name[len(prefix) :].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    def is_embedding(self, name: str) -> bool:
        return any(name.startswith(prefix + ".") for prefix in self.embedding_prefixes)

    def is_head(self, name: str) -> bool:
        return name.startswith(self.final_norm_prefix + ".") or name.startswith(self.head_prefix + ".")


def build_on_meta(config: PretrainedConfig) -> PreTrainedModel:
    """The causal LM for ``config`` with every tensor on the meta device: structure without memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ModelStructureError(f"{type(target).__name__} is not part of {type(root).__name__}")


def discover(config: PretrainedConfig) -> ModelStructure:
    model = build_on_meta(config)
    base_prefix = model.base_model_prefix
    base = getattr(model, base_prefix, None)
    if not isinstance(base, nn.Module):
        raise ModelStructureError(f"{type(model).__name__} has no base model at {base_prefix!r}")
    num_layers = int(config.num_hidden_layers)

    layer_lists = [
        name
        for name, child in base.named_children()
        if isinstance(child, nn.ModuleList) and len(child) == num_layers
    ]
    embeddings = [name for name, child in base.named_children() if isinstance(child, nn.Embedding)]
    norms = [name for name, child in base.named_children() if "norm" in type(child).__name__.lower()]
    head = model.get_output_embeddings()
    if len(layer_lists) != 1 or not embeddings or len(norms) != 1 or not isinstance(head, nn.Module):
        raise ModelStructureError(
            f"cannot find the parts of {type(model).__name__}: decoder layer lists {layer_lists}, "
            f"embeddings {embeddings}, final norms {norms}, head {type(head).__name__}"
        )
    input_embedding = model.get_input_embeddings()
    return ModelStructure(
        model_type=str(config.model_type),
        num_layers=num_layers,
        base_prefix=base_prefix,
        layers_prefix=f"{base_prefix}.{layer_lists[0]}",
        embedding_prefixes=tuple(f"{base_prefix}.{name}" for name in embeddings),
        token_embedding_prefix=_module_name(model, input_embedding),
        final_norm_prefix=f"{base_prefix}.{norms[0]}",
        head_prefix=_module_name(model, head),
        tied_head=isinstance(head, nn.Linear) and head.weight is getattr(input_embedding, "weight", None),
    )
