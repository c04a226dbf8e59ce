"""A block whose attention and Mamba branches were both pruned is its MLP alone."""

import dataclasses

import torch

from fusiontree.config import model_preset
from fusiontree.models import HybridLanguageModel
from tests.models.conftest import perturb_


def test_block_without_branches_runs_and_decodes_like_the_full_forward():
    cfg = dataclasses.replace(model_preset("debug"), n_layers=3, pruned=["1:attention", "1:mamba"])
    torch.manual_seed(0)
    model = perturb_(HybridLanguageModel(cfg)).eval()
    block = model.layers[1]
    assert block.attn is None and block.mamba is None and block.gate is None
    ids = torch.randint(0, cfg.vocab_size, (2, 21))
    with torch.no_grad():
        full = model(ids).logits
        x = torch.randn(2, 5, cfg.d_model)
        from fusiontree.models.cache import SeqInfo

        pos = torch.arange(5).expand(2, 5)
        y, g = block(x, SeqInfo(position_ids=pos, key_pos=pos))
        assert g is None and torch.allclose(y, x + block.mlp(block.norm_mlp(x)))
        kv, ms = model.allocate_inference_cache(2, 21)
        out = model(ids[:, :13], past_key_values=kv, past_mamba_states=ms)
        steps = [out.logits]
        for t in range(13, 21):
            steps.append(model(ids[:, t:t + 1], past_key_values=kv, past_mamba_states=ms).logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
