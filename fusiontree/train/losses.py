"""HybridModelLoss: next-token cross entropy plus the gate regulariser, computed exactly once.

Legend: B batch, T time, V vocabulary, D model width.

The model's forward adds no loss term; it hands each layer's gate to this loss.

- Targets: position t predicts token t+1 of the same row. Padding targets (ignore_index)
  and, for packed rows, targets in another document than their input (the step across a
  document boundary) are dropped; the mean runs over the targets that remain.
- Gate regulariser, averaged over the layers that have a gate:
  `entropy`: mean binary entropy H(g) = -g log g - (1-g) log(1-g), pushing gates to decide;
  `balance`: (mean(g) - 0.5)^2, pulling the average gate away from collapse.
  total = ce + gate_reg_weight * reg
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fusiontree.config import LossConfig
from fusiontree.ops.masks import document_starts


def shifted_targets(input_ids_BT: Tensor, ignore_index: int, seq_idx_BT: Tensor | None = None,
                    labels_BT: Tensor | None = None, mask_cross_document: bool = True) -> Tensor:
    """Targets for logits[:, :-1]: labels (default input_ids) shifted left by one."""
    tgt = (input_ids_BT if labels_BT is None else labels_BT)[:, 1:].clone()
    if seq_idx_BT is not None and mask_cross_document:  # the target starts another document
        tgt[document_starts(seq_idx_BT, first=False)[:, 1:]] = ignore_index
    return tgt


def gate_regularizer(gates: list[Tensor | None], kind: str) -> Tensor | None:
    gs = [g for g in gates if g is not None]
    if not gs or kind == "none":
        return None
    terms = []
    for g in gs:
        g = g.float().clamp(1e-6, 1 - 1e-6)
        if kind == "entropy":
            terms.append((-(g * g.log() + (1 - g) * (1 - g).log())).mean())
        elif kind == "balance":
            terms.append((g.mean() - 0.5) ** 2)
        else:
            raise ValueError(f"loss.gate_reg={kind!r}; use none, entropy or balance")
    return torch.stack(terms).mean()


def token_cross_entropy(logits_NV: Tensor, tgt_N: Tensor, ignore_index: int) -> Tensor:
    """Mean cross entropy (fp32) over the targets that are not `ignore_index`."""
    return F.cross_entropy(logits_NV.float(), tgt_N, ignore_index=ignore_index)


class HybridModelLoss(nn.Module):
    """compile_backend: run the cross entropy through torch.compile with that backend (one
    static graph per shape): the fp32 cast, log-softmax and gradient fuse into reductions over
    the logits as they are. None: eager."""

    def __init__(self, cfg: LossConfig, compile_backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.cross_entropy = token_cross_entropy
        if compile_backend is not None:
            from fusiontree.ops import compile_once

            self.cross_entropy = compile_once(token_cross_entropy, backend=compile_backend, dynamic=False)

    def forward(self, logits_BTV: Tensor, input_ids_BT: Tensor, gates: list[Tensor | None],
                seq_idx_BT: Tensor | None = None, labels_BT: Tensor | None = None) -> tuple[Tensor, dict]:
        """Returns (loss, parts) with parts = {ce, gate_reg, tokens} as detached tensors."""
        cfg = self.cfg
        tgt = shifted_targets(input_ids_BT, cfg.ignore_index, seq_idx_BT, labels_BT, cfg.mask_cross_document)
        # Every position's logits with its target (the last position has none): no slice of the
        # logits to copy in the forward and to scatter back in the backward.
        tgt = F.pad(tgt, (0, 1), value=cfg.ignore_index)
        ce = self.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]), tgt.reshape(-1), cfg.ignore_index)
        reg = gate_regularizer(gates, cfg.gate_reg)
        loss = ce if reg is None or cfg.gate_reg_weight == 0 else ce + cfg.gate_reg_weight * reg
        parts = {"ce": ce.detach(), "gate_reg": (reg if reg is not None else torch.zeros(())).detach(),
                 "tokens": (tgt != cfg.ignore_index).sum()}
        return loss, parts
