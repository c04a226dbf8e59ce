"""Ops with one pure-PyTorch reference each and faster backends beside it.

`resolve_kernels(cfg.kernels, device)` returns a `Kernels` bundle that the model's mixers call.
`auto` takes the first backend in `AUTO_ORDER[device.type]` that loads; naming a backend that
cannot load raises with the reason (never a silent fallback). The caller logs the choice
(`Kernels.describe()`); `auto` logs why it skipped a backend.

| op | backends | `auto` on CUDA | `auto` on CPU |
| --- | --- | --- | --- |
| ssd (chunked scan + decode step) | `reference`, `mamba_ssm` (mamba-ssm's Triton kernels and its autograd), `mamba_ssm_saved` (the same kernels; the backward reuses what the forward computed) | mamba_ssm_saved, else reference | reference |
| attention | `reference`, `flex` (FlexAttention for windows / document masks / padding, SDPA for unmasked causal and for cached regimes) | flex, else reference | reference |
| conv1d (the Mamba mixer's 4-tap depthwise causal conv, training and prefill) | `reference`, `causal_conv1d` (the causal-conv1d package's CUDA kernels), `triton` (our Triton kernels) | causal_conv1d, else triton, else reference | reference |
| decode_attention (the static decode step's attention over a cache) | `all_slots` (the attention backend over every allocated slot, masked by position), `filled_blocks` (FlexAttention's decoding kernel over the filled blocks only) | filled_blocks on CUDA (all_slots where it cannot load) | all_slots |

The conv1d decode step stays the reference (one token: elementwise work that a compiled decode
step fuses). `train.compile` fuses the reference conv1d, the norms, RoPE, the gate mix and SwiGLU
by compiling each block (`fusiontree.train.mechanics.apply_compile`); the `mamba_ssm` and `flex`
backends' training kernels stay opaque inside those compiled blocks, and `causal_conv1d` and
`triton` are custom ops in their graphs. In the compiled decode step on CUDA a block is one graph: the
`mamba_ssm` decode step is a custom op, and `filled_blocks` and the `flex` backend's cached
regime (`all_slots`) trace into it. `compile_once` and `raise_recompile_limit` are the one way
the package calls torch.compile.
flash-attn is not a backend: the GPU machine it would be tested on does not have it, and an
untested backend would break the rule that every backend is checked against the reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from fusiontree.ops.attention import attention_ref
from fusiontree.ops.backends.common import compile_once, raise_recompile_limit
from fusiontree.ops.conv1d import causal_conv1d_ref, causal_conv1d_step_ref
from fusiontree.ops.ssd import split_xbc, ssd_chunked_ref, ssd_step_ref

__all__ = ["Kernels", "resolve_kernels", "reference_kernels", "compile_once", "raise_recompile_limit"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernels:
    ssd_name: str
    attention_name: str
    ssd_chunked: Callable
    ssd_step: Callable
    conv1d: Callable
    conv1d_step: Callable
    attention: Callable
    # Builds the attention masks one cache-free forward shares across its layers
    # (`SeqInfo.attn_masks`), or None: the backend needs none (each call builds what it needs).
    attention_masks: Callable | None = None
    # The static decode step's attention over the first `filled` slots of a cache (contract of
    # `decode_attention_ref`), or None (`all_slots`): `attention` over every allocated slot.
    decode_attention: Callable | None = None
    decode_attention_name: str = "all_slots"
    conv1d_name: str = "reference"
    # `ssd_chunked` taking x, B and C packed in one tensor (its gradient comes back in one
    # buffer), or None: `ssd_chunked_packed` passes views to `ssd_chunked`.
    ssd_chunked_xbc: Callable | None = None

    def ssd_chunked_packed(self, xBC_BTW, dt_BTH, A_H, D_H, *, head_dim: int, groups: int, chunk_size: int,
                           initial_state_BHPN=None, seq_idx_BT=None):
        """`ssd_chunked` on x, B and C packed along the last dim ([x (H·P) | B (G·N) | C (G·N)],
        `split_xbc`). Returns (y_BTHP, final_state_BHPN fp32)."""
        if self.ssd_chunked_xbc is not None:
            return self.ssd_chunked_xbc(xBC_BTW, dt_BTH, A_H, D_H, head_dim=head_dim, groups=groups,
                                        chunk_size=chunk_size, initial_state_BHPN=initial_state_BHPN,
                                        seq_idx_BT=seq_idx_BT)
        x, B, C = split_xbc(xBC_BTW, dt_BTH.shape[-1], head_dim, groups)
        return self.ssd_chunked(x, dt_BTH, A_H, B, C, D_H, chunk_size=chunk_size,
                                initial_state_BHPN=initial_state_BHPN, seq_idx_BT=seq_idx_BT)

    def describe(self) -> str:
        # The default decode path is the attention backend itself: named only when it is not.
        decode = "" if self.decode_attention is None else f" decode_attention={self.decode_attention_name}"
        return f"ssd={self.ssd_name} attention={self.attention_name} conv1d={self.conv1d_name}{decode}"


# name -> loader(device) returning the callables, or raising ImportError / RuntimeError with
# the reason it cannot run on that device. Loaders import optional packages lazily, so a
# missing package fails only the backend that needs it.
def _ssd_reference(device: torch.device) -> dict:
    return dict(ssd_chunked=ssd_chunked_ref, ssd_step=ssd_step_ref)


def _need_triton(what: str) -> None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{what} on CUDA generates Triton kernels, and triton does not import: {e}") from e


def _ssd_mamba_ssm(device: torch.device) -> dict:
    if device.type != "cuda":
        raise RuntimeError("mamba-ssm's SSD kernels are Triton GPU kernels and need a CUDA device")
    from fusiontree.ops.backends.mamba_kernels import ssd_chunked_mamba, ssd_step_mamba

    return dict(ssd_chunked=ssd_chunked_mamba, ssd_step=ssd_step_mamba)


def _ssd_mamba_ssm_saved(device: torch.device) -> dict:
    fns = _ssd_mamba_ssm(device)
    from fusiontree.ops.backends.mamba_kernels import ssd_chunked_mamba_saved, ssd_chunked_mamba_saved_xbc

    return dict(fns, ssd_chunked=ssd_chunked_mamba_saved, ssd_chunked_xbc=ssd_chunked_mamba_saved_xbc)


def _conv1d_reference(device: torch.device) -> dict:
    return dict(conv1d=causal_conv1d_ref, conv1d_step=causal_conv1d_step_ref)


def _conv1d_causal(device: torch.device) -> dict:
    if device.type != "cuda":
        raise RuntimeError("causal-conv1d's kernels are CUDA kernels and need a CUDA device")
    try:
        from fusiontree.ops.backends.conv1d_cuda import causal_conv1d_cuda_fn
    except ImportError as e:
        raise ImportError(f"{e} (pip install causal-conv1d, built for this GPU)") from e

    return dict(conv1d=causal_conv1d_cuda_fn, conv1d_step=causal_conv1d_step_ref)


def _conv1d_triton(device: torch.device) -> dict:
    if device.type != "cuda":
        raise RuntimeError("the triton conv1d kernels are GPU kernels and need a CUDA device")
    _need_triton("the triton conv1d backend")
    from fusiontree.ops.backends.conv1d_triton import causal_conv1d_triton_fn

    return dict(conv1d=causal_conv1d_triton_fn, conv1d_step=causal_conv1d_step_ref)


def _attention_reference(device: torch.device) -> dict:
    return dict(attention=attention_ref)


def _attention_flex(device: torch.device) -> dict:
    if device.type == "cuda":
        _need_triton("FlexAttention")
    from fusiontree.ops.backends.flex import attention_flex, flex_block_masks

    return dict(attention=attention_flex, attention_masks=flex_block_masks)


def _decode_all_slots(device: torch.device) -> dict:
    return dict(decode_attention=None)


def _decode_filled_blocks(device: torch.device) -> dict:
    if device.type == "cuda":
        _need_triton("FlexAttention's decoding kernel")
    from fusiontree.ops.backends.decode import decode_attention_filled_blocks

    return dict(decode_attention=decode_attention_filled_blocks)


SSD_BACKENDS: dict[str, Callable[[torch.device], dict]] = {
    "reference": _ssd_reference, "mamba_ssm": _ssd_mamba_ssm, "mamba_ssm_saved": _ssd_mamba_ssm_saved}
ATTENTION_BACKENDS: dict[str, Callable[[torch.device], dict]] = {
    "reference": _attention_reference, "flex": _attention_flex}
CONV1D_BACKENDS: dict[str, Callable[[torch.device], dict]] = {
    "reference": _conv1d_reference, "causal_conv1d": _conv1d_causal, "triton": _conv1d_triton}
DECODE_ATTENTION_BACKENDS: dict[str, Callable[[torch.device], dict]] = {
    "all_slots": _decode_all_slots, "filled_blocks": _decode_filled_blocks}
# `auto` for the decode attention on CUDA is filled_blocks at every batch. On an H200
# (BENCHMARKS.md), compiled graphed steps with static shapes, it was the faster path at every
# batch measured: `small` at 4K, one run, 0.68 / 1.05 / 1.61 ms per step at batch 1 / 8 / 32
# against all_slots' 1.69 / 2.02 / 2.28; `1b` at 32K 1.79 and 4.97 ms at batch 1 and 32 against
# all_slots' 7.28 and 7.57 (other runs).
# Preference order for `auto`, per device type (names missing from an op's table are skipped;
# other device types take the CPU order). On CPU only the references (all_slots is the decode
# attention's): FlexAttention has no CPU backward.
# `auto` for the SSD on CUDA is mamba_ssm_saved: through launch/train.py on an H200 it trained
# `small` at 4K 1.058x and `1b` at 32K 1.024x faster than mamba_ssm, for 3.1 and 6.4 GiB more
# peak memory (BENCHMARKS.md).
AUTO_ORDER = {"cpu": ["reference", "all_slots"],
              "cuda": ["mamba_ssm_saved", "mamba_ssm", "flex", "causal_conv1d", "triton", "filled_blocks", "reference",
                       "all_slots"]}


def _pick(kind: str, table: dict, name: str, device: torch.device) -> tuple[str, dict]:
    if name != "auto":
        if name not in table:
            raise ValueError(f"kernels.{kind}={name!r} is not a known backend; choose auto or one of "
                             f"{sorted(table)}")
        try:
            return name, table[name](device)
        except (ImportError, RuntimeError) as e:
            raise RuntimeError(f"kernels.{kind}={name!r} cannot load on {device}: {e}") from e
    reasons = []
    for cand in AUTO_ORDER.get(device.type, AUTO_ORDER["cpu"]):
        if cand not in table:
            continue
        try:
            return cand, table[cand](device)
        except (ImportError, RuntimeError) as e:
            reasons.append(f"{cand}: {e}")
            log.info("kernels.%s auto: %s unavailable (%s)", kind, cand, e)
    raise RuntimeError(f"no {kind} backend loads on {device}: {reasons}")


def resolve_kernels(cfg, device: torch.device | str = "cpu") -> Kernels:
    """cfg: a `KernelConfig` (fields `ssd`, `attention`, `conv1d`, `decode_attention`)."""
    device = torch.device(device)
    ssd_name, ssd_fns = _pick("ssd", SSD_BACKENDS, cfg.ssd, device)
    attn_name, attn_fns = _pick("attention", ATTENTION_BACKENDS, cfg.attention, device)
    conv_name, conv_fns = _pick("conv1d", CONV1D_BACKENDS, cfg.conv1d, device)
    decode_name, decode_fns = _pick("decode_attention", DECODE_ATTENTION_BACKENDS, cfg.decode_attention, device)
    return Kernels(ssd_name=ssd_name, attention_name=attn_name, decode_attention_name=decode_name,
                   conv1d_name=conv_name, **ssd_fns, **attn_fns, **conv_fns, **decode_fns)


def reference_kernels() -> Kernels:
    cpu = torch.device("cpu")
    return Kernels("reference", "reference", attention=attention_ref, **_ssd_reference(cpu), **_conv1d_reference(cpu))
