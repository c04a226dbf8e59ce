"""Ops with one pure-PyTorch reference each and room for faster backends beside it.

`resolve_kernels(cfg.kernels, device)` returns a `Kernels` bundle that the model's mixers call.
`auto` takes the best backend that loads for the device; naming a backend that cannot load
raises with the reason (never a silent fallback). The choice is logged by the caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from fusiontree.ops.attention import attention_ref
from fusiontree.ops.conv1d import causal_conv1d_ref, causal_conv1d_step_ref
from fusiontree.ops.ssd import ssd_chunked_ref, ssd_step_ref

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

    def describe(self) -> str:
        return f"ssd={self.ssd_name} attention={self.attention_name}"


# name -> loader returning the callables (raising ImportError/RuntimeError with the reason)
def _ssd_reference():
    return dict(ssd_chunked=ssd_chunked_ref, ssd_step=ssd_step_ref,
                conv1d=causal_conv1d_ref, conv1d_step=causal_conv1d_step_ref)


def _attention_reference():
    return dict(attention=attention_ref)


SSD_BACKENDS: dict[str, Callable[[], dict]] = {"reference": _ssd_reference}
ATTENTION_BACKENDS: dict[str, Callable[[], dict]] = {"reference": _attention_reference}
# Preference order for `auto`, per device type.
AUTO_ORDER = {"cpu": ["reference"], "cuda": ["reference"]}


def _pick(kind: str, table: dict, name: str, device: torch.device) -> tuple[str, dict]:
    if name != "auto":
        if name not in table:
            raise ValueError(f"kernels.{kind}={name!r} is not a known backend; choose auto or one of "
                             f"{sorted(table)}")
        try:
            return name, table[name]()
        except (ImportError, RuntimeError) as e:
            raise RuntimeError(f"kernels.{kind}={name!r} cannot load on {device}: {e}") from e
    reasons = []
    for cand in AUTO_ORDER.get(device.type, ["reference"]):
        if cand not in table:
            continue
        try:
            return cand, table[cand]()
        except (ImportError, RuntimeError) as e:
            reasons.append(f"{cand}: {e}")
            log.info("kernels.%s auto: %s unavailable (%s)", kind, cand, e)
    raise RuntimeError(f"no {kind} backend loads on {device}: {reasons}")


def resolve_kernels(cfg, device: torch.device | str = "cpu") -> Kernels:
    """cfg: a `KernelConfig` (fields `ssd`, `attention`)."""
    device = torch.device(device)
    ssd_name, ssd_fns = _pick("ssd", SSD_BACKENDS, cfg.ssd, device)
    attn_name, attn_fns = _pick("attention", ATTENTION_BACKENDS, cfg.attention, device)
    return Kernels(ssd_name=ssd_name, attention_name=attn_name, **ssd_fns, **attn_fns)


def reference_kernels() -> Kernels:
    return Kernels("reference", "reference", attention=attention_ref, **_ssd_reference())
