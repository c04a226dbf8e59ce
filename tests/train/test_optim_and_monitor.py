"""Parameter groups, the skipping optimizer, lr schedules and the gate monitor."""

import dataclasses
import json
import logging
import subprocess
import sys

import pytest
import torch

from fusiontree.models.config import model_preset
from fusiontree.models import HybridLanguageModel
from fusiontree.train.gate_monitor import GateMonitor
from fusiontree.train.optim import ALIGN_ELEMENTS, SkippableAdamW, build_optimizer, lr_at, param_groups
from tests.train.conftest import ROOT, env


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


def _odd_head_model() -> HybridLanguageModel:
    # 2 SSM heads: A_log, D and dt_bias of 2 elements, as a tensor-parallel rank of a small model has
    return HybridLanguageModel(dataclasses.replace(model_preset("debug"), d_model=64, ssm_head_dim=64, n_layers=3))


def test_parameters_of_odd_sizes_get_groups_of_their_own_with_their_weight_decay():
    model = _odd_head_model()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.1)
    assert [g["name"] for g in groups[:2]] == ["decay", "no_decay"]
    offsets = {}
    for g in groups:
        at = 0
        for p in g["params"]:
            offsets[names[id(p)]] = at
            at += p.numel()
    assert sorted(offsets) == sorted(names.values())
    assert all(at % ALIGN_ELEMENTS == 0 for at in offsets.values()), offsets
    alone = {g["name"]: g for g in groups[2:]}
    assert {"layers.2.mamba.A_log", "layers.2.mamba.D", "layers.2.mamba.dt_bias"} <= set(alone)
    assert all(len(g["params"]) == 1 and g["params"][0].numel() % ALIGN_ELEMENTS for g in alone.values())
    assert all(g["weight_decay"] == 0.0 for g in alone.values())  # per-head vectors: no decay
    assert param_groups(model, 0.1)[2]["name"] == groups[2]["name"]  # the same order every time


ALIGNED_UNDER_DEEPSPEED = """
import deepspeed, torch
from fusiontree.train.distributed import init_distributed
from fusiontree.train.optim import misaligned_parameters, param_groups
from tests.train.test_optim_and_monitor import _odd_head_model
init_distributed(device="cpu")
for stage in (1, 2):
    model = _odd_head_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True})
    params = dict(engine.module.named_parameters())
    flat = sum(p.storage_offset() > 0 for p in params.values())
    assert flat > 0, "DeepSpeed no longer flattens the groups: this check checks nothing"
    assert all(torch.equal(params[n].float(), before[n].bfloat16().float()) for n in before)
    print("stage", stage, "views", flat, "misaligned", misaligned_parameters(engine.module))
"""


def test_deepspeed_places_every_parameter_on_a_16_byte_boundary():
    """The property compiled blocks rely on, through DeepSpeed's own flattening (bf16: ZeRO-1
    and 2 flatten the groups; ZeRO-0 on CPU does not): no parameter starts off a 16-byte boundary,
    for a model with 2-element head vectors."""
    res = subprocess.run([sys.executable, "-c", ALIGNED_UNDER_DEEPSPEED], env=env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("stage")]
    assert len(lines) == 2 and all(line.endswith("misaligned []") for line in lines), res.stdout


# The host decision (multi-tensor and fused AdamW) and the decision left on the device, where
# the fused kernel skips the update itself.
SKIP_MODES = [{}, {"fused": True}, {"fused": True, "skip_on_device": True}]


@pytest.mark.parametrize("kw", SKIP_MODES)
def test_skippable_adamw_applies_nothing_on_non_finite_gradients(kw):
    p = torch.nn.Parameter(torch.ones(3))
    opt = SkippableAdamW([p], lr=0.1, **kw)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert opt.last_step_skipped and torch.equal(p.data, torch.ones(3))
    assert opt.skipped_flag(torch.device("cpu")).item() == 1.0
    # no state, or (a skip on the device) the untouched state of a first step
    assert not opt.state[p] or (opt.state[p]["step"] == 0 and not opt.state[p]["exp_avg"].any()
                                and not opt.state[p]["exp_avg_sq"].any())
    p.grad = torch.tensor([1.0, 1.0, 1.0])
    opt.step()
    assert not opt.last_step_skipped and (p.data < 1).all() and opt.state[p]["step"] == 1
    before = p.data.clone()
    opt.skip_next = True
    opt.step()
    assert opt.last_step_skipped and torch.equal(p.data, before) and opt.state[p]["step"] == 1


@pytest.mark.parametrize("kw", SKIP_MODES)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_one_non_finite_gradient_among_many_skips_the_step(bad, kw):
    params = [torch.nn.Parameter(torch.ones(n, dtype=dt)) for n, dt in
              ((5, torch.float32), (1, torch.float32), (7, torch.bfloat16), (3, torch.float32))]
    opt = SkippableAdamW(params, lr=0.1, **kw)
    for i in range(len(params)):
        for j, p in enumerate(params):
            p.grad = torch.full_like(p, 1e3)
            if j == i:
                p.grad[-1] = bad
        opt.step()
        assert opt.last_step_skipped and all(torch.equal(p.data, torch.ones_like(p)) for p in params)
    for p in params:  # large but finite gradients are applied
        p.grad = torch.full_like(p, 1e18)
    opt.step()
    assert not opt.last_step_skipped and all((p.data < 1).all() for p in params)


# What the DeepSpeed scripts below share: a process group over gloo, and an engine built the
# way the trainer builds it (deepspeed_config from a ZeRO-stage file) around a small model whose
# layers are made after torch.manual_seed(0).
DEEPSPEED_PRELUDE = """
import dataclasses, json, tempfile, deepspeed, torch
from fusiontree.config import RunConfig
from fusiontree.train.distributed import init_distributed
from fusiontree.train.optim import SkippableAdamW, param_groups
from fusiontree.train.trainer import deepspeed_config, follow_deepspeed_norm

init_distributed(device="cpu")

def small_engine(stage, make_layers, make_opt, cfg=None, accum=1, bf16=True, pass_optimizer=True):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"zero_optimization": {"stage": stage}}, f)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*make_layers())
    opt = make_opt(model)
    ds = deepspeed_config(f.name, cfg or RunConfig(), 2, accum, bf16=bf16, optimizer=opt if pass_optimizer else None)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return engine, opt, ds
"""


def run_deepspeed_script(body: str) -> str:
    """stdout of DEEPSPEED_PRELUDE + `body` in a fresh process (DeepSpeed's state stays there)."""
    res = subprocess.run([sys.executable, "-c", DEEPSPEED_PRELUDE + body], env=env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


SKIPS_UNDER_DEEPSPEED_BF16 = """
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

def refuse(*args, **kwargs):
    raise AssertionError("DeepSpeed's per-parameter overflow check ran")

DeepSpeedZeroOptimizer.has_overflow = refuse
modes = [{"foreach": True}, {"fused": True}, {"fused": True, "skip_on_device": True}]
for stage, kw in [(stage, kw) for kw in modes for stage in (1, 2)]:
    engine, opt, _ = small_engine(stage, lambda: [torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)],
                                  lambda m: SkippableAdamW(m.parameters(), lr=1e-2, **kw), pass_optimizer=False)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    before = [p.detach().clone() for p in engine.module.parameters()]
    for bad in (float("nan"), float("inf")):
        engine.backward(engine(x).float().sum() * bad)
        engine.step()
        same = all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
        print("stage", stage, "bad", bad, "skipped", opt.last_step_skipped, "unchanged", same)
    engine.backward(engine(x).float().sum())
    engine.step()
    changed = all(not torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
    print("stage", stage, "finite skipped", opt.last_step_skipped, "changed", changed)
"""


def test_bf16_deepspeed_steps_skip_non_finite_gradients_by_the_optimizers_check_alone():
    """Under DeepSpeed bf16 (ZeRO-1 and 2, clipping on; multi-tensor AdamW, fused AdamW, and fused
    AdamW skipping on the device) the optimizer's check decides the skip; DeepSpeed's own
    per-parameter overflow check is off and must not run."""
    out = run_deepspeed_script(SKIPS_UNDER_DEEPSPEED_BF16)
    lines = [line for line in out.splitlines() if line.startswith("stage")]
    assert lines == [f"stage {s} bad {b} skipped True unchanged True" if b != "finite" else
                     f"stage {s} finite skipped False changed True"
                     for s in (1, 2) * 3 for b in ("nan", "inf", "finite")], out


CLIPS_UNDER_DEEPSPEED = """
import deepspeed.runtime.zero.stage_1_and_2 as zero12

host_reads = [0]  # DeepSpeed's host check of the norm, which its clipping calls
check = zero12.is_invalid_grad_norm
def counted(norm):
    host_reads[0] += 1
    return check(norm)
zero12.is_invalid_grad_norm = counted

def run(stage, bf16, on_device, clip):
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_clip=clip))
    # eps=1: the update follows the gradient's size, so the clip factor shows in the weights
    engine, opt, ds = small_engine(
        stage, lambda: [torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)],
        lambda m: SkippableAdamW(param_groups(m, 0.1), lr=1e-2, eps=1.0, fused=True, skip_on_device=on_device),
        cfg=cfg, accum=2, bf16=bf16)
    follow_deepspeed_norm(engine, opt, clip)
    host_reads[0] = 0
    norms, skipped = [], []
    for step in range(4):
        ds_skips = engine.skipped_steps  # in fp32 DeepSpeed skips a non-finite step itself
        for micro in range(2):
            x = torch.randn(2, 16, dtype=torch.bfloat16 if bf16 else torch.float32) * (1 + 3 * step)
            loss = engine(x).float().pow(2).sum() * (float("nan") if step == 2 and micro == 1 else 1.0)
            engine.backward(loss)
            engine.step()
        norms.append(float(engine.get_global_grad_norm()))
        skipped.append(opt.last_step_skipped or engine.skipped_steps > ds_skips)
    master = torch.cat([p.detach().float().flatten() for p in engine.optimizer.single_partition_of_fp32_groups])
    return {"ds_clip": ds["gradient_clipping"], "master": master.tolist(), "norms": norms, "skipped": skipped,
            "host_reads": host_reads[0]}

out = {}
for stage, bf16 in ((1, True), (2, True), (1, False)):
    for mode, on_device, clip in (("host", False, 0.5), ("device", True, 0.5), ("unclipped", True, 0.0)):
        out[f"{stage} {bf16} {mode}"] = run(stage, bf16, on_device, clip)
print("RESULT", json.dumps(out))
"""


def test_clipping_inside_the_fused_adamw_takes_deepspeeds_clipped_steps_without_a_host_read():
    """ZeRO-1 and 2 (bf16 and fp32) with the skip decision on the device: DeepSpeed's clipping is
    off and the fused kernel divides by the same clip factor, from DeepSpeed's norm. The fp32
    master weights after clipped, skipped (a NaN step) and accumulated steps match DeepSpeed
    clipping them itself, and in bf16 DeepSpeed's host check of the norm never runs."""
    stdout = run_deepspeed_script(CLIPS_UNDER_DEEPSPEED)
    out = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])
    for case in ("1 True", "2 True", "1 False"):
        host, device, unclipped = (out[f"{case} {mode}"] for mode in ("host", "device", "unclipped"))
        assert (host["ds_clip"], device["ds_clip"], unclipped["ds_clip"]) == (0.5, 0.0, 0.0), case
        # In fp32 DeepSpeed reads the norm once per step for its own overflow decision, clipping aside.
        assert device["host_reads"] == (0 if case.endswith("True") else 4) < host["host_reads"], case
        assert host["skipped"] == device["skipped"] == [False, False, True, False], case
        assert all(n > 0.5 for i, n in enumerate(host["norms"]) if i != 2), (case, host["norms"])  # clipping bites
        h, d, u = (torch.tensor(r["master"]) for r in (host, device, unclipped))
        torch.testing.assert_close(d, h, rtol=1e-5, atol=1e-6, msg=case)
        assert (u - h).abs().max() > 100 * (d - h).abs().max() + 1e-4, case


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA fused kernel needs a GPU"))])
def test_clipping_inside_the_fused_kernel_equals_clipping_the_gradients_first(device):
    """The fused kernel's clip (gradients divided by max(1, (norm + 1e-6) / bound), from a norm
    tensor it reads on the device) against the same factor applied to the gradients before a
    plain fused step, over steps that clip, do not clip, and skip (a non-finite norm)."""
    torch.manual_seed(0)
    shapes = [(7, 3), (5,), (129,), (2, 2, 2)]
    init = [torch.randn(s, device=device) for s in shapes]
    norms = [torch.tensor(v, device=device) for v in (40.0, 0.2, float("inf"), 3.0)]
    grads = [[torch.randn(s, device=device) * 10 for s in shapes] for _ in norms]
    results = []
    for inside in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = SkippableAdamW(params, lr=0.1, weight_decay=0.1, fused=True, skip_on_device=inside)
        step_norm = {}
        if inside:
            opt.follow_global_norm(lambda: step_norm["now"], 0.5)
        for norm, gs in zip(norms, grads):
            step_norm["now"] = norm
            factor = torch.clamp((norm + 1e-6) / 0.5, min=1.0)
            for p, g in zip(params, gs):
                p.grad = g.clone() if inside else g / factor
            if not inside and not torch.isfinite(norm):
                opt.skip_next = True
            opt.step()
            assert opt.last_step_skipped == (not bool(torch.isfinite(norm)))
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not all(torch.allclose(a, t) for a, t in zip(results[0], init))


ONE_GROUP_NON_FINITE = """
for stage in (1, 2):
    for kw in ({"foreach": True}, {"fused": True}, {"fused": True, "skip_on_device": True}):
        engine, opt, _ = small_engine(stage, lambda: [torch.nn.Linear(16, 32), torch.nn.LayerNorm(32)],
                                      lambda m: SkippableAdamW(param_groups(m, 0.1), lr=1e-2, **kw))  # decay, no_decay
        follow_deepspeed_norm(engine, opt, 1.0)
        masters = engine.optimizer.single_partition_of_fp32_groups
        before = [m.detach().clone() for m in masters]
        x = torch.randn(2, 16, dtype=torch.bfloat16)
        # non-finite only in the no-decay group (the norm's bias); the decay group's are finite
        engine.backward(engine(x).float().sum() + engine.module[1].bias.float().sum() * float("inf"))
        engine.step()
        steps = [float(st["step"]) for st in opt.state.values() if "step" in st]
        print("stage", stage, list(kw), "skipped", opt.last_step_skipped,
              "unchanged", all(torch.equal(a, m) for a, m in zip(before, masters)), "adam steps", max(steps, default=0.0))
"""


def test_a_non_finite_gradient_in_one_parameter_group_skips_every_group():
    """ZeRO-1 and 2 step the parameter groups one call at a time; the optimizer follows
    DeepSpeed's global norm, so a non-finite gradient in one group skips the others too (fp32
    master weights and Adam step counts untouched), with the decision on the host or the device."""
    out = run_deepspeed_script(ONE_GROUP_NON_FINITE)
    lines = [line for line in out.splitlines() if line.startswith("stage")]
    assert len(lines) == 6 and all(line.endswith("skipped True unchanged True adam steps 0.0") for line in lines), out


def test_skipping_on_the_device_needs_the_fused_adamw():
    with pytest.raises(ValueError, match="skip_on_device=true needs the fused AdamW"):
        SkippableAdamW([torch.nn.Parameter(torch.ones(2))], foreach=True, skip_on_device=True)


def test_a_skip_on_the_device_takes_the_host_decisions_steps():
    """Fused AdamW with the decision on the device against the host decision: bitwise the same
    weights, moments and step counts through finite, skipped and forced-skip (skip_next) steps."""
    grads = [torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, float("nan"), 0.0]), torch.tensor([0.3, 0.2, -0.1]),
             "skip_next", torch.tensor([1.0, 1.0, float("inf")]), torch.tensor([-0.4, 0.1, 0.9])]
    runs = []
    for on_device in (False, True):
        p = torch.nn.Parameter(torch.ones(3))
        opt = SkippableAdamW([p], lr=0.1, weight_decay=0.1, fused=True, skip_on_device=on_device)
        skipped = []
        for g in grads:
            if isinstance(g, str):
                opt.skip_next, g = True, torch.tensor([2.0, 2.0, 2.0])
            p.grad = g.clone()
            opt.step()
            skipped.append(opt.last_step_skipped)
        runs.append((skipped, p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    assert runs[0][0] == runs[1][0] == [False, True, False, True, True, False]
    assert torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(runs[0][2][k], runs[1][2][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert runs[1][2]["step"] == 3


def _optimizer_cfg(impl):
    from fusiontree.config import TrainConfig

    return dataclasses.replace(TrainConfig(), optimizer_impl=impl, lr_peak=1e-2)


def test_the_skip_decision_is_left_on_the_device_by_default_with_the_fused_adamw_alone():
    model = torch.nn.Linear(4, 8)
    for impl, sod, want in (("fused", "auto", True), ("foreach", "auto", False), ("fused", False, False),
                            ("fused", True, True)):
        opt = build_optimizer(model, dataclasses.replace(_optimizer_cfg(impl), skip_on_device=sod))
        assert opt.skip_on_device is want and bool(opt.defaults.get("fused")) is (impl == "fused"), (impl, sod)
    with pytest.raises(ValueError, match="skip_on_device=true needs the fused AdamW"):
        build_optimizer(model, dataclasses.replace(_optimizer_cfg("foreach"), skip_on_device=True))


def test_fused_and_foreach_adamw_take_the_same_steps():
    """`train.optimizer_impl`: fused and foreach AdamW are one update (same state, same
    parameters after steps with weight decay on both groups); auto is foreach off CUDA."""
    from fusiontree.train.optim import build_optimizer

    torch.manual_seed(0)
    base = HybridLanguageModel(model_preset("debug"))
    ids = torch.randint(0, 512, (2, 24))
    runs = {}
    for impl in ("fused", "foreach", "auto"):
        model = HybridLanguageModel(model_preset("debug"))
        model.load_state_dict(base.state_dict())
        opt = build_optimizer(model, _optimizer_cfg(impl))
        for _ in range(3):
            opt.zero_grad()
            model(ids).logits.float().square().mean().backward()
            opt.step()
        runs[impl] = (opt.defaults, [p.detach().clone() for p in model.parameters()])
    assert runs["fused"][0]["fused"] and not runs["fused"][0]["foreach"]
    assert runs["foreach"][0]["foreach"] and not runs["foreach"][0]["fused"]
    assert runs["auto"][0]["foreach"]  # CPU
    moved = max((a - b).abs().max().item() for a, b in zip(runs["fused"][1], base.parameters()))
    assert moved > 1e-3
    for a, b, c in zip(runs["fused"][1], runs["foreach"][1], runs["auto"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert torch.equal(b, c)
    with pytest.raises(ValueError, match="optimizer_impl"):
        build_optimizer(base, _optimizer_cfg("apex"))


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


def test_profile_groups_every_kernel_by_family_and_ignores_range_spans():
    from types import SimpleNamespace as NS

    from fusiontree.train.metrics import gpu_busy_ms, kernel_categories_table

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, a, b, dev=cuda, annotation=False):
        return NS(name=name, device_type=dev, time_range=NS(start=a, end=b), is_user_annotation=annotation)

    events = [ev("nvjet_sm90_tst_256x128", 0, 2000), ev("_chunk_scan_fwd_kernel", 2000, 3000),
              ev("_bmm_chunk_bwd_kernel", 3000, 3500), ev("triton_poi_fused_add_0", 3500, 4000),
              ev("mystery_kernel", 4000, 4250), ev("mystery_kernel", 9000, 9250),
              ev("fusiontree.forward", 0, 9250, annotation=True), ev("aten::mm", 0, 5000, dev=cpu)]
    # the range's device span covers the idle gap 4.25-9 ms; it is not work
    assert gpu_busy_ms(events) == (4.5, 6)
    lines = kernel_categories_table(events)
    rows = {ln.split(" | ")[0].strip(): ln.split(" | ")[1:] for ln in lines[1:]}
    assert rows["matmuls"] == ["2.0", "44.4%", "1"]
    assert rows["SSD (mamba-ssm)"] == ["1.5", "33.3%", "2"]
    assert rows["Inductor fused kernels"][0] == "0.5"
    assert rows["other"] == ["0.5", "11.1%", "2"]
    assert rows["other: mystery_kernel"] == ["0.5", "2"]
    assert "fusiontree.forward" not in "".join(lines)


def test_device_idle_goes_to_the_host_phase_that_ended_each_gap():
    from types import SimpleNamespace as NS

    from fusiontree.train.metrics import device_idle_table

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, a, b, dev=cuda):
        return NS(name=name, device_type=dev, time_range=NS(start=a, end=b), is_user_annotation=False)

    events = [ev("fusiontree.forward", 0, 3000, cpu), ev("fusiontree.engine_step", 5000, 9000, cpu),
              ev("aten::item", 5100, 7500, cpu), ev("cudaStreamSynchronize", 5200, 7400, cpu),
              ev("k1", 500, 1000), ev("k2", 1004, 2000),   # 4 us apart: queued
              ev("k3", 2500, 2600),                          # 500 us: the forward's host work
              ev("k4", 7600, 8000),                          # 5 ms: ended by the engine step
              ev("k5", 9500, 9600)]                          # 1.5 ms: outside every phase
    lines = device_idle_table(events)
    text = "\n".join(lines)
    assert lines[0].endswith(": 0.5 ms")  # the host's first event at 0, the first kernel at 500 us
    assert lines[1].endswith(": 7.0 ms")  # 0.004 + 0.5 + 5.0 + 1.5
    assert "between queued kernels | 0.0 ms | 1" in text
    rows = {ln.split(" | ")[0].strip(): ln.split(" | ")[1:] for ln in lines if ln.startswith("    ")}
    assert rows == {"fusiontree.engine_step": ["5.0 ms", "1"], "between phases": ["1.5 ms", "1"],
                    "fusiontree.forward": ["0.5 ms", "1"]}
    # what the host did during the gap: the operation covering most of it (aten::item's sync)
    assert "gap 5.00 ms ending in fusiontree.engine_step, host mostly in aten::item; after k3, before k4" in text
    assert "gap 1.50 ms ending in between phases, host mostly in -; after k4, before k5" in text
    assert device_idle_table([])[1].endswith(": 0.0 ms")
