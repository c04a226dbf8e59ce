"""GateMonitor: running per-layer gate statistics and the pruning plan they justify.

The gate g of a parallel block is the weight of the attention branch (1 - g goes to Mamba).
Every N steps the trainer runs a forward with `collect_gate_stats=True` and calls
`update(layer_idx, stats)` per layer. The monitor keeps, per layer, running means of the
gate and of the fraction of gate values >= 0.5 (attention preferred), a histogram over
[0, 1], the per-channel mean, and the trajectory of the mean.

`export_pruning_plan(path)` writes JSON naming the branches the gates have switched off:
attention when the gate sits near 0 (mean < off_threshold and almost no values >= 0.5),
Mamba when it sits near 1 (mean > 1 - off_threshold and almost no values < 0.5), with the
evidence (mean gate, fraction of values on each side, updates and tokens seen).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def off_branch(mean_gate: float, frac_attention: float, off_threshold: float, frac_threshold: float) -> str | None:
    """The branch a layer's gate has switched off, or None. g weights attention: attention is
    off when the mean gate is below `off_threshold` and at most `frac_threshold` of the
    tokens prefer it (g >= 0.5); Mamba, symmetrically."""
    if mean_gate < off_threshold and frac_attention <= frac_threshold:
        return "attention"
    if mean_gate > 1 - off_threshold and (1 - frac_attention) <= frac_threshold:
        return "mamba"
    return None


@dataclass
class LayerGateStats:
    updates: int = 0
    tokens: int = 0
    mean_sum: float = 0.0
    attn_frac_sum: float = 0.0
    hist: list[float] = field(default_factory=list)
    channel_mean_sum: torch.Tensor | None = None
    trajectory: list[tuple[int, float]] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return self.mean_sum / max(1, self.updates)

    @property
    def attn_frac(self) -> float:
        return self.attn_frac_sum / max(1, self.updates)


class GateMonitor:
    def __init__(self, n_layers: int, collapse_eps: float = 0.02, early_steps: int = 1000,
                 trajectory_len: int = 200):
        self.layers = [LayerGateStats() for _ in range(n_layers)]
        self.collapse_eps, self.early_steps, self.trajectory_len = collapse_eps, early_steps, trajectory_len
        self._warned: set[int] = set()

    def update(self, layer_idx: int, stats: dict | None, step: int = 0, tokens: int = 0) -> None:
        """Fold one forward's statistics of layer `layer_idx` in (None: the layer has no gate)."""
        if stats is None:
            return
        s = self.layers[layer_idx]
        mean = float(stats["mean"])  # host sync: only on gate-statistics steps
        s.updates += 1
        s.tokens += tokens
        s.mean_sum += mean
        s.attn_frac_sum += float(stats["attn_frac"])
        hist = stats["hist"].detach().float().cpu()
        s.hist = hist.tolist() if not s.hist else [a + b for a, b in zip(s.hist, hist.tolist())]
        cm = stats["channel_mean"].detach().float().cpu()
        s.channel_mean_sum = cm if s.channel_mean_sum is None else s.channel_mean_sum + cm
        s.trajectory.append((step, mean))
        del s.trajectory[:-self.trajectory_len]
        collapsed = mean < self.collapse_eps or mean > 1 - self.collapse_eps
        if collapsed and step < self.early_steps and layer_idx not in self._warned:
            self._warned.add(layer_idx)
            side = "attention" if mean < self.collapse_eps else "Mamba"
            log.warning("gate of layer %d collapsed early (step %d, mean %.4f): the %s branch is "
                        "switched off; lower loss.gate_reg_weight or check the branch norms",
                        layer_idx, step, mean, side)

    def summary(self) -> list[dict]:
        out = []
        for i, s in enumerate(self.layers):
            if not s.updates:
                continue
            out.append({"layer": i, "mean_gate": s.mean, "attn_frac": s.attn_frac, "updates": s.updates,
                        "tokens": s.tokens, "hist": s.hist})
        return out

    def scalars(self) -> dict[str, float]:
        """Flat metrics for logging: gate/L{i}/mean and gate/L{i}/attn_frac."""
        d = {}
        for row in self.summary():
            d[f"gate/L{row['layer']}/mean"] = row["mean_gate"]
            d[f"gate/L{row['layer']}/attn_frac"] = row["attn_frac"]
        return d

    def pruning_plan(self, off_threshold: float = 0.05, frac_threshold: float = 0.02) -> dict:
        prune, layers = [], []
        for row in self.summary():
            mean, frac = row["mean_gate"], row["attn_frac"]
            branch = off_branch(mean, frac, off_threshold, frac_threshold)
            evidence = {"mean_gate": mean, "frac_attention_preferred": frac,
                        "frac_mamba_preferred": 1 - frac, "updates": row["updates"], "tokens": row["tokens"]}
            layers.append({"layer": row["layer"], "off": branch, **evidence})
            if branch is not None:
                prune.append({"layer": row["layer"], "branch": branch, "evidence": evidence})
        return {"version": 1, "gate_meaning": "g = weight of attention; 1 - g = weight of Mamba",
                "thresholds": {"off_threshold": off_threshold, "frac_threshold": frac_threshold},
                "prune": prune, "layers": layers}

    def pruning_plan_json(self, off_threshold: float = 0.05, frac_threshold: float = 0.02) -> str:
        plan = self.pruning_plan(off_threshold, frac_threshold)
        if any(math.isnan(r["mean_gate"]) for r in plan["layers"]):
            raise ValueError("gate statistics contain NaN; the plan would be meaningless")
        return json.dumps(plan, indent=2)

    def export_pruning_plan(self, path: str | Path, off_threshold: float = 0.05,
                            frac_threshold: float = 0.02) -> dict:
        text = self.pruning_plan_json(off_threshold, frac_threshold)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return json.loads(text)

    def state_dict(self) -> dict:
        return {"layers": [{"updates": s.updates, "tokens": s.tokens, "mean_sum": s.mean_sum,
                            "attn_frac_sum": s.attn_frac_sum, "hist": s.hist,
                            "channel_mean_sum": s.channel_mean_sum, "trajectory": s.trajectory}
                           for s in self.layers], "warned": sorted(self._warned)}

    def load_state_dict(self, sd: dict) -> None:
        self.layers = [LayerGateStats(updates=d["updates"], tokens=d["tokens"], mean_sum=d["mean_sum"],
                                      attn_frac_sum=d["attn_frac_sum"], hist=list(d["hist"]),
                                      channel_mean_sum=d["channel_mean_sum"],
                                      trajectory=[tuple(t) for t in d["trajectory"]]) for d in sd["layers"]]
        self._warned = set(sd["warned"])
