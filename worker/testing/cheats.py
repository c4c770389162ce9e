"""Providers that cheat, for demonstrations and for the validator's tests and benchmark.

Each kind returns cheap or wrong outputs while the provider signs its transcript exactly as an honest one does:
the hashes always match what it sent, so only re-executing the span can tell. ``strata provider serve --cheat``
(a hidden option) and ``strata up --cheaters N`` use them.

    random         outputs of the right shape and scale, unrelated to the input
    skip-layer     the span's last layer is not run
    other-weights  another model's weights of the same shapes (drawn under another seed, same scale per tensor)
    int8           every weight matrix quantized to int8 per output row, served as if it were the original
    kv-int8        the KV cache quantized to int8 per head and position after every step (saves memory)
    noise          Gaussian noise of 2% of each position's RMS added to the outputs
    noise-0.5      the same at 0.5%, about bf16's own rounding error on a span's outputs
    noise-0.2      the same at 0.2%: in bf16, below what re-execution can tell from rounding
    copy-input     the input handed on as the output (spans between the first and the last only)
    replay         every decode step answers with the previous step's output
    partial        honest, except that every third decode step's output is random
    late-garbage   honest for ten decode steps, random from then on
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from worker.batching import SessionKV
from worker.shard import Shard

CHEATS = (
    "random", "skip-layer", "other-weights", "int8", "kv-int8", "noise", "noise-0.5", "noise-0.2", "copy-input",
    "replay", "partial", "late-garbage",
)  # fmt: skip
# Cheats whose error, served in bf16, is within bf16's own rounding on the tiny test models: re-execution cannot
# tell them from an honest bf16 hop (settlement.validation). In fp32 they are caught like any other.
WITHIN_BF16_ROUNDING = frozenset({"kv-int8", "noise-0.2"})
NOISE = {"noise": 0.02, "noise-0.5": 0.005, "noise-0.2": 0.002}  # of each position's RMS
HONEST_STEPS = 10  # late-garbage's honest decode steps


def make_cheater(shard: Shard, kind: str, *, seed: int = 0, noise: float | None = None) -> Shard:
    """``shard`` turned into a cheat of ``kind``; weight cheats change it in place. ``noise`` sets a noise cheat's
    level (of each position's RMS) other than its kind's."""
    if kind not in CHEATS:
        raise ValueError(f"unknown cheat {kind!r}; choose one of {', '.join(CHEATS)}")
    if kind == "copy-input" and (shard.span.first or shard.span.last):
        raise ValueError("copy-input needs a span that takes and gives hidden states (not the first or last)")
    if kind == "skip-layer":
        _skip_last_layer(shard)
        return shard
    if kind == "other-weights":
        _redraw_weights(shard, seed)
        return shard
    if kind == "int8":
        _quantize_int8(shard)
        return shard
    return _OutputCheat(shard, kind, seed, noise if noise is not None else NOISE.get(kind, 0.0))


class _Skipped(torch.nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def _skip_last_layer(shard: Shard) -> None:
    layers_attr = shard.structure.layers_prefix.split(".")[-1]
    layers = getattr(shard.base, layers_attr)
    layers[len(layers) - 1] = _Skipped()


@torch.no_grad()
def _redraw_weights(shard: Shard, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + 1)
    for parameter in shard.model.parameters():
        if parameter.numel() > 1 and float(parameter.float().std()) > 0:
            drawn = torch.randn(parameter.shape, generator=generator) * parameter.float().std()
            parameter.copy_(drawn.to(parameter.dtype))


@torch.no_grad()
def _quantize_int8(shard: Shard) -> None:
    for parameter in shard.model.parameters():
        if parameter.dim() != 2:
            continue
        weight = parameter.float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        parameter.copy_((torch.round(weight / scale).clamp(-127, 127) * scale).to(parameter.dtype))


class _OutputCheat(Shard):
    """Runs the honest span (so the KV cache stays usable) and then changes what it hands on."""

    def __init__(self, honest: Shard, kind: str, seed: int, noise: float) -> None:
        super().__init__(
            honest.model,
            honest.config,
            honest.span_config,
            honest.structure,
            honest.span,
            honest.manifest,
            honest.device,
            honest.dtype,
        )
        self.kind = kind
        self.noise = noise
        self.generator = torch.Generator().manual_seed(seed)
        # Per session, keyed by its KV cache: steps run so far and the last output.
        self.steps: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.previous: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()

    def forward(
        self,
        *,
        cache: Any,
        input_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        output = super().forward(cache=cache, input_ids=input_ids, hidden=hidden, all_logits=all_logits)
        if self.kind == "kv-int8":
            for layer in cache.layers:
                layer.keys = _fake_int8(layer.keys)
                layer.values = _fake_int8(layer.values)
        return self._cheat(cache, output, hidden)

    def forward_packed(self, rows: Sequence[tuple[SessionKV, int, torch.Tensor]]) -> list[torch.Tensor]:
        outputs = super().forward_packed(rows)
        if self.kind == "kv-int8":
            with torch.inference_mode():  # the buffers were made in it
                self._quantize_buffers(rows)
        hidden = [None if self.span.first else inputs for _, _, inputs in rows]
        return [self._cheat(kv, out, h) for (kv, _, _), out, h in zip(rows, outputs, hidden, strict=True)]

    @staticmethod
    def _quantize_buffers(rows: Sequence[tuple[SessionKV, int, torch.Tensor]]) -> None:
        for kv, past, inputs in rows:
            end = past + int(inputs.shape[1])
            for buffers in (kv.keys, kv.values):
                for buffer in buffers:
                    if buffer is not None:
                        buffer[:, :end] = _fake_int8(buffer[:, :end])

    def _cheat(self, session: Any, output: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """What the cheat hands on for a session's step (``session`` is its cache, or its packed buffers)."""
        step = self.steps.get(session, 0)
        self.steps[session] = step + 1
        previous = self.previous.get(session)
        self.previous[session] = output
        kind = self.kind
        if (
            kind == "random"
            or (kind == "partial" and step % 3 == 2)
            or (kind == "late-garbage" and step > HONEST_STEPS)
        ):
            return self._random_like(output)
        if kind in NOISE:
            drawn = torch.randn(output.shape, generator=self.generator).to(output.device)
            return (output.float() + drawn * self.noise * _rms(output)).to(output.dtype)
        if kind == "copy-input":
            assert hidden is not None
            return hidden.to(output.dtype)
        if kind == "replay" and previous is not None and output.shape[1] == 1:
            return previous[:, -1:].clone()
        return output

    def _random_like(self, output: torch.Tensor) -> torch.Tensor:
        drawn = torch.randn(output.shape, generator=self.generator).to(output.device)
        return (drawn * _rms(output)).to(output.dtype)


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float().pow(2).mean(dim=-1, keepdim=True).sqrt()


def _fake_int8(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` quantized to int8 per row of its last dim and back, in its own dtype."""
    scale = tensor.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
    return (torch.round(tensor.float() / scale).clamp(-127, 127) * scale).to(tensor.dtype)
