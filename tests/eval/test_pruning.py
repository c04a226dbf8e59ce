"""Pruning a branch whose gate is forced off leaves the outputs unchanged up to round-off."""

import pytest
import torch

from fusiontree.eval.pruning import prune_model
from fusiontree.models.flops import count_params
from fusiontree.inference import generate
from tests.models.conftest import build


@pytest.mark.parametrize("variant", ["parallel-channel", "parallel-token"])
def test_pruning_an_off_branch_keeps_outputs(variant):
    model = build(variant, seed=1)
    with torch.no_grad():
        model.layers[0].gate.bias.fill_(-40.0)  # layer 0: attention off (g ~ 4e-18)
        model.layers[1].gate.bias.fill_(40.0)   # layer 1: Mamba off
        if variant == "parallel-token":
            model.layers[0].gate.up.weight.zero_()
            model.layers[1].gate.up.weight.zero_()
    plan = {"prune": [{"layer": 0, "branch": "attention"}, {"layer": 1, "branch": "mamba"}]}
    pruned = prune_model(model, plan).eval()
    assert pruned.layers[0].attn is None and pruned.layers[1].mamba is None
    assert pruned.layers[0].mamba is not None and pruned.layers[1].attn is not None
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in pruned.parameters()) == count_params(pruned.cfg)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    # decoding with the pruned model's caches still matches its own full forward
    out = generate(pruned, ids[:, :5], 20)
    assert torch.equal(out, generate(pruned, ids[:, :5], 20, use_cache=False))


def test_pruning_a_live_branch_changes_outputs():
    model = build("parallel-channel", seed=2)
    plan = {"prune": [{"layer": 0, "branch": "attention"}]}
    ids = torch.randint(0, model.cfg.vocab_size, (1, 30))
    with torch.no_grad():
        assert not torch.allclose(prune_model(model, plan)(ids).logits, model(ids).logits, atol=1e-3)


def test_bad_plan_entries_are_rejected():
    model = build("transformer")
    with pytest.raises(ValueError, match="names a branch that mixer='attention' does not have"):
        prune_model(model, {"prune": [{"layer": 0, "branch": "mamba"}]})
    with pytest.raises(ValueError, match="0 <= LAYER < n_layers"):
        prune_model(build("parallel-channel"), {"prune": [{"layer": 9, "branch": "mamba"}]})


def _forced_off_checkpoint(tmp_path, eval_shards):
    """A checkpoint whose layer 0 has attention switched off and layer 1 Mamba switched off."""
    from tests.eval.conftest import write_checkpoint

    path, model = write_checkpoint(tmp_path / "ckpt", eval_shards, seed=4)
    state = torch.load(path / "model.pt")
    state["layers.0.gate.bias"].fill_(-40.0)
    state["layers.1.gate.bias"].fill_(40.0)
    torch.save(state, path / "model.pt")
    model.load_state_dict(state)
    return path, model


def test_apply_pruning_writes_a_smaller_checkpoint_with_the_same_outputs(tmp_path, eval_shards):
    from fusiontree.config import load_config
    from fusiontree.checkpoint import checkpoint_tokenizer, load_checkpoint
    from fusiontree.eval.pruning import apply_pruning

    src, model = _forced_off_checkpoint(tmp_path, eval_shards)
    plan = {"prune": [{"layer": 0, "branch": "attention"}, {"layer": 1, "branch": "mamba"}]}
    out = apply_pruning(src, plan, tmp_path / "pruned")
    assert (out / "model.pt").stat().st_size < (src / "model.pt").stat().st_size
    assert load_config(out / "config.yaml").model.pruned == ["0:attention", "1:mamba"]
    pruned = load_checkpoint(out)
    # The tokenizer the source checkpoint keeps travels with the pruned weights.
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert checkpoint_tokenizer(pruned).name == str(out / "tokenizer.model")
    assert pruned.meta["params_after"] == sum(p.numel() for p in pruned.model.parameters()) < \
        pruned.meta["params_before"]
    ids = torch.randint(0, model.cfg.vocab_size, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(pruned.model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="write the pruned copy elsewhere"):
        apply_pruning(src, plan, src)
    with pytest.raises(ValueError, match="not a checkpoint"):
        apply_pruning(tmp_path / "nowhere", plan, tmp_path / "p2")


def test_plan_with_thresholds_rederives_the_plan_from_the_gate_evidence():
    from fusiontree.eval.pruning import plan_with_thresholds
    from fusiontree.train.gate_monitor import GateMonitor

    mon = GateMonitor(3)
    for layer, g in enumerate((0.02, 0.3, 0.9)):
        gate = torch.full((8,), g)
        mon.update(layer, {"mean": gate.mean(), "attn_frac": (gate >= 0.5).float().mean(),
                           "hist": torch.histc(gate, 10, 0, 1), "channel_mean": gate})
    plan = mon.pruning_plan()
    assert [(p["layer"], p["branch"]) for p in plan["prune"]] == [(0, "attention")]
    loose = plan_with_thresholds(plan, off_threshold=0.35, frac_threshold=0.02)
    assert [(p["layer"], p["branch"]) for p in loose["prune"]] == [(0, "attention"), (1, "attention"), (2, "mamba")]
    assert plan_with_thresholds(plan, 0.05, 0.02)["prune"] == plan["prune"]
    with pytest.raises(ValueError, match="no per-layer evidence"):
        plan_with_thresholds({"prune": []}, 0.1, 0.1)
