"""Pruning a branch whose gate is forced off leaves the outputs unchanged up to round-off."""

import pytest
import torch

from fusiontree.eval.pruning import prune_model
from fusiontree.models.flops import count_params
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
    out = pruned.generate(ids[:, :5], 20)
    assert torch.equal(out, pruned.generate(ids[:, :5], 20, use_cache=False))


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
