"""The validation loss: one routine for the trainer's periodic evaluation and for
`fusiontree.eval.perplexity`.

Legend: B batch, T tokens.

Every target counts once: the per-batch mean cross entropy of `HybridModelLoss` (its ignore
index and cross-document rule) times the batch's target count, summed in float64 per loader
and over all ranks when the process group is up.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from fusiontree.train.losses import HybridModelLoss


@torch.no_grad()
def validation_sums(model: nn.Module, loaders: Mapping[str, Iterable[dict]], loss_fn: HybridModelLoss,
                    device: torch.device, max_batches: int, forward: Callable | None = None) -> dict[str, Tensor]:
    """{loader name: [sum of target losses, targets]} (float64) over up to `max_batches`
    batches of each loader. A batch holds `input_ids` [B, T] and optionally `position_ids`,
    `seq_idx` (packed rows) and `labels` (targets other than the shifted input, ignore index
    where none). `forward`: what to call instead of `model` (a DeepSpeed engine around it);
    `model` is put in eval mode for the duration."""
    forward = forward or model
    was_training = model.training
    model.eval()
    out = {}
    for name, loader in loaders.items():
        acc = torch.zeros(2, dtype=torch.float64, device=device)
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            ids_BT = batch["input_ids"].to(device)
            seq_BT = batch["seq_idx"].to(device) if "seq_idx" in batch else None
            kwargs = {"seq_idx": seq_BT} if seq_BT is not None else {}
            if "position_ids" in batch:
                kwargs["position_ids"] = batch["position_ids"].to(device)
            res = forward(ids_BT, **kwargs)
            labels_BT = batch["labels"].to(device) if "labels" in batch else None
            _, parts = loss_fn(res.logits, ids_BT, res.gates, seq_idx_BT=seq_BT, labels_BT=labels_BT)
            acc += torch.stack([parts["ce"].double() * parts["tokens"], parts["tokens"].double()])
        if dist.is_initialized():
            dist.all_reduce(acc)
        out[name] = acc
    model.train(was_training)
    return out


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50))


def validation_metrics(sums: Mapping[str, Tensor]) -> dict[str, float]:
    """The trainer's metrics: `val_loss/<loader>` per loader, `val_loss` and `val_ppl` overall."""
    out = {}
    total = None
    for name, acc in sums.items():
        if acc[1] > 0:
            out[f"val_loss/{name}"] = float(acc[0] / acc[1])
        total = acc.clone() if total is None else total + acc
    if total is not None and total[1] > 0:
        out["val_loss"] = float(total[0] / total[1])
        out["val_ppl"] = perplexity(out["val_loss"])
    return out
