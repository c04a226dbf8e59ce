"""Positions, SRTE routing, cache sizes, gate statistics, parameter tags and input errors."""

import pytest
import torch

from fusiontree.models.config import model_preset
from fusiontree.models import HybridLanguageModel
from fusiontree.models.block import HybridBlock
from fusiontree.models.cache import SeqInfo
from fusiontree.models.layers import cast_model, split_linear
from fusiontree.models.positions import RotaryPositionalEmbedding
from fusiontree.ops import reference_kernels
from fusiontree.train.mechanics import apply_activation_checkpointing
from tests.models.conftest import build


def test_rope_scores_depend_only_on_position_difference():
    rope = RotaryPositionalEmbedding(16)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 2, 16, generator=g), torch.randn(1, 1, 2, 16, generator=g)

    def score(pq, pk):
        rq, rk = rope(q, k, torch.tensor([[pq]]), torch.tensor([[pk]]))
        return (rq * rk).sum(-1)

    for diff in (0, 3, 17):
        ref = score(diff, 0)
        for shift in (1, 100, 5000):
            torch.testing.assert_close(score(diff + shift, shift), ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(3, 0), score(4, 0))


def test_rope_table_op_passes_opcheck_and_compiled_rotation_reads_it():
    """The compiled rotation takes cos and sin from the table op (computed once per call, as in
    eager), so its outputs and gradients equal eager's exactly, on q and k of different head
    counts and on keys at other positions than the queries."""
    rope = RotaryPositionalEmbedding(32)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 9000], [5, 6, 7, 8, 9, 10, 11]])
    torch.library.opcheck(torch.ops.fusiontree.rope_cos_sin.default, (pos, rope.inv_freq))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 7, 4, 32, generator=g).bfloat16().requires_grad_()
    k = torch.randn(2, 7, 2, 32, generator=g).bfloat16().requires_grad_()
    k_pos = pos.flip(-1)

    def run(fn):
        for p in (q, k):
            p.grad = None
        outs = [*fn(q, k, pos, pos), *fn(q, k, pos, k_pos)]
        sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        return [o.detach() for o in outs] + [q.grad.clone(), k.grad.clone()]

    eager = run(rope)
    compiled = run(torch.compile(rope, backend="inductor", fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_attention_output_is_shift_invariant_and_uses_given_positions():
    model = build("window-only", seed=1)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model(ids).logits
        shifted = model(ids, position_ids=torch.arange(100, 140)[None]).logits
        torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
        # positions come from position_ids, not from the input length: a different spacing changes them
        assert not torch.allclose(model(ids, position_ids=2 * torch.arange(40)[None]).logits, base, atol=1e-3)


def test_srte_reaches_the_mamba_branch_only():
    cfg = model_preset("debug")
    block = HybridBlock(cfg, 0, reference_kernels())
    block.init_weights()
    seen = {}
    block.attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("attn", a[0].clone()))
    block.mamba.register_forward_pre_hook(lambda m, a: seen.__setitem__("mamba", a[0].clone()))
    x = torch.randn(1, 12, cfg.d_model)
    pos = torch.arange(12)[None]
    info = SeqInfo(position_ids=pos, key_pos=pos)
    block(x, info)
    attn_off, mamba_off = seen["attn"], seen["mamba"]
    torch.testing.assert_close(attn_off, mamba_off)  # SRTE projection starts at zero
    with torch.no_grad():
        block.srte.proj.weight.normal_()
    block(x, info)
    torch.testing.assert_close(seen["attn"], attn_off)
    assert (seen["mamba"] - mamba_off).abs().max() > 1e-2
    # and only the Mamba branch's output depends on SRTE's weights
    out, _ = block(x, info)
    grad = torch.autograd.grad(block.attn(seen["attn"], info).sum(), block.srte.proj.weight, allow_unused=True)[0]
    assert grad is None


def test_window_cache_does_not_grow_with_context():
    model = build("window-only")
    small, _ = model.allocate_inference_cache(1, 64)
    large, _ = model.allocate_inference_cache(1, 2048)
    assert small.nbytes() == large.nbytes()
    assert all(c.slots == model.cfg.window for c in large.layers)
    hybrid = build("parallel-channel")
    kv, ms = hybrid.allocate_inference_cache(1, 2048)
    slots = [c.slots for c in kv.layers]
    assert slots == [hybrid.cfg.window, 2048]  # debug: one local layer, one global layer
    assert all(s is not None for s in ms.layers)


def test_gate_statistics_per_layer():
    model = build("parallel-channel")
    with torch.no_grad():
        model.layers[0].gate.bias.fill_(-10.0)  # layer 0: attention switched off
        model.layers[1].gate.bias.fill_(10.0)   # layer 1: Mamba switched off
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    out = model(ids, collect_gate_stats=True)
    s0, s1 = out.gate_stats
    assert s0["mean"] < 1e-3 and s0["attn_frac"] == 0
    assert s1["mean"] > 1 - 1e-3 and s1["attn_frac"] == 1
    assert s0["channel_mean"].shape == (model.cfg.d_model,) and s0["hist"].sum() == model.cfg.d_model
    tok = build("parallel-token")
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    st = tok(ids, attention_mask=mask, collect_gate_stats=True).gate_stats[0]
    assert st["hist"].sum() == 14 * tok.cfg.d_model  # padding tokens are left out
    assert model(ids).gate_stats is None
    assert build("transformer").forward(ids, collect_gate_stats=True).gate_stats == [None] * 3


def test_fp32_parameters_and_no_weight_decay_tags():
    torch.manual_seed(0)
    model = HybridLanguageModel(model_preset("debug"))
    mixer = model.layers[0].mamba
    for p in (mixer.A_log, mixer.D, mixer.dt_bias):
        assert p._no_weight_decay and p._keep_fp32
    assert model.layers[0].norm_in.weight._no_weight_decay
    assert not getattr(mixer.in_proj.weight, "_no_weight_decay", False)
    cast_model(model, torch.bfloat16)
    assert mixer.A_log.dtype == torch.float32 and mixer.in_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(0, model.cfg.vocab_size, (1, 20))
    assert torch.isfinite(model(ids).logits.float()).all()


def _bad(model, match, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        model(*args, **kwargs)


def test_bad_input_raises_clear_errors():
    model = build("parallel-channel")
    V, L = model.cfg.vocab_size, model.cfg.max_seq_len
    ok = torch.randint(0, V, (2, 5))
    _bad(model, r"token ids must lie in \[0, 512\)", torch.tensor([[1, V]]))
    _bad(model, "token ids must lie", torch.tensor([[-1, 2]]))
    _bad(model, "empty input", torch.zeros(2, 0, dtype=torch.long))
    _bad(model, "int64 or int32", ok.float())
    _bad(model, r"shape \[batch, time\]", ok[0])
    _bad(model, "position_ids must lie", ok, position_ids=torch.full((2, 5), L))
    _bad(model, "exceed the configured maximum", torch.zeros(1, L + 1, dtype=torch.long))
    kv, ms = model.allocate_inference_cache(3, 16)
    _bad(model, "allocated for batch size 3", ok, past_key_values=kv, past_mamba_states=ms)
    kv, ms = model.allocate_inference_cache(2, 8)
    model(ok, past_key_values=kv, past_mamba_states=ms)
    _bad(model, "allocated for 8 tokens and holds 5", ok, past_key_values=kv, past_mamba_states=ms)
    assert kv.seen_tokens == ms.seen_tokens == 5  # the refused call changed nothing
    _bad(model, "left-padded", ok, attention_mask=torch.tensor([[1, 1, 0, 1, 1]] * 2))
    _bad(model, "packed documents", ok, seq_idx=torch.zeros(2, 5, dtype=torch.long),
         past_key_values=model.allocate_inference_cache(2, 8)[0])
    _bad(model, "seq_idx must be non-decreasing", ok, seq_idx=torch.tensor([[0, 0, 1, 1, 0]] * 2))
    with pytest.raises(ValueError, match="max_length"):
        model.allocate_inference_cache(1, L + 1)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = build("parallel-token").train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 33))

    def run():
        model.zero_grad()
        out = model(ids)
        loss = out.logits.float().logsumexp(-1).mean() + sum(g.mean() for g in out.gates if g is not None)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    calls = []
    mlp_forward = model.layers[0].mlp.forward
    model.layers[0].mlp.forward = lambda *a: calls.append(1) or mlp_forward(*a)
    base_loss, base_grads = run()
    assert len(calls) == 1
    apply_activation_checkpointing(model)
    ck_loss, ck_grads = run()
    assert len(calls) == 3  # the block ran again in the backward pass
    torch.testing.assert_close(ck_loss, base_loss)
    for a, b in zip(ck_grads, base_grads):
        torch.testing.assert_close(a, b)


def test_checkpoint_num_layers_recomputes_only_the_first_blocks():
    model = build("parallel-token", n_layers=3, attn_pattern="LLG").train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 33))
    calls = {i: [] for i in range(3)}
    for i, layer in enumerate(model.layers):
        fwd = layer.mlp.forward
        layer.mlp.forward = lambda *a, _f=fwd, _i=i: calls[_i].append(1) or _f(*a)

    def run():
        model.zero_grad()
        model(ids).logits.float().logsumexp(-1).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    base = run()
    apply_activation_checkpointing(model, num_layers=2)
    got = run()
    # one forward each without checkpointing; then blocks 0 and 1 ran again in the backward pass
    assert [len(calls[i]) for i in range(3)] == [3, 3, 2]
    for a, b in zip(got, base):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("shape,sizes,used", [
    ((2, 37, 24), (16, 40, 3), (True, True, True)),   # the mixer's layout: two wide parts and a narrow one
    ((5, 24), (7, 9), (False, True)),                 # 2-D input; the first part unused
    ((2, 3, 24), (8, 8, 8), (True, False, True)),     # the middle part unused
])
def test_split_linear_matches_the_split_of_one_linear(shape, sizes, used, compiled):
    """Outputs equal to F.linear(...).split(...); input and weight gradients equal to its
    autograd's (fp64), with parts that took no part in the loss, eager and compiled."""
    torch.manual_seed(len(sizes))
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(sum(sizes), shape[-1], dtype=torch.float64, requires_grad=True)
    grads_out = [torch.randn(*shape[:-1], n, dtype=torch.float64) for n in sizes]

    def loss(parts):
        return sum((p * g).sum() for p, g, u in zip(parts, grads_out, used) if u)

    fn = torch.compile(split_linear, backend="aot_eager", fullgraph=True) if compiled else split_linear
    parts = fn(x, w, sizes)
    want = torch.nn.functional.linear(x, w).split(sizes, -1)
    assert len(parts) == len(sizes) and all(torch.allclose(p, q, rtol=0, atol=1e-12) for p, q in zip(parts, want))
    got_g = torch.autograd.grad(loss(parts), [x, w])
    want_g = torch.autograd.grad(loss(want), [x, w])
    for g, h in zip(got_g, want_g):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)
