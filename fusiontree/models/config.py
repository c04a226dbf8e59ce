"""The model's config: one typed section (`ModelConfig`) and the named presets.

`model.preset` in a run config names one of these presets (`debug`, `tiny`, `small`, `1b`,
`transformer-*`); the other `model.*` keys override fields of that preset. This module
imports nothing else from FusionTree, so every layer (the run config, the model, the
tensor-parallel table) can read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    preset: str = "custom"
    vocab_size: int = 32000
    d_model: int = 1024
    n_layers: int = 12
    max_seq_len: int = 32768
    # Which sequence mixers a block runs: both side by side (the FusionTree model), or one
    # of them alone (the baselines: all-attention Transformer, window-only, Mamba-only).
    mixer: Literal["hybrid", "attention", "mamba"] = "hybrid"
    # `parallel`: both branches on the same input, fused by a gate. `serial`: Mamba then
    # attention, each with its own residual, no gate (the parallel-vs-serial ablation).
    block: Literal["parallel", "serial"] = "parallel"
    gate: Literal["channel", "token"] = "channel"
    gate_rank: int = 32  # width of the per-token gate's low-rank projection
    # attention
    n_heads: int = 16
    n_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // n_heads
    window: int = 1024  # keys a local layer's query sees, itself included
    # One letter per layer, tiled over the layers: L = local (sliding window), G = global.
    attn_pattern: str = "LLLG"
    rope_theta: float = 10000.0
    # Mamba-2
    ssm_expand: int = 2
    ssm_head_dim: int = 64
    ssm_state: int = 128
    ssm_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1
    # SRTE: sinusoids of absolute position fed to the Mamba branch only (0 turns it off).
    srte_dim: int = 64
    srte_max_period: float = 10000.0
    # MLP and the rest
    mlp_hidden: int = 0  # 0: SwiGLU's 8/3 * d_model rounded up to a multiple of 64
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Branches removed by a pruning plan, as "LAYER:attention" or "LAYER:mamba". A pruned
    # parallel block keeps its gate: the remaining branch keeps its weight g or 1 - g.
    pruned: list[str] = field(default_factory=list)

    # ---- derived sizes
    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ssm_d_inner(self) -> int:
        return self.ssm_expand * self.d_model

    @property
    def ssm_heads(self) -> int:
        return self.ssm_d_inner // self.ssm_head_dim

    @property
    def mlp_hidden_size(self) -> int:
        return self.mlp_hidden or _mlp_for(self.d_model)

    @property
    def has_attention(self) -> bool:
        return self.mixer in ("hybrid", "attention")

    @property
    def has_mamba(self) -> bool:
        return self.mixer in ("hybrid", "mamba")

    def layer_has_attention(self, layer_idx: int) -> bool:
        return self.has_attention and f"{layer_idx}:attention" not in self.pruned

    def layer_has_mamba(self, layer_idx: int) -> bool:
        return self.has_mamba and f"{layer_idx}:mamba" not in self.pruned

    def layer_window(self, layer_idx: int) -> int | None:
        """The keys a query of this layer sees, itself included; None: a global layer (every
        earlier token). The one place where the pattern letter `G` becomes "global"."""
        return None if self.attn_pattern[layer_idx % len(self.attn_pattern)] == "G" else self.window

    @property
    def local_window(self) -> int | None:
        """The window of the local attention layers; None when no layer attends locally."""
        has_local = self.has_attention and any(self.layer_window(i) is not None for i in range(self.n_layers))
        return self.window if has_local else None

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"model config: {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "max_seq_len", "n_heads", "n_kv_heads"):
            if getattr(self, name) <= 0:
                bad(f"{name}={getattr(self, name)} must be > 0")
        if self.window <= 0:
            bad(f"window={self.window} must be > 0 (keys a local query sees, itself included); "
                "use attn_pattern='G' for all-global attention")
        if not self.attn_pattern or set(self.attn_pattern) - {"L", "G"}:
            bad(f"attn_pattern={self.attn_pattern!r} must be a non-empty string of 'L' (local) "
                "and 'G' (global), e.g. 'LLLG'")
        if self.n_heads % self.n_kv_heads:
            bad(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}; "
                f"pick n_kv_heads among {[d for d in range(1, self.n_heads + 1) if self.n_heads % d == 0]}")
        if not self.head_dim and self.d_model % self.n_heads:
            bad(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "set head_dim explicitly or change n_heads")
        if self.attn_head_dim % 2:
            bad(f"attention head_dim={self.attn_head_dim} must be even for RoPE")
        if self.has_mamba:
            if self.ssm_d_inner % self.ssm_head_dim:
                bad(f"ssm_expand*d_model={self.ssm_d_inner} must be divisible by "
                    f"ssm_head_dim={self.ssm_head_dim}")
            if self.ssm_heads % self.ssm_groups:
                bad(f"Mamba heads ({self.ssm_heads}) must be divisible by ssm_groups={self.ssm_groups}")
            if self.conv_kernel < 1 or self.chunk_size < 1 or self.ssm_state < 1:
                bad("conv_kernel, chunk_size and ssm_state must be >= 1")
            if not 0 < self.dt_min <= self.dt_max:
                bad(f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
            if self.srte_dim < 0 or self.srte_dim % 2:
                bad(f"srte_dim={self.srte_dim} must be an even number >= 0 (0 disables SRTE)")
        if self.gate == "token" and self.gate_rank <= 0:
            bad(f"gate_rank={self.gate_rank} must be > 0 for the per-token gate")
        for entry in self.pruned:
            layer, _, branch = entry.partition(":")
            if not layer.isdigit() or int(layer) >= self.n_layers or branch not in ("attention", "mamba"):
                bad(f"pruned entry {entry!r} must look like 'LAYER:attention' or 'LAYER:mamba' with "
                    f"0 <= LAYER < n_layers={self.n_layers}")
            if branch == "attention" and not self.has_attention or branch == "mamba" and not self.has_mamba:
                bad(f"pruned entry {entry!r} names a branch that mixer={self.mixer!r} does not have")
        if self.block == "serial" and self.mixer != "hybrid":
            bad("block='serial' chains Mamba then attention, so it needs mixer='hybrid'")


def _mlp_for(d_model: int) -> int:
    """SwiGLU's hidden width: 8/3 * d_model rounded up to a multiple of 64."""
    return -(-(8 * d_model // 3) // 64) * 64


# Depth of each `transformer-<name>` twin: the attention-only, all-global stack whose parameter
# count is closest to the hybrid preset's (each hybrid block also carries a Mamba branch). The
# model owns parameter counting, so these depths come from
# `fusiontree.models.flops.transformer_twin_layers`, which tests/test_config.py checks them
# against; a new or resized base preset takes its twin's depth from that function.
_TWIN_LAYERS = {"debug": 3, "tiny": 9, "small": 21, "1b": 28, "7b": 43}


def _transformer_twin(base: ModelConfig, name: str) -> ModelConfig:
    return dataclasses.replace(base, preset=name, mixer="attention", attn_pattern="G",
                               n_layers=_TWIN_LAYERS[base.preset])


def _base_presets() -> dict[str, ModelConfig]:
    return {
        # Trains on CPU in seconds; every feature on (windows, a global layer, GQA, SRTE).
        "debug": ModelConfig(
            preset="debug", vocab_size=512, d_model=64, n_layers=2, max_seq_len=2048,
            n_heads=4, n_kv_heads=2, window=16, attn_pattern="LG", ssm_head_dim=16,
            ssm_state=16, chunk_size=16, srte_dim=16, mlp_hidden=_mlp_for(64), gate_rank=8),
        # ~10M parameters: CPU minutes.
        "tiny": ModelConfig(
            preset="tiny", vocab_size=8192, d_model=256, n_layers=6, max_seq_len=8192,
            n_heads=4, n_kv_heads=2, window=128, attn_pattern="LLLLLG", ssm_head_dim=32,
            ssm_state=32, chunk_size=64, srte_dim=32, gate_rank=16),
        # The first validation model: hidden 1024 x 12 layers. 8 SSM groups (and 4 kv heads)
        # let tensor parallelism split the Mamba branch up to 8 ways (4 for attention kv).
        "small": ModelConfig(
            preset="small", vocab_size=32000, d_model=1024, n_layers=12, max_seq_len=32768,
            n_heads=16, n_kv_heads=4, window=1024, attn_pattern="LLLLLG", ssm_expand=2,
            ssm_head_dim=64, ssm_state=128, ssm_groups=8, chunk_size=256),
        "1b": ModelConfig(
            preset="1b", vocab_size=32000, d_model=2048, n_layers=20, max_seq_len=32768,
            n_heads=16, n_kv_heads=4, window=1024, attn_pattern="LLLLLG", ssm_expand=1,
            ssm_head_dim=64, ssm_state=128, ssm_groups=8, chunk_size=256, mlp_hidden=5632),
        # 7B class (7.8B parameters): Llama-7B's width and MLP, 32 query / 8 kv heads of 128,
        # 64 Mamba heads in 8 groups. Sized for tensor parallelism: every split divides by 8.
        "7b": ModelConfig(
            preset="7b", vocab_size=32000, d_model=4096, n_layers=32, max_seq_len=32768,
            n_heads=32, n_kv_heads=8, window=1024, attn_pattern="LLLLLG", ssm_expand=1,
            ssm_head_dim=64, ssm_state=128, ssm_groups=8, chunk_size=256, mlp_hidden=11008),
    }


def model_preset(name: str) -> ModelConfig:
    base = _base_presets()
    if name in base:
        return base[name]
    if name.startswith("transformer-") and name[len("transformer-"):] in base:
        return _transformer_twin(base[name[len("transformer-"):]], name)
    raise ValueError(f"unknown model preset {name!r}; choose one of {preset_names()}")


def preset_names() -> list[str]:
    names = list(_base_presets())
    return names + [f"transformer-{n}" for n in names]
