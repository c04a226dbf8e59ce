"""FusionTree as a transformers model: FusionTreeForCausalLM (PreTrainedModel + GenerationMixin).

Legend: B batch, T new tokens, S keys (cached + new), D hidden size, H query heads, K kv heads,
G = H // K, E attention head dim, Hs SSM heads, P SSM head dim, Gs SSM groups, N SSM state,
C conv channels, W conv state width (kernel - 1), V vocabulary, c chunks, Q chunk length.

This file is copied into every exported model directory and runs with torch and transformers
only. It computes what FusionTree's fp32 reference ops compute (fusiontree/ops/, models/), in
plain PyTorch:

- every block: RMSNorm -> [attention (RoPE on q, k) -> RMSNorm] and [+SRTE -> Mamba-2 (causal
  conv1d, chunked SSD scan, gated RMSNorm) -> RMSNorm] -> gate g*a + (1-g)*m, or the serial
  chain, or one branch -> residual; RMSNorm -> SwiGLU -> residual;
- attention masks are defined on positions, never on tensor lengths: a query at position p sees
  a key at position k iff 0 <= k <= p and, on sliding-window layers, p - k < window (the query
  itself included). Queries are processed in blocks over the keys that can fall in their
  window, so memory stays O(T x (cached keys + window));
- left padding (`attention_mask` zeros first) gives each row exactly the result it would get
  alone: padded keys get position -1 (never seen), padded tokens enter the Mamba branch as zero
  input with zero step size (the state passes through unchanged).

Caches are transformers' own `DynamicCache` layers (built from `config.layer_types`): a hybrid
layer keeps KV (the last window - 1 tokens on sliding layers) and the Mamba conv + SSM state
in one `LinearAttentionAnd*AttentionLayer`. The cache also carries the absolute position of
every token it has seen (`cache.fusiontree_positions`, [B, seen]), so that cached keys are
masked by the positions they were written with.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_fusiontree import FusionTreeConfig

ATTENTION_BLOCK = 256  # queries per block of the attention


# ---------------------------------------------------------------------------------- small layers

class FusionTreeRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class FusionTreeGatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) over groups of `group_size` channels (one group per SSM group)."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        h = y.float() * F.silu(z.float())
        shape = h.shape
        h = h.reshape(*shape[:-1], -1, self.group_size)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h.reshape(shape) * self.weight.float()).to(y.dtype)


class FusionTreeSwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d, hidden, bias=False)
        self.w_up = nn.Linear(d, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def _frequencies(base: float, count: int, denominator: int, device) -> Tensor:
    """base ** (-i / denominator) for i < count, computed in float64 then rounded to float32
    (as FusionTree computes its RoPE and SRTE tables). Computed on the fly: no buffer to
    initialise when transformers builds the model on the meta device."""
    i = torch.arange(count, dtype=torch.float64, device=device)
    return (base ** (-i / denominator)).float()


def apply_rope(x_BTHE: Tensor, pos_BT: Tensor, theta: float) -> Tensor:
    """Rotate the two halves of each head: [x1 cos - x2 sin, x2 cos + x1 sin]."""
    E = x_BTHE.shape[-1]
    inv_freq = _frequencies(theta, E // 2, E // 2, x_BTHE.device)  # theta ** (-2i / E)
    angle = pos_BT.float()[..., None] * inv_freq
    cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]
    x = x_BTHE.float()
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BTHE.dtype)


class FusionTreeSRTE(nn.Module):
    """Sinusoids of the absolute position (sin then cos of p * max_period ** (-i / (dim/2))),
    mixed into the Mamba branch's input by a learned projection."""

    def __init__(self, dim: int, d: int, max_period: float):
        super().__init__()
        self.dim, self.max_period = dim, max_period
        self.proj = nn.Linear(dim, d, bias=False)

    def forward(self, pos_BT: Tensor, dtype: torch.dtype) -> Tensor:
        freq = _frequencies(self.max_period, self.dim // 2, self.dim // 2, pos_BT.device)
        angle = pos_BT.float()[..., None] * freq
        return self.proj(torch.cat([angle.sin(), angle.cos()], dim=-1).to(dtype))


class FusionTreeGate(nn.Module):
    """g in (0, 1), the weight of the attention branch: a logit per channel, plus (per-token
    gate) a low-rank projection of the normalised block input."""

    def __init__(self, d: int, kind: str, rank: int):
        super().__init__()
        self.kind = kind
        self.bias = nn.Parameter(torch.zeros(d))
        if kind == "token":
            self.down = nn.Linear(d, rank, bias=False)
            self.up = nn.Linear(rank, d, bias=False)

    def forward(self, h_BTD: Tensor) -> Tensor:
        logits = self.bias.float()
        if self.kind == "token":
            logits = logits + self.up(self.down(h_BTD)).float()
        return torch.sigmoid(logits)


# ---------------------------------------------------------------------------------- attention

def windowed_attention(q_BTHE: Tensor, k_BSKE: Tensor, v_BSKE: Tensor, q_pos_BT: Tensor, k_pos_BS: Tensor,
                       window: int | None) -> Tensor:
    """Causal (sliding-window) GQA attention masked by positions. The last T keys belong to the
    T queries; the first S - T are cached keys. A query that sees no key (a padding token)
    gets a zero output. Returns [B, T, H, E] in q's dtype."""
    B, T, H, E = q_BTHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    S0, G = S - T, H // K
    q = q_BTHE.float().reshape(B, T, K, G, E).permute(0, 2, 3, 1, 4)  # [B, K, G, T, E]
    k = k_BSKE.float().permute(0, 2, 1, 3)  # [B, K, S, E]
    v = v_BSKE.float().permute(0, 2, 1, 3)
    scale = 1.0 / math.sqrt(E)
    outs = []
    for s in range(0, T, ATTENTION_BLOCK):
        e = min(T, s + ATTENTION_BLOCK)
        # the new keys this block of queries can reach: its window (when positions advance by
        # one per token, as they do inside a row) and nothing after its last query
        lo = S0 if window is None else S0 + max(0, s - window + 1)
        idx = torch.cat([torch.arange(S0, device=k.device), torch.arange(lo, S0 + e, device=k.device)])
        kb, vb, kpos = k[:, :, idx], v[:, :, idx], k_pos_BS[:, idx]
        qpos = q_pos_BT[:, s:e]
        visible = (kpos[:, None, :] >= 0) & (kpos[:, None, :] <= qpos[:, :, None])  # [B, t, s]
        if window is not None:
            visible &= (qpos[:, :, None] - kpos[:, None, :]) < window
        scores = torch.einsum("bkgte,bkse->bkgts", q[:, :, :, s:e], kb) * scale
        visible = visible[:, None, None]
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1) * visible.any(dim=-1, keepdim=True)
        outs.append(torch.einsum("bkgts,bkse->bkgte", probs, vb))
    o = torch.cat(outs, dim=3)  # [B, K, G, T, E]
    return o.permute(0, 3, 1, 2, 4).reshape(B, T, H, E).to(q_BTHE.dtype)


class FusionTreeAttention(nn.Module):
    def __init__(self, config: FusionTreeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        self.window = None if config.layer_is_global(layer_idx) else config.sliding_window
        self.rope_theta = config.rope_theta
        d = config.hidden_size
        self.wq = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x_BTD: Tensor, pos_BT: Tensor, key_pos_BT: Tensor, past_key_pos_BS: Tensor | None,
                cache: Cache | None) -> Tensor:
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, pos_BT, self.rope_theta), apply_rope(k, pos_BT, self.rope_theta)
        k_all, v_all, kpos_all = k, v, key_pos_BT
        if cache is not None:
            # transformers' cache layers hold [B, K, S, E]; a sliding layer returns its last
            # window - 1 cached tokens followed by the new ones, a full layer every token.
            k_c, v_c = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k_all, v_all = k_c.transpose(1, 2), v_c.transpose(1, 2)
            S = k_all.shape[1]
            if S > T:
                kpos_all = torch.cat([past_key_pos_BS, key_pos_BT], dim=1)[:, -S:]
        o = windowed_attention(q, k_all.to(q.dtype), v_all.to(q.dtype), pos_BT, kpos_all, self.window)
        return self.wo(o.reshape(B, T, self.n_heads * self.head_dim))


# ---------------------------------------------------------------------------------- Mamba-2

def _segment_sums(a: Tensor) -> Tensor:
    """a [..., Q] -> [..., Q, Q] with entry (i, j) = a[j+1] + ... + a[i] for i >= j and -inf
    above the diagonal; a masked cumsum, so no large cumulative sums are subtracted."""
    Q = a.shape[-1]
    strictly_below = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(-1)
    sums = a[..., :, None].expand(*a.shape, Q).masked_fill(~strictly_below, 0.0).cumsum(dim=-2)
    return sums.masked_fill(~torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(), float("-inf"))


def ssd_scan(x_BTHP: Tensor, dt_BTH: Tensor, A_H: Tensor, B_BTGN: Tensor, C_BTGN: Tensor, D_H: Tensor,
             chunk: int, state_BHPN: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mamba-2's SSD recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t,
    computed chunk by chunk (quadratic inside a chunk, a recurrence over chunk states between
    chunks), in fp32. Returns (y [B, T, Hs, P] in x's dtype, final state [B, Hs, P, N] fp32)."""
    Bsz, T, H, P = x_BTHP.shape
    G, N = B_BTGN.shape[-2:]
    R = H // G
    x, dt = x_BTHP.float(), dt_BTH.float()
    Bh = B_BTGN.float().repeat_interleave(R, dim=2)  # [B, T, Hs, N]: head h reads group h // R
    Ch = C_BTGN.float().repeat_interleave(R, dim=2)
    pad = (-T) % chunk
    if pad:  # padded steps have dt = 0: no input and no decay
        x, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, Bh, Ch))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = x.shape[1] // chunk
    x = x.reshape(Bsz, c, chunk, H, P)
    Bh, Ch = (t.reshape(Bsz, c, chunk, H, N) for t in (Bh, Ch))
    dt = dt.reshape(Bsz, c, chunk, H).permute(0, 3, 1, 2)  # [B, Hs, c, Q]
    a = dt * A_H.float()[None, :, None, None]
    a_cum = a.cumsum(dim=-1)
    decay = torch.exp(_segment_sums(a))  # [B, Hs, c, Q(i), Q(j)]
    # inside each chunk
    scores = torch.einsum("bcihn,bcjhn->bhcij", Ch, Bh) * decay * dt[..., None, :]
    y = torch.einsum("bhcij,bcjhp->bcihp", scores, x)
    # each chunk's own contribution to the state at its end
    to_end = torch.exp(a_cum[..., -1:] - a_cum) * dt  # [B, Hs, c, Q]
    chunk_states = torch.einsum("bhcj,bcjhn,bcjhp->bchpn", to_end, Bh, x)
    # carry the state across chunks
    h = x.new_zeros(Bsz, H, P, N) if state_BHPN is None else state_BHPN.float()
    chunk_decay = torch.exp(a_cum[..., -1])  # [B, Hs, c]
    entering = []
    for i in range(c):
        entering.append(h)
        h = h * chunk_decay[:, :, i, None, None] + chunk_states[:, i]
    entering = torch.stack(entering, dim=1)  # [B, c, Hs, P, N]
    y = y + torch.einsum("bcihn,bchpn,bhci->bcihp", Ch, entering, torch.exp(a_cum))
    y = y.reshape(Bsz, c * chunk, H, P)[:, :T] + D_H.float()[:, None] * x_BTHP.float()
    return y.to(x_BTHP.dtype), h


class FusionTreeMamba2(nn.Module):
    def __init__(self, config: FusionTreeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d, I = config.hidden_size, config.ssm_inner_size
        self.d_inner, self.n_heads, self.head_dim = I, config.ssm_num_heads, config.ssm_head_dim
        self.n_groups, self.d_state = config.ssm_groups, config.ssm_state_size
        self.chunk_size, self.conv_kernel = config.chunk_size, config.conv_kernel
        self.conv_dim = I + 2 * self.n_groups * self.d_state
        # [z (I) | x (I) | B (Gs N) | C (Gs N) | dt (Hs)]
        self.in_proj = nn.Linear(d, I + self.conv_dim + self.n_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, self.conv_kernel))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.norm = FusionTreeGatedRMSNorm(I, I // self.n_groups, config.rms_norm_eps)
        self.out_proj = nn.Linear(I, d, bias=False)

    def forward(self, u_BTD: Tensor, token_mask_BT: Tensor | None, cache: Cache | None) -> Tensor:
        B, T, _ = u_BTD.shape
        GN, W = self.n_groups * self.d_state, self.conv_kernel - 1
        z, xBC, dt = torch.split(self.in_proj(u_BTD), [self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        if token_mask_BT is not None:
            xBC = xBC * token_mask_BT[..., None].to(xBC.dtype)
        conv_state = cache.get_conv_state(self.layer_idx) if cache is not None else None
        ssm_state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        # causal depthwise conv over [the last W inputs | the T new ones], in fp32
        x_BCT = xBC.transpose(1, 2).float()
        prev = x_BCT.new_zeros(B, self.conv_dim, W) if conv_state is None else conv_state.float()
        xp_BCT = torch.cat([prev, x_BCT], dim=-1)
        conv = F.conv1d(xp_BCT, self.conv_weight.float()[:, None, :], self.conv_bias.float(), groups=self.conv_dim)
        xBC = F.silu(conv).transpose(1, 2).to(xBC.dtype)
        if cache is not None:
            cache.update_conv_state(xp_BCT[..., -W:].to(u_BTD.dtype) if conv_state is None else
                                    x_BCT.to(conv_state.dtype), self.layer_idx, conv_kernel_size=W)
        x, Bm, Cm = torch.split(xBC, [self.d_inner, GN, GN], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if token_mask_BT is not None:
            dt = dt * token_mask_BT[..., None]
        A = -torch.exp(self.A_log.float())
        x_h = x.reshape(B, T, self.n_heads, self.head_dim)
        B_g, C_g = Bm.reshape(B, T, self.n_groups, self.d_state), Cm.reshape(B, T, self.n_groups, self.d_state)
        if T == 1 and ssm_state is not None:
            y, state = self._step(x_h[:, 0], dt[:, 0], A, B_g[:, 0], C_g[:, 0], ssm_state)
            y = y[:, None]
        else:
            y, state = ssd_scan(x_h, dt, A, B_g, C_g, self.D, self.chunk_size, ssm_state)
        if cache is not None:
            cache.update_recurrent_state(state, self.layer_idx)
        y = self.norm(y.reshape(B, T, self.d_inner), z)
        return self.out_proj(y)

    def _step(self, x_BHP, dt_BH, A_H, B_BGN, C_BGN, state_BHPN) -> tuple[Tensor, Tensor]:
        """One token of the recurrence (decoding)."""
        R = self.n_heads // self.n_groups
        Bh, Ch = B_BGN.float().repeat_interleave(R, dim=1), C_BGN.float().repeat_interleave(R, dim=1)
        x = x_BHP.float()
        h = state_BHPN.float() * torch.exp(dt_BH * A_H)[..., None, None] + \
            (dt_BH[..., None] * x)[..., None] * Bh[:, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", h, Ch) + self.D.float()[:, None] * x
        return y.to(x_BHP.dtype), h


# ---------------------------------------------------------------------------------- the block

class FusionTreeBlock(nn.Module):
    def __init__(self, config: FusionTreeConfig, layer_idx: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.serial = config.block == "serial"
        has_attn, has_mamba = config.layer_has_attention(layer_idx), config.layer_has_mamba(layer_idx)
        self.norm_in = FusionTreeRMSNorm(d, eps)
        self.attn = FusionTreeAttention(config, layer_idx) if has_attn else None
        self.mamba = FusionTreeMamba2(config, layer_idx) if has_mamba else None
        self.norm_attn = FusionTreeRMSNorm(d, eps) if has_attn else None
        self.norm_mamba = FusionTreeRMSNorm(d, eps) if has_mamba else None
        self.srte = FusionTreeSRTE(config.srte_dim, d, config.srte_max_period) \
            if has_mamba and config.srte_dim else None
        self.norm_in2 = FusionTreeRMSNorm(d, eps) if self.serial else None
        gated = not self.serial and config.mixer == "hybrid" and (has_attn or has_mamba)
        self.gate = FusionTreeGate(d, config.gate, config.gate_rank) if gated else None
        self.norm_mlp = FusionTreeRMSNorm(d, eps)
        self.mlp = FusionTreeSwiGLU(d, config.intermediate_size)

    def _attn(self, h, pos, key_pos, past_key_pos, cache):
        return self.norm_attn(self.attn(h, pos, key_pos, past_key_pos, cache))

    def _mamba(self, h, pos, token_mask, cache):
        u = h if self.srte is None else h + self.srte(pos, h.dtype)
        return self.norm_mamba(self.mamba(u, token_mask, cache))

    def forward(self, x_BTD: Tensor, pos_BT: Tensor, key_pos_BT: Tensor, past_key_pos_BS: Tensor | None,
                token_mask_BT: Tensor | None, cache: Cache | None) -> Tensor:
        h = self.norm_in(x_BTD)
        if self.serial:
            if self.mamba is not None:
                x_BTD = x_BTD + self._mamba(h, pos_BT, token_mask_BT, cache)
            if self.attn is not None:
                x_BTD = x_BTD + self._attn(self.norm_in2(x_BTD), pos_BT, key_pos_BT, past_key_pos_BS, cache)
        elif self.gate is not None:
            g = self.gate(h)
            y = 0.0
            if self.attn is not None:
                y = y + g * self._attn(h, pos_BT, key_pos_BT, past_key_pos_BS, cache).float()
            if self.mamba is not None:
                y = y + (1 - g) * self._mamba(h, pos_BT, token_mask_BT, cache).float()
            x_BTD = x_BTD + y.to(x_BTD.dtype)
        elif self.attn is not None:
            x_BTD = x_BTD + self._attn(h, pos_BT, key_pos_BT, past_key_pos_BS, cache)
        elif self.mamba is not None:
            x_BTD = x_BTD + self._mamba(h, pos_BT, token_mask_BT, cache)
        return x_BTD + self.mlp(self.norm_mlp(x_BTD))


# ---------------------------------------------------------------------------------- the model

class FusionTreePreTrainedModel(PreTrainedModel):
    config_class = FusionTreeConfig
    base_model_prefix = "model"
    _no_split_modules = ["FusionTreeBlock"]
    # The Mamba state is recurrent: generation strategies that roll the cache back cannot.
    _is_stateful = True
    _supports_sdpa = False
    _can_compile_fullgraph = False
    _keep_in_fp32_modules_strict = ["A_log", "dt_bias", "mamba.D"]

    def _init_weights(self, module: nn.Module) -> None:
        # Only parameters missing from a checkpoint reach here (transformers' `init` functions
        # skip loaded ones); a fresh model gets FusionTree's starting point where it matters for
        # the forward: unit norms, a neutral gate, decaying SSM heads.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=1.0)
        elif isinstance(module, (FusionTreeRMSNorm, FusionTreeGatedRMSNorm)):
            init.ones_(module.weight)
        elif isinstance(module, FusionTreeGate):
            init.zeros_(module.bias)
        elif isinstance(module, FusionTreeMamba2):
            bound = 1.0 / math.sqrt(module.conv_kernel)
            init.uniform_(module.conv_weight, -bound, bound)
            init.uniform_(module.conv_bias, -bound, bound)
            init.copy_(module.A_log, torch.log(torch.linspace(1, 16, module.n_heads)))
            init.ones_(module.D)
            init.constant_(module.dt_bias, math.log(math.expm1(0.01)))


class FusionTreeModel(FusionTreePreTrainedModel):
    def __init__(self, config: FusionTreeConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(FusionTreeBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_out = FusionTreeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Cache | None = None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        """Returns the final hidden states [B, T, D]. attention_mask: [B, seen + T] (or [B, T]),
        1 = real token, 0 = left padding."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if cache is not None and len(cache.layers) != len(self.layers):
            raise ValueError(f"the cache has {len(cache.layers)} layers, the model {len(self.layers)}; pass "
                             "DynamicCache(config=model.config) (its layers follow config.layer_types), or none")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        past_pos = getattr(cache, "fusiontree_positions", None) if cache is not None else None
        seen = 0 if past_pos is None else past_pos.shape[1]
        token_mask = None
        if attention_mask is not None:
            if attention_mask.ndim != 2 or attention_mask.shape[1] not in (T, seen + T):
                raise ValueError(f"attention_mask must be 2-D [batch, seen + new tokens] = [{B}, {seen + T}] "
                                 f"(1 = token, 0 = left padding), got {tuple(attention_mask.shape)}")
            full = attention_mask.bool()
            token_mask = full[:, -T:]
            if T > 1 and bool((token_mask[:, :-1] & ~token_mask[:, 1:]).any()):  # host sync: input check
                raise ValueError("attention_mask must be left-padded (zeros, then ones): padding after a token "
                                 "would shift the Mamba state; pad on the left (tokenizer.padding_side='left')")
            if position_ids is None:
                position_ids = (full.long().cumsum(1) - 1).clamp(min=0)[:, -T:]
        if position_ids is None:
            position_ids = torch.arange(seen, seen + T, device=x.device).expand(B, T)
        position_ids = position_ids.long()
        key_pos = position_ids if token_mask is None else position_ids.masked_fill(~token_mask, -1)
        for layer in self.layers:
            x = layer(x, position_ids, key_pos, past_pos, token_mask, cache)
        if cache is not None:
            cache.fusiontree_positions = key_pos if past_pos is None else torch.cat([past_pos, key_pos], dim=1)
        return self.norm_out(x)


class FusionTreeForCausalLM(FusionTreePreTrainedModel, GenerationMixin):
    def __init__(self, config: FusionTreeConfig):
        super().__init__(config)
        self.model = FusionTreeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Cache | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | Tensor = 0, return_dict: bool | None = None,
                past_key_values: Cache | None = None, **kwargs) -> CausalLMOutputWithPast | tuple:
        """labels: [B, T] token ids (-100: ignored); the loss is the mean next-token cross entropy."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        hidden = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        if return_dict is False:
            return tuple(t for t in (loss, logits, cache) if t is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
