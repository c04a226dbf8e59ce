"""Mamba-2 mixer: in_proj -> causal conv1d -> SSD scan -> gated RMSNorm -> out_proj.

Legend: B batch, T time, D model width, I inner width (expand * D), H SSM heads, P SSM head
dim, G groups, N state size, C conv channels (I + 2 G N), W conv state width (kernel - 1).

`A_log`, `D` and `dt_bias` are fp32 and excluded from weight decay. Padding tokens
(`SeqInfo.token_mask`) enter the conv as zeros and take a zero SSM step, so they leave the
state exactly as it was.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from fusiontree.models.config import ModelConfig
from fusiontree.models.cache import MambaLayerState, SeqInfo
from fusiontree.models.layers import GatedRMSNorm, keep_fp32, no_weight_decay, split_linear
from fusiontree.ops import Kernels
from fusiontree.ops.backends.common import check_conv_shape


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, kernels: Kernels):
        super().__init__()
        self.layer_idx = layer_idx
        self.kernels = kernels
        self.d_model, self.d_inner = cfg.d_model, cfg.ssm_d_inner
        self.n_heads, self.head_dim = cfg.ssm_heads, cfg.ssm_head_dim
        self.n_groups, self.d_state = cfg.ssm_groups, cfg.ssm_state
        self.chunk_size, self.conv_kernel = cfg.chunk_size, cfg.conv_kernel
        self.dt_min, self.dt_max, self.init_std = cfg.dt_min, cfg.dt_max, cfg.init_std
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.d_state
        if kernels.conv1d_name == "causal_conv1d":
            check_conv_shape(self.conv_dim, self.conv_kernel)
        # One fused projection: [z (I) | x (I) | B (G N) | C (G N) | dt (H)]
        self.in_proj = nn.Linear(self.d_model, self.d_inner + self.conv_dim + self.n_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, self.conv_kernel))
        self.conv_bias = no_weight_decay(nn.Parameter(torch.empty(self.conv_dim)))
        self.A_log = keep_fp32(no_weight_decay(nn.Parameter(torch.empty(self.n_heads))))
        self.D = keep_fp32(no_weight_decay(nn.Parameter(torch.empty(self.n_heads))))
        self.dt_bias = keep_fp32(no_weight_decay(nn.Parameter(torch.empty(self.n_heads))))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=False)

    def init_weights(self) -> None:
        nn.init.normal_(self.in_proj.weight, std=self.init_std)
        nn.init.normal_(self.out_proj.weight, std=self.init_std)
        bound = 1.0 / math.sqrt(self.conv_kernel)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.uniform_(self.conv_bias, -bound, bound)
        with torch.no_grad():
            # dt log-uniform in [dt_min, dt_max]; dt_bias = softplus^-1(dt)
            u = torch.rand(self.n_heads, device=self.dt_bias.device, dtype=torch.float32)
            dt = torch.exp(u * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
            dt = dt.clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            A = torch.empty(self.n_heads, device=self.A_log.device, dtype=torch.float32).uniform_(1, 16)
            self.A_log.copy_(torch.log(A))
            self.D.fill_(1.0)
        self.norm.init_weights()

    def allocate_inference_cache(self, batch_size: int, max_length: int, dtype: torch.dtype,
                                 device: torch.device) -> MambaLayerState:
        return MambaLayerState(
            conv_BCW=torch.zeros(batch_size, self.conv_dim, self.conv_kernel - 1, dtype=dtype, device=device),
            ssm_BHPN=torch.zeros(batch_size, self.n_heads, self.head_dim, self.d_state,
                                 dtype=torch.float32, device=device))

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def _split_xbc(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        GN = self.n_groups * self.d_state
        return torch.split(xBC, [self.d_inner, GN, GN], dim=-1)

    def forward(self, u_BTD: Tensor, info: SeqInfo, state: MambaLayerState | None = None) -> Tensor:
        if state is not None and u_BTD.shape[1] == 1 and info.token_mask is None:
            return self.step(u_BTD, info, state)
        if type(self.in_proj) is nn.Linear:  # (tensor parallelism wraps it: its own forward then)
            z, xBC, dt = split_linear(u_BTD, self.in_proj.weight, (self.d_inner, self.conv_dim, self.n_heads))
        else:
            z, xBC, dt = self._split(self.in_proj(u_BTD))
        mask = info.token_mask
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        xBC, conv_final = self.kernels.conv1d(
            xBC, self.conv_weight, self.conv_bias,
            initial_state_BCK=None if state is None else state.conv_BCW,
            seq_idx_BT=info.seq_idx, activation="silu")
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if mask is not None:
            dt = dt * mask[..., None]
        y, ssm_final = self.kernels.ssd_chunked_packed(
            xBC, dt, -torch.exp(self.A_log.float()), self.D, head_dim=self.head_dim, groups=self.n_groups,
            chunk_size=self.chunk_size, initial_state_BHPN=None if state is None else state.ssm_BHPN,
            seq_idx_BT=info.seq_idx)
        if state is not None:
            state.conv_BCW.copy_(conv_final)
            state.ssm_BHPN.copy_(ssm_final)
        y = self.norm(rearrange(y, "b t h p -> b t (h p)"), z)
        return self.out_proj(y)

    def step(self, u_B1D: Tensor, info: SeqInfo, state: MambaLayerState) -> Tensor:
        """Decode one token per row, updating `state` in place."""
        z, xBC, dt = self._split(self.in_proj(u_B1D[:, 0]))
        xBC = self.kernels.conv1d_step(state.conv_BCW, xBC, self.conv_weight, self.conv_bias, activation="silu")
        x, Bm, Cm = self._split_xbc(xBC)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        y = self.kernels.ssd_step(
            state.ssm_BHPN, rearrange(x, "b (h p) -> b h p", p=self.head_dim), dt,
            -torch.exp(self.A_log.float()),
            rearrange(Bm, "b (g n) -> b g n", g=self.n_groups),
            rearrange(Cm, "b (g n) -> b g n", g=self.n_groups), self.D)
        y = self.norm(rearrange(y, "b h p -> b (h p)"), z)
        return self.out_proj(y)[:, None]

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: projections, conv, and the chunked SSD as it is computed
        (full Q x Q blocks inside a chunk, chunk states in and out)."""
        Q = min(self.chunk_size, seq_len)
        H, P, N, G = self.n_heads, self.head_dim, self.d_state, self.n_groups
        proj = 2 * self.d_model * (self.in_proj.out_features + self.d_inner)
        conv = 2 * self.conv_kernel * self.conv_dim
        ssd = 2 * Q * N * G + 2 * Q * H * P + 2 * 2 * H * P * N
        return int(proj + conv + ssd)
