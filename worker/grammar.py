"""Constrained decoding: which tokens a grammar allows next, for the last provider's sampler and for the
validator that checks it.

A grammar is llguidance's JSON grammar text (one or more JSON schemas, Lark or regular expressions). The gateway
builds it from the request (``response_format``, a forced tool call), checks it against the model's tokenizer
before anything is paid, and sends it to the last provider as part of the sampling parameters its receipt commits
to. The last provider masks every token the grammar does not allow before sampling (``worker.sampling``); the
validator replays the same matcher over the emitted tokens, so a token outside the mask is a wrong token.

llguidance rather than xgrammar or outlines-core: it installs as one wheel with no dependencies (xgrammar pulls
triton, outlines-core builds its index per schema ahead of time), computes a mask in tens of microseconds
without precomputation, and reads Hugging Face fast tokenizers directly.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = ["Matcher", "Vocabulary", "json_grammar", "vocabulary_at"]

# Compact JSON: a model that may put any whitespace between tokens can spend a whole generation on it.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The grammar of JSON text following ``schema``; any JSON object when None (``json_object``)."""
    document = {"type": "object"} if schema is None else schema
    document = {**document, "x-guidance": JSON_OPTIONS}
    return json.dumps({"grammars": [{"json_schema": document}]}, separators=(",", ":"), sort_keys=True)


class Matcher:
    """One generation's position in a grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """A (vocab_size,) bool tensor: True for each token the grammar allows next."""
        packed = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(packed, bitorder="little")[:vocab_size].astype(bool)
        if bits.size < vocab_size:  # ids past the tokenizer's vocabulary have no text: never allowed
            bits = np.concatenate([bits, np.zeros(vocab_size - bits.size, dtype=bool)])
        return torch.from_numpy(bits)

    def consume(self, token: int) -> None:
        """Advances past ``token``; a token the grammar does not allow leaves the matcher in error, after which
        it allows nothing (so a sampler fed a forbidden token refuses to go on)."""
        self._matcher.consume_token(token)


class Vocabulary:
    """A model's tokenizer as the grammar library sees it: built once per model, then cheap per request."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise ValueError("constrained decoding needs a fast (Rust) tokenizer")
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        # Compiling a large schema takes up to a second: the same one, sent again, is answered from here.
        self.check = functools.lru_cache(maxsize=256)(self._check)

    def _check(self, grammar: str) -> str | None:
        """Why ``grammar`` cannot be used with this tokenizer, or None when it can."""
        matcher = llguidance.LLMatcher(self._tokenizer, grammar)
        return matcher.get_error() if matcher.is_error() else None

    def token_bytes(self, token: int) -> bytes:
        return bytes(self._tokenizer.decode_bytes([token]))

    def matcher(self, grammar: str) -> Matcher:
        """Raises ValueError on a grammar the library refuses."""
        matcher = llguidance.LLMatcher(self._tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(f"the grammar cannot be used: {matcher.get_error()}"[:500])
        return Matcher(matcher)


@functools.cache
def vocabulary_at(directory: Path, vocab_size: int) -> Vocabulary:
    """The vocabulary of the checkpoint at ``directory`` (its tokenizer files), loaded once per process."""
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return Vocabulary(tokenizer, vocab_size)
