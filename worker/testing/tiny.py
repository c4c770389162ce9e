"""Small deterministic checkpoints, built locally, for tests and demos where no model hub can be reached.

Weights are the model's own random initialisation under a fixed seed; the tokenizer is byte-level (256 byte
tokens and three specials), saved with the weights so the directory loads like any Hugging Face checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt2", "mixtral", "qwen2_moe")
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
BOS, EOS, PAD = 256, 257, 258


# Each message as ``<|role|>\ncontent\n`` after the BOS token, then ``<|assistant|>\n``. With tools, a system turn
# lists them as JSON first, and an assistant's calls are ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``:
# the Hermes format, which the gateway's tool-call parser reads.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    '{% if tools %}<|system|>\nTo call a tool, answer <tool_call>{"name": ..., "arguments": {...}}</tool_call>.'
    " Tools:{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}{% endif %}"
    "{% for message in messages %}<|{{ message.role }}|>{{ '\\n' }}{{ message.content or '' }}"
    "{% for call in message.tool_calls or [] %}<tool_call>"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps each byte to a printable character; give them ids 0..255 in byte order.
    ordered = sorted(byte_to_unicode, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(ordered)}
    vocab.update({token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[2],
        chat_template=CHAT_TEMPLATE,
    )


def _byte_of(char: str) -> int:
    """The byte GPT-2's byte-level alphabet maps to ``char``."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    if ord(char) in printable:
        return ord(char)
    missing = [b for b in range(256) if b not in printable]
    return missing[ord(char) - 256]


def tiny_config(arch: str, *, layers: int, hidden: int, vocab: int = VOCAB_SIZE) -> Any:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if hidden % 64 != 0 or hidden <= 0:
        raise ValueError(f"hidden size must be a positive multiple of 64, got {hidden}")
    if layers <= 0:
        raise ValueError(f"a model needs at least one layer, got {layers}")
    if vocab < VOCAB_SIZE:
        raise ValueError(f"the byte tokenizer needs a vocabulary of at least {VOCAB_SIZE}, got {vocab}")
    heads = hidden // 64
    common: dict[str, Any] = {
        "vocab_size": vocab,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
    }
    if arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_layer=layers, n_embd=hidden, n_head=heads, n_positions=1024, **common
        )
    kwargs: dict[str, Any] = {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": hidden * 3,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 2048,
        "tie_word_embeddings": arch == "gemma2",
        **common,
    }
    if arch in ("qwen3", "gemma2"):
        kwargs["head_dim"] = 64
    if arch == "gemma2":
        kwargs["sliding_window"] = 16  # small, so tests run both kinds of attention layers over real windows
    if arch == "mixtral":
        kwargs.update(num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        kwargs.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden,
            shared_expert_intermediate_size=hidden,
        )
    return AutoConfig.for_model(arch, **kwargs)


def write_tiny_checkpoint(
    out: Path,
    *,
    arch: str = "llama",
    layers: int = 8,
    hidden: int = 256,
    seed: int = 0,
    vocab: int = VOCAB_SIZE,
) -> Path:
    """A randomly initialised checkpoint with the byte tokenizer; ``vocab`` above its 259 tokens sizes the
    embeddings and logits like a real model's, the extra ids having no text."""
    config = tiny_config(arch, layers=layers, hidden=hidden, vocab=vocab)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out
