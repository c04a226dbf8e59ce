"""Typed, preallocated inference caches, updated in place.

Legend: B batch, S cache slots, K kv heads, D head dim, C conv channels, W conv state width
(kernel - 1), H SSM heads, P SSM head dim, N SSM state size.

- Local (sliding-window) attention layers keep a ring buffer of `window` slots: token number
  n (counting from the first token fed to the cache) lives in slot n % window, so the cache
  never grows with the context. Global layers keep `max_length` slots, token n in slot n.
  Each slot remembers the absolute position of its token (-1: empty or padding), and the
  attention op masks by positions, so the slot order does not matter.
- A Mamba layer's state is its conv window (the last kernel-1 inputs) plus the SSM state.

Batches: all rows advance together (one token count for the cache). Prompts of different
lengths are left-padded; padding slots hold position -1 (never attended) and padding
tokens leave the Mamba state untouched (zero input, zero step size), so each row gets
exactly the result it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class AttentionLayerCache:
    k_BSKD: Tensor
    v_BSKD: Tensor
    pos_BS: Tensor  # int64 absolute position of each slot's token; -1 = empty
    ring: bool

    @property
    def slots(self) -> int:
        return self.k_BSKD.shape[1]

    def context(self, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values and positions of the slots that may hold tokens after `offset` tokens
        (none before the first token: a prefill into an empty cache attends to itself only)."""
        n = min(self.slots, offset)
        return self.k_BSKD[:, :n], self.v_BSKD[:, :n], self.pos_BS[:, :n]

    def write(self, k_BTKD: Tensor, v_BTKD: Tensor, pos_BT: Tensor, offset: int) -> None:
        """Store T new tokens, numbered offset .. offset+T-1."""
        T = k_BTKD.shape[1]
        if self.ring:
            if T > self.slots:  # only the last `slots` tokens can ever be attended again
                k_BTKD, v_BTKD, pos_BT = (t[:, T - self.slots:] for t in (k_BTKD, v_BTKD, pos_BT))
                offset, T = offset + T - self.slots, self.slots
            idx = torch.arange(offset, offset + T, device=self.k_BSKD.device) % self.slots
        else:
            if offset + T > self.slots:
                raise ValueError(f"the global-attention KV cache holds {self.slots} tokens; "
                                 f"writing {T} more after {offset} overflows it. Allocate the "
                                 "cache with a larger max_length (prompt + new tokens)")
            idx = torch.arange(offset, offset + T, device=self.k_BSKD.device)
        self.k_BSKD.index_copy_(1, idx, k_BTKD.to(self.k_BSKD.dtype))
        self.v_BSKD.index_copy_(1, idx, v_BTKD.to(self.v_BSKD.dtype))
        self.pos_BS.index_copy_(1, idx, pos_BT)

    def write_step(self, k_B1KD: Tensor, v_B1KD: Tensor, pos_B1: Tensor, step_1: Tensor) -> None:
        """Store one new token per row at token number `step_1` (a [1] device tensor), without
        a host-side count: the static-shape decode step (`HybridLanguageModel.decode_step`).
        The caller keeps the count within the cache (global layers hold `slots` tokens)."""
        idx = step_1 % self.slots if self.ring else step_1
        self.k_BSKD.index_copy_(1, idx, k_B1KD.to(self.k_BSKD.dtype))
        self.v_BSKD.index_copy_(1, idx, v_B1KD.to(self.v_BSKD.dtype))
        self.pos_BS.index_copy_(1, idx, pos_B1)

    def filled_slots(self, step_1: Tensor) -> Tensor:
        """[1] device tensor: how many slots, from slot 0, may hold tokens once token number
        `step_1` is in (a ring buffer fills up and then wraps; a global cache fills in order).
        The slots past it are empty, so the static decode step need not read them."""
        return torch.clamp(step_1 + 1, max=self.slots)

    def tensors(self) -> list[Tensor]:
        return [self.k_BSKD, self.v_BSKD, self.pos_BS]

    def nbytes(self) -> int:
        return _nbytes(self.tensors())


@dataclass
class MambaLayerState:
    conv_BCW: Tensor
    ssm_BHPN: Tensor  # fp32

    def tensors(self) -> list[Tensor]:
        return [self.conv_BCW, self.ssm_BHPN]

    def nbytes(self) -> int:
        return _nbytes(self.tensors())


class _PerLayer:
    """Shared by the whole-model caches: `layers` holds one cache per layer, or None."""

    def tensors(self) -> list[Tensor]:
        """Every tensor of every layer's cache (what a snapshot must copy)."""
        return [t for c in self.layers if c is not None for t in c.tensors()]

    def nbytes(self) -> int:
        return _nbytes(self.tensors())


@dataclass
class KVCache(_PerLayer):
    """Attention caches of every layer (None where a layer has no attention branch)."""
    layers: list[AttentionLayerCache | None]
    batch_size: int
    max_length: int
    seen_tokens: int = 0


@dataclass
class MambaStates(_PerLayer):
    """Mamba states of every layer (None where a layer has no Mamba branch)."""
    layers: list[MambaLayerState | None]
    batch_size: int
    seen_tokens: int = 0


@dataclass
class SeqInfo:
    """Per-forward metadata shared by every layer.

    position_ids: [B, T] absolute positions (RoPE, SRTE, window masks)
    key_pos:      [B, T] position_ids with padding set to -1 (keys never attended)
    token_mask:   [B, T] bool, False on padding (None: no padding)
    seq_idx:      [B, T] int document index of packed sequences (None: one document per row)
    cache_offset: tokens already in the caches before this forward
    cache_step:   [1] int64 device tensor of that count, set only by the static-shape decode
                  step (`HybridLanguageModel.decode_step`), which must not read host ints
    cached:       this forward reads or writes caches (blocks then run eagerly: the training
                  mechanics of `fusiontree.train.mechanics` apply to cache-free calls only)
    attn_masks:   the attention backend's masks for this forward (`Kernels.attention_masks`),
                  built once and read by every attention layer; None: each call builds its own
    """
    position_ids: Tensor
    key_pos: Tensor
    token_mask: Tensor | None = None
    seq_idx: Tensor | None = None
    cache_offset: int = 0
    cache_step: Tensor | None = None
    cached: bool = False
    attn_masks: object | None = None
