"""LocalGlobalAttention: GQA self-attention, sliding-window or global per layer, RoPE only.

Legend: B batch, T time, D model width, H query heads, K kv heads, E head dim, S cache slots.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor

from fusiontree.models.config import ModelConfig
from fusiontree.models.cache import AttentionLayerCache, SeqInfo
from fusiontree.models.layers import PackedProjections
from fusiontree.models.positions import RotaryPositionalEmbedding
from fusiontree.ops import Kernels


class LocalGlobalAttention(PackedProjections):
    packable = ("wq", "wk", "wv")

    def __init__(self, cfg: ModelConfig, layer_idx: int, kernels: Kernels):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.attn_head_dim
        self.window = cfg.layer_window(layer_idx)  # None: global
        self.kernels = kernels
        # A plain attribute of the module, so that compiled code is guarded on it: a branch on
        # the kernel field itself goes unguarded when the call it leads to breaks the graph, and
        # a compiled decode step of a model with the other decode path would then reuse it.
        self.decode_filled_blocks = kernels.decode_attention is not None
        d = cfg.d_model
        self.wq = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.rope = RotaryPositionalEmbedding(self.head_dim, cfg.rope_theta)
        self.init_std = cfg.init_std

    @property
    def is_global(self) -> bool:
        return self.window is None

    def init_weights(self) -> None:
        for lin in (self.wq, self.wk, self.wv, self.wo):
            nn.init.normal_(lin.weight, std=self.init_std)

    def allocate_inference_cache(self, batch_size: int, max_length: int, dtype: torch.dtype,
                                 device: torch.device) -> AttentionLayerCache:
        slots = max_length if self.is_global else min(self.window, max_length)
        shape = (batch_size, slots, self.n_kv_heads, self.head_dim)
        return AttentionLayerCache(
            k_BSKD=torch.zeros(shape, dtype=dtype, device=device),
            v_BSKD=torch.zeros(shape, dtype=dtype, device=device),
            pos_BS=torch.full((batch_size, slots), -1, dtype=torch.long, device=device),
            ring=not self.is_global)

    def forward(self, x_BTD: Tensor, info: SeqInfo, cache: AttentionLayerCache | None = None) -> Tensor:
        q, k, v = self.project(x_BTD)
        q = rearrange(q, "b t (h e) -> b t h e", e=self.head_dim)
        k = rearrange(k, "b t (k e) -> b t k e", e=self.head_dim)
        v = rearrange(v, "b t (k e) -> b t k e", e=self.head_dim)
        q, k = self.rope(q, k, info.position_ids, info.position_ids)
        k_pos = info.key_pos
        k_all, v_all, pos_all = k, v, k_pos
        if cache is not None and info.cache_step is not None:
            # Static-shape decode step (CUDA graphs): the new token goes into its slot first,
            # then the query attends over the slots by position (empty slots hold -1). With
            # one query per row, where its own key sits among the slots does not matter.
            cache.write_step(k, v, k_pos, info.cache_step)
            k_all, v_all, pos_all = cache.k_BSKD, cache.v_BSKD, cache.pos_BS
            if self.decode_filled_blocks:  # filled slots only
                o = self.kernels.decode_attention(q, k_all.to(q.dtype), v_all.to(q.dtype), info.position_ids,
                                                  pos_all, cache.filled_slots(info.cache_step), window=self.window)
                return self.wo(rearrange(o, "b t h e -> b t (h e)"))
        elif cache is not None:
            ck, cv, cpos = cache.context(info.cache_offset)
            if ck.shape[1]:  # an empty cache adds nothing: the prefill takes the cache-free kernels
                k_all, v_all = torch.cat([ck, k.to(ck.dtype)], 1), torch.cat([cv, v.to(cv.dtype)], 1)
                pos_all = torch.cat([cpos, k_pos], 1)
            # The cache is written after reading it: the new keys are already in k_all.
            cache.write(k, v, k_pos, info.cache_offset)
        masks = {} if info.attn_masks is None else {"block_masks": info.attn_masks}
        o = self.kernels.attention(q, k_all.to(q.dtype), v_all.to(q.dtype), info.position_ids, pos_all,
                                   window=self.window, q_seq_BT=info.seq_idx, k_seq_BS=info.seq_idx, **masks)
        return self.wo(rearrange(o, "b t h e -> b t (h e)"))

    # A decode step is the same computation with T = 1; the cache keeps it O(window) per token.
    step = forward

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token at training length `seq_len`: projections plus QK^T and PV,
        with each query counted against the keys it actually sees (up to its window)."""
        d = self.wq.in_features
        proj = 2 * d * (2 * self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        if self.window is None:
            keys = (seq_len + 1) / 2
        else:
            w = min(self.window, seq_len)
            keys = (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
        return int(proj + 4 * self.n_heads * self.head_dim * keys)
