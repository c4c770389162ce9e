"""Many sessions' steps in one forward pass over a span: continuous batching at the iteration level.

A provider gathers the steps that arrive while a forward pass runs and runs them together in the next one
(:class:`worker.runtime.SpanRuntime.run_batch`). Their new positions are packed into one sequence, one after
another: a decode step adds one position, a prefill chunk many. Every matrix multiplication of the span (the
projections, the MLP or the experts, the norms, the head) then runs once over the whole batch, where one token
at a time would read every weight for each session. Only attention is per session: each session's queries
attend to its own keys and values, which it keeps in place in buffers of its own (:class:`SessionKV`). A step
writes its new positions at the end of them and attention reads a view, so no session's cache is ever copied,
padded or gathered to be batched.

The model's own code runs the span: its layers call ``update`` on the cache object they are given
(:class:`PackedBatch`, which writes each session's new keys and values into that session's buffers) and call
the attention function the config names, here :func:`packed_attention`, registered with transformers'
``AttentionInterface``. Each family keeps its own projections, rotary or learned positions, norms, sliding
windows, logit soft-capping and MoE routing. The name is not a mask function, so the model builds no mask:
this module's attention knows each session's causal (and sliding) window itself.

Why not ``transformers.generation.continuous_batching``: it schedules whole generations (its own requests,
sampler and paged cache allocator), not a span's steps arriving from the network with hidden states for inputs;
and where no flash kernel reads pages in place (every CPU), its ``PagedAttentionCache.update`` gathers every
request's whole cache into one tensor per layer per step, a copy that costs more here than batching saves.

A session's packed result is its unbatched result up to float rounding: the same weights multiply the same rows,
but a matrix product over many rows may sum in another order. Greedy tokens agree; hidden states agree within
the validator's tolerance, and validators re-execute a hop on its own with the model's stock attention
(:meth:`worker.shard.Shard.forward`), so their verdict never depends on who else was in a batch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION = "strata_packed"


class SessionKV:
    """One session's keys and values for every layer of a span, each layer's in a buffer of its own that grows
    (doubling, up to ``capacity`` positions) as the session does. A layer's buffers are allocated when the model
    first writes to them, in the shapes its attention produces (a family may give values another head size)."""

    def __init__(self, layers: int, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.capacity = capacity
        self.device = device
        self.dtype = dtype
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, at: int) -> None:
        """Stores (kv_heads, n, head_dim) keys and values at positions ``at`` to ``at + n``."""
        end = at + int(keys.shape[1])
        self.keys[layer] = self._room(self.keys[layer], keys, end)
        self.values[layer] = self._room(self.values[layer], values, end)
        self.keys[layer][:, at:end] = keys  # type: ignore[index]
        self.values[layer][:, at:end] = values  # type: ignore[index]

    def _room(self, buffer: torch.Tensor | None, new: torch.Tensor, end: int) -> torch.Tensor:
        held = 0 if buffer is None else int(buffer.shape[1])
        if end <= held:
            return buffer  # type: ignore[return-value]
        size = min(self.capacity, max(end, 2 * held, 64))
        grown = torch.empty((new.shape[0], size, new.shape[2]), device=self.device, dtype=self.dtype)
        if buffer is not None:
            grown[:, :held] = buffer
        return grown

    def view(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at positions ``start`` to ``end`` of ``layer``, as (1, kv_heads, end - start, dim)."""
        keys, values = self.keys[layer], self.values[layer]
        assert keys is not None and values is not None
        return keys[None, :, start:end], values[None, :, start:end]


@dataclass(frozen=True)
class PackedRow:
    """One session's part of a batch: ``count`` new positions after its ``past`` ones, at ``offset`` in the packed
    sequence."""

    kv: SessionKV
    past: int
    count: int
    offset: int


class PackedBatch:
    """Stands in for the model's cache during one forward pass over a batch: the layers hand it each layer's new
    keys and values for the whole packed sequence, and it writes each session's into that session's buffers."""

    def __init__(self, rows: Sequence[PackedRow]) -> None:
        self.rows = rows

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for row in self.rows:
            part = slice(row.offset, row.offset + row.count)
            row.kv.write(layer_idx, key_states[0, :, part], value_states[0, :, part], row.past)
        return key_states, value_states  # unread: packed_attention reads each session's own buffers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise RuntimeError("a packed batch has no single length: pass position_ids")


_active = threading.local()


@contextmanager
def active(batch: PackedBatch) -> Iterator[None]:
    """Makes ``batch`` the one :func:`packed_attention` reads on this thread for the duration."""
    _active.batch = batch
    try:
        yield
    finally:
        _active.batch = None


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, heads, packed positions, head_dim)
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """Each session's queries against its own keys and values: causal, within the layer's sliding window if it
    has one, soft-capped if the family caps. Returns (1, packed positions, heads, head_dim)."""
    batch: PackedBatch | None = getattr(_active, "batch", None)
    if batch is None:
        raise RuntimeError("packed attention runs only inside a packed batch")
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    outputs = []
    for row in batch.rows:
        end = row.past + row.count
        start = 0 if sliding_window is None else max(0, row.past + 1 - sliding_window)
        keys, values = row.kv.view(layer, start, end)
        q = query[:, :, row.offset : row.offset + row.count]
        mask = None
        if row.count > 1:  # one new position sees all of its view: it needs no mask
            queries = torch.arange(row.past, end, device=q.device)[:, None]
            seen = torch.arange(start, end, device=q.device)[None, :]
            mask = seen <= queries
            if sliding_window is not None:
                mask &= seen > queries - sliding_window
        if softcap is None:
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True
            )
        else:
            out = _capped_attention(q, keys, values, mask, scaling, softcap)
        outputs.append(out)
    packed = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return packed.transpose(1, 2).contiguous(), None


def _capped_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float,
) -> torch.Tensor:
    groups = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    scores = q @ keys.transpose(2, 3) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return weights @ values


AttentionInterface.register(ATTENTION, packed_attention)
