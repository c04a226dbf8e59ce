"""Optimizer, parameter groups and learning-rate schedules.

- Weight decay skips every parameter tagged `_no_weight_decay` (norm gains, biases, A_log, D,
  dt_bias, gate logits) and every 1-D parameter. A parameter whose size is not a multiple of 8
  elements gets a group of its own, so that every parameter stays 16-byte aligned in DeepSpeed's
  flat buffers (see `param_groups`).
- `SkippableAdamW` is torch's AdamW with one addition: `step()` applies nothing when any
  gradient it sees is non-finite (on any rank of its group) or when the trainer asked to skip.
  It sits under DeepSpeed (ZeRO 0-3 all call the base optimizer's step on the fp32 master
  weights), so a bad step leaves weights, Adam moments and step counts untouched at every
  ZeRO stage and precision, and the trainer counts and logs it.
- The schedule is a pure function of the number of applied optimizer steps (linear warmup,
  then cosine or warmup-stable-decay to `lr_peak * lr_min_ratio`), so resuming needs no
  scheduler state and a skipped step does not advance it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor


# DeepSpeed flattens each parameter group into one buffer and makes every parameter a view of
# it, so a parameter's address is the buffer's plus the sizes of the parameters before it. The
# blocks of a model share one compiled graph, whose kernels assume every block's parameters have
# the alignment the first block's had (16 bytes allows vector loads); a parameter whose size is
# not a multiple of 16 bytes would move every later one off it. Such parameters (per-head
# vectors of small or tensor-parallel models) therefore get a group each: every parameter then
# starts at a multiple of ALIGN_ELEMENTS elements, 16 bytes in bf16 and fp16 (32 in fp32).
ALIGN_ELEMENTS = 8
ALIGN_BYTES = 16


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, alone = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip_decay = getattr(p, "_no_weight_decay", False) or p.ndim < 2
        if p.numel() % ALIGN_ELEMENTS:
            alone.append({"params": [p], "weight_decay": 0.0 if skip_decay else weight_decay, "name": name})
        else:
            (no_decay if skip_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}, *alone]


def misaligned_parameters(model: nn.Module) -> list[str]:
    """Parameters whose data does not start at a 16-byte boundary (after DeepSpeed flattened
    the groups): compiled blocks would read them with vector loads that fault."""
    return [name for name, p in model.named_parameters() if p.data_ptr() % ALIGN_BYTES]


class SkippableAdamW(torch.optim.AdamW):
    """torch's AdamW that skips a step whose gradients are not all finite, on every rank
    together (weights, moments and step counts unchanged).

    skip_on_device (fused AdamW only): the decision stays on the device. The fused kernel reads
    it (as it reads GradScaler's) and leaves everything as it was where it is set, so the step
    has no host sync; `skipped_flag` hands the outcome on as a tensor, and `last_step_skipped`
    reads it (a sync). Otherwise the decision is read on the host before the update. Under
    ZeRO-1/2, which step the parameter groups one call at a time, DeepSpeed's global norm
    decides instead (`follow_global_norm`), so that the groups skip together."""

    def __init__(self, params, group: dist.ProcessGroup | None = None, skip_on_device: bool = False, **kwargs):
        super().__init__(params, **kwargs)
        if skip_on_device and not self.defaults.get("fused"):
            raise ValueError("train.skip_on_device=true needs the fused AdamW: set train.optimizer_impl=fused "
                             "(auto takes it on CUDA)")
        self.skip_on_device = skip_on_device
        self.skip_next = False
        self._skipped: bool | Tensor = False
        self.sync_group = group
        self.max_grad_norm = 0.0
        self._grad_norm: Callable[[], Tensor] | None = None

    def follow_global_norm(self, grad_norm: Callable[[], Tensor | float | None], max_norm: float = 0.0) -> None:
        """Under a wrapper that steps the parameter groups one call at a time (DeepSpeed's ZeRO-1
        and 2), decide by the global norm `grad_norm()` the wrapper computed over every group
        and rank before the first call: a non-finite norm skips every group of the step, not
        only the groups whose own gradients are non-finite. With skip_on_device and
        `max_norm` > 0 the fused kernel also clips by it: the gradients are divided by
        max(1, (norm + 1e-6) / max_norm), DeepSpeed's clipping arithmetic, with no host read of
        the norm (the wrapper must not clip as well)."""
        if max_norm < 0 or (max_norm > 0 and not self.skip_on_device):
            raise ValueError(f"max_norm={max_norm}: clipping inside the optimizer needs train.skip_on_device=true "
                             "and a positive bound")
        self._grad_norm, self.max_grad_norm = grad_norm, float(max_norm)

    @property
    def last_step_skipped(self) -> bool:
        s = self._skipped
        return bool(s.item()) if isinstance(s, Tensor) else s  # a device flag: a host sync

    @last_step_skipped.setter
    def last_step_skipped(self, value: bool) -> None:
        self._skipped = value

    def skipped_flag(self, device: torch.device) -> Tensor:
        """The last step's outcome as a float32 scalar on `device` (1: skipped), read without a sync."""
        s = self._skipped
        return s.to(device) if isinstance(s, Tensor) else torch.full((), float(s), device=device)  # a fill, no copy

    def _device(self) -> torch.device:
        return next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))

    def _nonfinite(self) -> Tensor:
        """1.0 on the parameters' device where some rank's gradients are not all finite, else 0.0."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        dev = self._device()
        # One norm over all gradients: multi-tensor kernels on CUDA (a few launches, not one
        # reduction per parameter); it is non-finite exactly when some gradient is.
        bad = torch.zeros((), dtype=torch.float32, device=dev) if not grads else \
            (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float().to(dev)
        if dist.is_available() and dist.is_initialized():
            # Deliberate collective: every rank must skip together (ZeRO ranks hold different shards).
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.sync_group)
        return bad

    def _step_nonfinite(self) -> Tensor:
        """Like `_nonfinite()`, from the global norm where one is followed: it covers every
        gradient of every group and rank, so it is non-finite exactly when one of them is, and
        the optimizer's own pass over its group's gradients (and its collective) is not needed.
        With clipping inside the optimizer, also sets the fused kernel's `grad_scale` from it."""
        norm = None if self._grad_norm is None else self._grad_norm()
        if norm is None:
            if self.max_grad_norm:
                raise RuntimeError("clipping inside the optimizer, but the wrapper computed no gradient norm this "
                                   "step (DeepSpeed: zero_optimization.compute_grad_norm must stay on)")
            return self._nonfinite()
        norm = torch.as_tensor(norm).detach().float().to(self._device())
        if self.max_grad_norm:
            self.grad_scale = torch.clamp((norm + 1e-6) / self.max_grad_norm, min=1.0)  # divides the gradients
        return (~torch.isfinite(norm)).float()

    def _grads_finite(self) -> bool:
        return not bool(self._step_nonfinite().item())  # host sync: the skip decision

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip_on_device:
            bad = self._step_nonfinite()
            if self.skip_next:
                bad = torch.ones_like(bad)
            self.skip_next = False
            self._skipped = bad
            self.found_inf = bad  # the fused kernel's own skip (torch.optim.Adam reads this attribute)
            try:
                return super().step(closure)
            finally:
                del self.found_inf
                self.__dict__.pop("grad_scale", None)
        finite = self._grads_finite()
        self._skipped = self.skip_next or not finite
        self.skip_next = False
        if self._skipped:
            return None
        return super().step(closure)


def lr_at(step: int, lr_peak: float, warmup_steps: int, total_steps: int, decay: str = "cosine",
          lr_min_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based, counting applied steps)."""
    lr_min = lr_peak * lr_min_ratio
    if warmup_steps and step < warmup_steps:
        return lr_peak * (step + 1) / warmup_steps
    if decay == "constant":
        return lr_peak
    if decay == "cosine":
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return lr_min + 0.5 * (lr_peak - lr_min) * (1 + math.cos(math.pi * t))
    if decay == "wsd":
        decay_steps = max(1, int(round(decay_fraction * total_steps)))
        start = total_steps - decay_steps
        if step < start:
            return lr_peak
        t = min(1.0, (step - start) / decay_steps)
        return lr_peak - (lr_peak - lr_min) * t
    raise ValueError(f"train.lr_decay={decay!r}; use cosine, wsd or constant")


def build_optimizer(model: nn.Module, cfg) -> SkippableAdamW:
    """The optimizer `cfg` (a `TrainConfig`) describes, over `model`'s parameter groups."""
    impl = cfg.optimizer_impl
    if impl not in ("auto", "fused", "foreach"):
        raise ValueError(f"train.optimizer_impl={impl!r}; use auto, fused or foreach")
    if impl == "auto":
        on_cuda = any(p.is_cuda for p in model.parameters())
        impl = "fused" if on_cuda else "foreach"
    skip_on_device = impl == "fused" if cfg.skip_on_device == "auto" else cfg.skip_on_device
    return SkippableAdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr_peak,
                          betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                          skip_on_device=skip_on_device,
                          **({"fused": True} if impl == "fused" else {"foreach": True}))
