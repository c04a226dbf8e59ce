"""Parallel config validation and checkpoint resharding, in one process.

Legend: k tensor-parallel size, I Mamba inner width, G SSM groups, N SSM state, Hs Mamba heads.
"""

import dataclasses

import pytest
import torch

from fusiontree.config import ParallelConfig, load_config
from fusiontree.models.config import model_preset
from fusiontree.models import HybridLanguageModel
from fusiontree.parallel import consolidate_state_dicts, shard_state_dict, tensor_parallel_splits


def debug(**overrides):
    return dataclasses.replace(model_preset("debug"), **{"ssm_groups": 2, **overrides})


@pytest.mark.parametrize("overrides, parallel, match", [
    (dict(), dict(tensor_parallel=0), "must be >= 1"),
    (dict(), dict(tensor_parallel=1, sequence_parallel=True), "needs tensor_parallel > 1"),
    (dict(n_heads=4, n_kv_heads=2), dict(tensor_parallel=3), "n_heads=4 is not divisible"),
    (dict(n_heads=6, n_kv_heads=3), dict(tensor_parallel=2), "kv heads are split"),
    (dict(ssm_groups=1), dict(tensor_parallel=2), "ssm_groups=1 is not divisible"),
    (dict(mixer="mamba", ssm_head_dim=32, ssm_groups=1), dict(tensor_parallel=8), "Mamba heads"),
    (dict(mlp_hidden=99, n_heads=4, ssm_groups=4), dict(tensor_parallel=2), "MLP hidden size 99"),
    (dict(max_seq_len=2047), dict(tensor_parallel=2, sequence_parallel=True), "max_seq_len=2047"),
])
def test_validation_names_the_fix(overrides, parallel, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**parallel).validate(debug(**overrides))


def test_valid_layouts_pass():
    ParallelConfig(tensor_parallel=2, sequence_parallel=True).validate(debug())
    ParallelConfig(tensor_parallel=4).validate(debug(n_kv_heads=1, ssm_groups=4))  # kv heads replicated
    ParallelConfig(tensor_parallel=2).validate(debug(mixer="attention", ssm_groups=1))  # no Mamba branch
    with pytest.raises(ValueError, match="sequence length=33"):
        ParallelConfig(tensor_parallel=2, sequence_parallel=True).validate(debug(), seq_lens=[32, 33])


def test_run_config_validates_the_parallel_section():
    cfg = load_config(None, ["--parallel.tensor_parallel=2", "--parallel.sequence_parallel=true",
                             "--model.ssm_groups=2"])
    assert cfg.parallel == ParallelConfig(tensor_parallel=2, sequence_parallel=True)
    with pytest.raises(ValueError, match="ssm_groups"):
        load_config(None, ["--parallel.tensor_parallel=2"])  # the debug preset has one SSM group
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, ["--parallel.pipeline_parallel=2"])


def _plain_state(cfg, seed=0):
    torch.manual_seed(seed)
    return HybridLanguageModel(cfg).state_dict()


@pytest.mark.parametrize("tp, overrides", [(2, dict()), (2, dict(n_kv_heads=1, gate="token")),
                                           (4, dict(n_kv_heads=2, ssm_groups=4)), (4, dict(block="serial",
                                                                                         ssm_groups=4))])
def test_shard_then_consolidate_is_exact(tp, overrides):
    cfg = debug(**overrides)
    sd = _plain_state(cfg)
    shards = [shard_state_dict(sd, cfg, tp, r) for r in range(tp)]
    splits = tensor_parallel_splits(cfg)
    for name, t in sd.items():
        for r in range(tp):
            want = t.shape if name not in splits else \
                t.shape[:splits[name].dim] + (sum(splits[name].local_sizes(tp)),) + t.shape[splits[name].dim + 1:]
            assert shards[r][name].shape == want, name
    back = consolidate_state_dicts(shards, cfg)
    assert list(back) == list(sd)
    for name in sd:
        assert torch.equal(back[name], sd[name]), name


def test_fused_in_proj_is_partitioned_per_component():
    cfg = debug()
    I, G, N, Hs = cfg.ssm_d_inner, cfg.ssm_groups, cfg.ssm_state, cfg.ssm_heads
    w = torch.arange(2 * I + 2 * G * N + Hs, dtype=torch.float32)[:, None].expand(-1, 3).contiguous()
    sd = {"layers.0.mamba.in_proj.weight": w}
    z, x, Bm, Cm, dt = w.split([I, I, G * N, G * N, Hs])
    for r in range(2):
        half = lambda t: t.chunk(2)[r]  # noqa: E731
        want = torch.cat([half(z), half(x), half(Bm), half(Cm), half(dt)])
        assert torch.equal(shard_state_dict(sd, cfg, 2, r)["layers.0.mamba.in_proj.weight"], want)


def test_replicated_kv_heads_go_to_the_ranks_that_use_them():
    cfg = debug(n_kv_heads=1, ssm_groups=4)
    sd = _plain_state(cfg)
    wk = sd["layers.0.attn.wk.weight"]
    for r in range(4):
        assert torch.equal(shard_state_dict(sd, cfg, 4, r)["layers.0.attn.wk.weight"], wk)
    cfg2 = debug(n_kv_heads=2, n_heads=4, ssm_groups=4)
    wk2 = _plain_state(cfg2)["layers.0.attn.wk.weight"]
    E = cfg2.attn_head_dim
    # four ranks, one query head each; heads 0, 1 use kv head 0 and heads 2, 3 kv head 1
    got = [shard_state_dict({"layers.0.attn.wk.weight": wk2}, cfg2, 4, r)["layers.0.attn.wk.weight"] for r in range(4)]
    assert torch.equal(got[1], wk2[:E]) and torch.equal(got[2], wk2[E:])


def test_consolidation_rejects_mismatched_state_dicts():
    cfg = debug()
    sd = _plain_state(cfg)
    a, b = shard_state_dict(sd, cfg, 2, 0), shard_state_dict(sd, cfg, 2, 1)
    b.pop("layers.0.mlp.w_up.weight")
    with pytest.raises(ValueError, match="other keys"):
        consolidate_state_dicts([a, b], cfg)
    with pytest.raises(ValueError, match="should have"):
        shard_state_dict(sd, debug(mlp_hidden=256), 2, 0)
