"""HybridBlock: attention and Mamba-2 side by side, fused by a learned gate, then a SwiGLU MLP.

Legend: B batch, T time, D model width.

    h = RMSNorm(x)
    a = RMSNorm_a(LocalGlobalAttention(h))            RoPE inside, no SRTE
    m = RMSNorm_m(Mamba2(h + SRTE(positions)))        SRTE only here
    x = x + g * a + (1 - g) * m                       g = sigmoid(gate logits) in (0, 1)
    x = x + SwiGLU(RMSNorm(x))

Both branches are normalised before the gate, so the gate chooses between them instead of
correcting their scales, and its statistics mean what pruning reads them to mean.
`block="serial"` chains them instead (x += m(x); x += a(x); no gate), for the ablation; a
block with one mixer (the baselines) has no gate.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from fusiontree.models.config import ModelConfig
from fusiontree.models.attention import LocalGlobalAttention
from fusiontree.models.cache import AttentionLayerCache, MambaLayerState, SeqInfo
from fusiontree.models.layers import RMSNorm, SwiGLU
from fusiontree.models.mamba2 import Mamba2Mixer
from fusiontree.models.positions import SRTE
from fusiontree.ops import Kernels

GATE_HIST_BINS = 10


class GateFusion(nn.Module):
    """g in (0, 1): weight of the attention branch (1 - g goes to Mamba).

    `channel`: one learned logit per channel. `token`: that logit plus a low-rank projection
    of the normalised block input (D -> rank -> D), whose up-projection starts at zero so the
    gate starts at the per-channel value."""

    def __init__(self, d_model: int, kind: str, rank: int, init_std: float):
        super().__init__()
        self.kind = kind
        self.bias = nn.Parameter(torch.zeros(d_model))
        if kind == "token":
            self.down = nn.Linear(d_model, rank, bias=False)
            self.up = nn.Linear(rank, d_model, bias=False)
        self.init_std = init_std

    def init_weights(self) -> None:
        nn.init.zeros_(self.bias)
        if self.kind == "token":
            nn.init.normal_(self.down.weight, std=self.init_std)
            nn.init.zeros_(self.up.weight)

    def forward(self, h_BTD: Tensor) -> Tensor:
        """Returns g: [D] for the per-channel gate, [B, T, D] for the per-token gate (fp32)."""
        logits = self.bias.float()
        if self.kind == "token":
            logits = logits + self.up(self.down(h_BTD)).float()
        return torch.sigmoid(logits)

    def flops_per_token(self) -> int:
        return 4 * self.down.in_features * self.down.out_features if self.kind == "token" else 0


def gate_stats(g: Tensor, token_mask: Tensor | None) -> dict[str, Tensor]:
    """Summaries of one layer's gate over the real tokens of a batch (no host sync).

    mean:         mean gate (the weight of attention)
    channel_mean: [D] mean gate per channel
    attn_frac:    fraction of gate values >= 0.5 (attention preferred)
    hist:         [GATE_HIST_BINS] counts of gate values in equal bins over [0, 1]
    A per-channel gate is the same for every token, so it is summarised once, over channels.
    """
    flat = g.detach().float().reshape(-1, g.shape[-1])  # [tokens (or 1), D]
    if g.ndim > 1 and token_mask is not None:
        keep = token_mask.reshape(-1, 1)
        channel_mean = (flat * keep).sum(0) / keep.sum().clamp(min=1)
        flat = flat.masked_fill(~keep, -1.0)  # outside [0, 1]: histc drops padding
    else:
        channel_mean = flat.mean(0)
    hist = torch.histc(flat, bins=GATE_HIST_BINS, min=0.0, max=1.0)
    attn_frac = hist[GATE_HIST_BINS // 2:].sum() / hist.sum().clamp(min=1)
    return {"mean": channel_mean.mean(), "channel_mean": channel_mean, "attn_frac": attn_frac, "hist": hist}


class HybridBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, kernels: Kernels):
        super().__init__()
        d, eps = cfg.d_model, cfg.norm_eps
        self.layer_idx = layer_idx
        self.serial = cfg.block == "serial"
        self.norm_in = RMSNorm(d, eps)
        self.attn = LocalGlobalAttention(cfg, layer_idx, kernels) if cfg.layer_has_attention(layer_idx) else None
        self.mamba = Mamba2Mixer(cfg, layer_idx, kernels) if cfg.layer_has_mamba(layer_idx) else None
        self.norm_attn = RMSNorm(d, eps) if self.attn is not None else None
        self.norm_mamba = RMSNorm(d, eps) if self.mamba is not None else None
        self.srte = SRTE(cfg.srte_dim, d, cfg.srte_max_period) if self.mamba is not None and cfg.srte_dim else None
        self.norm_in2 = RMSNorm(d, eps) if self.serial else None
        # A parallel hybrid block keeps its gate when pruning removed one branch, so the other
        # keeps exactly the weight it had; with both branches gone only the MLP is left.
        gated = not self.serial and cfg.mixer == "hybrid" and (self.attn is not None or self.mamba is not None)
        self.gate = GateFusion(d, cfg.gate, cfg.gate_rank, cfg.init_std) if gated else None
        self.norm_mlp = RMSNorm(d, eps)
        self.mlp = SwiGLU(d, cfg.mlp_hidden_size)
        self.n_layers, self.init_std = cfg.n_layers, cfg.init_std

    def init_weights(self) -> None:
        for m in (self.norm_in, self.norm_attn, self.norm_mamba, self.norm_in2, self.norm_mlp,
                  self.attn, self.mamba, self.srte, self.gate):
            if m is not None:
                m.init_weights()
        self.mlp.init_weights(self.init_std, self.n_layers)

    def allocate_inference_cache(self, batch_size, max_length, dtype, device):
        attn = self.attn.allocate_inference_cache(batch_size, max_length, dtype, device) if self.attn else None
        mamba = self.mamba.allocate_inference_cache(batch_size, max_length, dtype, device) if self.mamba else None
        return attn, mamba

    def _attn(self, h: Tensor, info: SeqInfo, cache: AttentionLayerCache | None) -> Tensor:
        return self.norm_attn(self.attn(h, info, cache))

    def _mamba(self, h: Tensor, info: SeqInfo, state: MambaLayerState | None) -> Tensor:
        u = h if self.srte is None else h + self.srte(info.position_ids, h.dtype)
        return self.norm_mamba(self.mamba(u, info, state))

    def forward(self, x_BTD: Tensor, info: SeqInfo, attn_cache: AttentionLayerCache | None = None,
                mamba_state: MambaLayerState | None = None) -> tuple[Tensor, Tensor | None]:
        """Returns (x, g): the block output and the gate (None when the block has none)."""
        g = None
        h = self.norm_in(x_BTD)
        if self.serial:
            if self.mamba is not None:
                x_BTD = x_BTD + self._mamba(h, info, mamba_state)
            if self.attn is not None:
                x_BTD = x_BTD + self._attn(self.norm_in2(x_BTD), info, attn_cache)
        elif self.gate is not None:
            g = self.gate(h)
            y = 0.0
            if self.attn is not None:
                y = y + g * self._attn(h, info, attn_cache).float()
            if self.mamba is not None:
                y = y + (1 - g) * self._mamba(h, info, mamba_state).float()
            x_BTD = x_BTD + y.to(x_BTD.dtype)
        elif self.attn is not None:
            x_BTD = x_BTD + self._attn(h, info, attn_cache)
        elif self.mamba is not None:
            x_BTD = x_BTD + self._mamba(h, info, mamba_state)
        # else: pruning removed both branches; the block is its MLP
        x_BTD = x_BTD + self.mlp(self.norm_mlp(x_BTD))
        return x_BTD, g

    def flops_per_token(self, seq_len: int) -> int:
        d = self.norm_in.weight.numel()
        total = self.mlp.flops_per_token()
        if self.attn is not None:
            total += self.attn.flops_per_token(seq_len)
        if self.mamba is not None:
            total += self.mamba.flops_per_token(seq_len)
        if self.srte is not None:
            total += 2 * self.srte.proj.in_features * d
        if self.gate is not None:
            total += self.gate.flops_per_token()
        return total
