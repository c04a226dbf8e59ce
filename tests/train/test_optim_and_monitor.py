"""Parameter groups, the skipping optimizer, lr schedules and the gate monitor."""

import json
import logging

import pytest
import torch

from fusiontree.models.config import model_preset
from fusiontree.models import HybridLanguageModel
from fusiontree.train.gate_monitor import GateMonitor
from fusiontree.train.optim import SkippableAdamW, lr_at, param_groups


def test_weight_decay_skips_norms_biases_and_ssm_parameters():
    model = HybridLanguageModel(model_preset("debug"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    for n in ("layers.0.mamba.A_log", "layers.0.mamba.D", "layers.0.mamba.dt_bias", "layers.0.mamba.conv_bias",
              "layers.0.norm_in.weight", "layers.0.mamba.norm.weight", "layers.0.gate.bias", "norm_out.weight"):
        assert n in nd, n
    for n in ("layers.0.attn.wq.weight", "layers.0.mamba.in_proj.weight", "layers.0.mlp.w_up.weight", "embed.weight"):
        assert n in d, n
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.1
    assert len(nd) + len(d) == len(list(model.parameters()))


def test_skippable_adamw_applies_nothing_on_non_finite_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SkippableAdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert opt.last_step_skipped and torch.equal(p.data, torch.ones(3)) and not opt.state[p]
    p.grad = torch.tensor([1.0, 1.0, 1.0])
    opt.step()
    assert not opt.last_step_skipped and (p.data < 1).all() and opt.state[p]["step"] == 1
    before = p.data.clone()
    opt.skip_next = True
    opt.step()
    assert opt.last_step_skipped and torch.equal(p.data, before) and opt.state[p]["step"] == 1


def test_lr_schedules():
    kw = dict(lr_peak=1.0, warmup_steps=10, total_steps=110, lr_min_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0) and lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # cosine midpoint
    wsd = dict(kw, decay="wsd", decay_fraction=0.2)
    assert lr_at(80, **wsd) == pytest.approx(1.0) and lr_at(110, **wsd) == pytest.approx(0.1)
    assert lr_at(99, **wsd) == pytest.approx(1.0 - 0.9 * 11 / 22)
    with pytest.raises(ValueError, match="lr_decay"):
        lr_at(50, **dict(kw, decay="linear"))


def _stats(mean, frac, D=4):
    return {"mean": torch.tensor(mean), "attn_frac": torch.tensor(frac), "channel_mean": torch.full((D,), mean),
            "hist": torch.tensor([1.0] * 10)}


def test_gate_monitor_plan_and_collapse_warning(tmp_path, caplog):
    mon = GateMonitor(3, early_steps=100)
    with caplog.at_level(logging.WARNING):
        for step in (10, 20):
            mon.update(0, _stats(0.01, 0.0), step=step, tokens=64)  # attention off
            mon.update(1, _stats(0.5, 0.5), step=step, tokens=64)   # undecided
            mon.update(2, _stats(0.99, 1.0), step=step, tokens=64)  # Mamba off
    assert "layer 0 collapsed early" in caplog.text and "layer 2 collapsed early" in caplog.text
    assert caplog.text.count("collapsed early") == 2  # warned once per layer
    plan = mon.export_pruning_plan(tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text()) == plan
    assert [(p["layer"], p["branch"]) for p in plan["prune"]] == [(0, "attention"), (2, "mamba")]
    assert plan["prune"][0]["evidence"]["mean_gate"] == pytest.approx(0.01)
    assert plan["prune"][0]["evidence"]["tokens"] == 128
    assert mon.summary()[1]["hist"] == [2.0] * 10
    mon2 = GateMonitor(3)
    mon2.load_state_dict(mon.state_dict())
    assert mon2.pruning_plan() == mon.pruning_plan()


def test_gate_monitor_reads_the_models_statistics():
    torch.manual_seed(0)  # the init and the ids: the other layer's gate stays undecided in every run
    model = HybridLanguageModel(model_preset("debug"))
    with torch.no_grad():
        model.layers[1].gate.bias.fill_(8.0)
    out = model(torch.randint(0, 512, (2, 16)), collect_gate_stats=True)
    mon = GateMonitor(2)
    for i, s in enumerate(out.gate_stats):
        mon.update(i, s, step=1)
    plan = mon.pruning_plan()
    assert [(p["layer"], p["branch"]) for p in plan["prune"]] == [(1, "mamba")]


def test_gpu_busy_time_is_the_union_of_device_intervals():
    from types import SimpleNamespace as NS

    from fusiontree.train.metrics import gpu_busy_ms

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(a, b, dev=cuda):
        return NS(device_type=dev, time_range=NS(start=a, end=b))

    # overlapping kernels (two streams) count once, nested ones not at all, host events never
    events = [ev(0, 1000), ev(500, 1500), ev(600, 700), ev(3000, 3500), ev(0, 10_000, cpu), ev(4000, 4000)]
    assert gpu_busy_ms(events) == (2.0, 4)
    assert gpu_busy_ms([]) == (0.0, 0)
