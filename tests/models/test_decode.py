"""Model invariants: cached decode == full forward, chunked prefill == one-shot prefill,
left-padded batches == rows alone, packed documents == separate documents."""

import pytest
import torch

from fusiontree.inference import generate
from tests.models.conftest import build

TOL = dict(rtol=1e-4, atol=1e-4)


def test_cached_decode_matches_full_forward_every_step(variant):
    model = build(variant)
    window = model.cfg.window
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    new = 3 * window + 5  # the ring buffer wraps three times
    kv, ms = model.allocate_inference_cache(2, prompt.shape[1] + new)
    with torch.no_grad():
        out = model(prompt, past_key_values=kv, past_mamba_states=ms, use_cache=True)
        torch.testing.assert_close(out.logits, model(prompt).logits, **TOL)
        seq = prompt
        for _ in range(new):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            out = model(nxt, past_key_values=kv, past_mamba_states=ms, use_cache=True)
            torch.testing.assert_close(out.logits[:, -1], model(seq).logits[:, -1], **TOL)
    assert kv.seen_tokens == ms.seen_tokens == seq.shape[1]
    cached = generate(model, prompt, new, use_cache=True)
    recomputed = generate(model, prompt, new, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, seq)


def test_chunked_prefill_matches_one_shot(variant):
    model = build(variant, seed=2)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 45), generator=g)
    with torch.no_grad():
        full = model(prompt).logits
        kv, ms = model.allocate_inference_cache(2, 60)
        start, pieces = 0, []
        for size in (1, 5, 17, 3, 19):  # odd sizes, one longer than the window
            pieces.append(model(prompt[:, start:start + size], past_key_values=kv, past_mamba_states=ms).logits)
            start += size
        torch.testing.assert_close(torch.cat(pieces, 1), full, **TOL)
        nxt = torch.randint(0, model.cfg.vocab_size, (2, 1), generator=g)
        step = model(nxt, past_key_values=kv, past_mamba_states=ms).logits
        torch.testing.assert_close(step[:, -1], model(torch.cat([prompt, nxt], 1)).logits[:, -1], **TOL)


def test_left_padded_batch_matches_rows_alone(variant):
    model = build(variant, seed=4)
    g = torch.Generator().manual_seed(5)
    short = torch.randint(4, model.cfg.vocab_size, (1, 7), generator=g)
    long = torch.randint(4, model.cfg.vocab_size, (1, 20), generator=g)
    pad = 0
    batch = torch.cat([torch.cat([torch.full((1, 13), pad), short], 1), long], 0)
    mask = torch.ones_like(batch)
    mask[0, :13] = 0
    n = 2 * model.cfg.window + 3
    out = generate(model, batch, n, attention_mask=mask)
    alone_short = generate(model, short, n)
    alone_long = generate(model, long, n)
    assert torch.equal(out[0, 13:], alone_short[0])
    assert torch.equal(out[1], alone_long[0])
    # and the padded prefill's logits on real tokens equal the row's own
    with torch.no_grad():
        torch.testing.assert_close(model(batch, attention_mask=mask).logits[0, 13:], model(short).logits[0], **TOL)
    assert torch.equal(generate(model, batch, n, attention_mask=mask, use_cache=False), out)


def test_packed_documents_match_separate_documents(variant):
    model = build(variant, seed=6)
    g = torch.Generator().manual_seed(7)
    lengths = [9, 1, 40, 14]
    docs = [torch.randint(0, model.cfg.vocab_size, (1, L), generator=g) for L in lengths]
    seq_idx = torch.cat([torch.full((1, L), i, dtype=torch.int32) for i, L in enumerate(lengths)], 1)
    with torch.no_grad():
        packed = model(torch.cat(docs, 1), seq_idx=seq_idx).logits
        start = 0
        for d in docs:
            torch.testing.assert_close(packed[:, start:start + d.shape[1]], model(d).logits, **TOL)
            start += d.shape[1]


def test_sampling_is_reproducible_and_eos_stops_rows():
    model = build("parallel-token", seed=8)
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(9))
    kw = dict(temperature=0.8, top_k=50, top_p=0.9)
    a = generate(model, prompt, 30, generator=torch.Generator().manual_seed(0), **kw)
    b = generate(model, prompt, 30, generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
    assert torch.equal(a, b)
    eos = int(a[0, 5])  # the first sampled token of row 0: row 0 stops at once
    c = generate(model, prompt, 30, generator=torch.Generator().manual_seed(0), eos_token_id=eos, **kw)
    assert (c[0, 5:] == eos).all()


def test_static_decode_step_matches_the_cached_forward_every_step(variant):
    """`decode_step` (static shapes, device-side counters: what a CUDA graph replays), run
    eagerly through GraphedDecoder(graph=False), gives the logits of the ordinary cached
    forward at every step: left-padded rows, ring buffers wrapping twice (window 16)."""
    from fusiontree.inference.cuda_graph import GraphedDecoder

    model = build(variant)
    B, T, n = 2, 21, 40
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :6] = 0
    kv, ms = model.allocate_inference_cache(B, T + n)
    kv2, ms2 = model.allocate_inference_cache(B, T + n)
    with torch.no_grad():
        first = model(**model.prepare_inputs_for_generation(ids, kv, ms, mask)).logits[:, -1]
        model(**model.prepare_inputs_for_generation(ids, kv2, ms2, mask))
        decoder = GraphedDecoder(model, kv2, ms2, mask.sum(1), graph=False)
        assert decoder.packed_modules > 0  # packed projections are the default
        tokens, logits = ids, first
        for _ in range(n - 1):
            nxt = logits.argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits = model(**model.prepare_inputs_for_generation(tokens, kv, ms, mask)).logits[:, -1]
            got = decoder.step(nxt)
            torch.testing.assert_close(got, logits, **TOL)
    assert kv2.seen_tokens == kv.seen_tokens == T + n - 1
    with pytest.raises(ValueError, match="allocate them with a larger max_length"):
        decoder.step(nxt)
        decoder.step(nxt)


def test_cuda_graph_generation_needs_a_cache_and_a_gpu():
    model = build("parallel-channel")
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="needs use_cache=True"):
        generate(model, ids, 3, use_cache=False, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        generate(model, ids, 3, cuda_graph=True)


def test_graphed_compiled_generation_rounds_its_caches_up_to_shared_lengths(monkeypatch):
    """generate(cuda_graph=True) with compiled blocks allocates caches of a multiple of
    GRAPH_CACHE_BUCKET slots (capped at max_seq_len), so that prompts of similar lengths share
    one compiled step; other generations allocate what they need."""
    from fusiontree.inference.generate import GRAPH_CACHE_BUCKET, graph_cache_length

    assert GRAPH_CACHE_BUCKET == 1024
    assert [graph_cache_length(n, 32768) for n in (1, 1024, 1025, 32000)] == [1024, 1024, 2048, 32768]
    assert graph_cache_length(3000, 2048) == 3000  # never fewer slots than needed
    assert graph_cache_length(1500, 1800) == 1800  # nor past max_seq_len
    model = build("parallel-channel")
    lengths = []
    real = model.allocate_inference_cache
    monkeypatch.setattr(model, "allocate_inference_cache", lambda B, n, *a, **kw: lengths.append(n) or real(B, n, *a, **kw))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        generate(model, ids, 3, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        generate(model, ids, 3, cuda_graph=True, compile_decode=False)
    generate(model, ids, 3)
    assert lengths == [min(1024, model.cfg.max_seq_len), 7, 7]


def test_flex_attention_backend_decodes_like_the_reference():
    """kernels.attention=flex (cached steps through masked SDPA): its cached and static decode
    steps give the reference model's logits, with a left-padded row and the ring buffer
    wrapping (window 16)."""
    from fusiontree.config import KernelConfig
    from fusiontree.inference.cuda_graph import GraphedDecoder
    from fusiontree.models import HybridLanguageModel
    from fusiontree.ops import resolve_kernels

    ref = build("parallel-channel", seed=4)
    model = HybridLanguageModel(ref.cfg, resolve_kernels(KernelConfig(attention="flex"), "cpu")).eval()
    model.load_state_dict(ref.state_dict())
    B, T, n = 2, 9, 40
    ids = torch.randint(0, ref.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0
    caches = [m.allocate_inference_cache(B, T + n) for m in (ref, model, model)]
    with torch.no_grad():
        firsts = [m(**m.prepare_inputs_for_generation(ids, kv, ms, mask)).logits[:, -1]
                  for m, (kv, ms) in zip((ref, model, model), caches)]
        static = GraphedDecoder(model, *caches[2], mask.sum(1), graph=False)
        tokens, logits = ids, firsts[0]
        for _ in range(n - 1):
            nxt = logits.argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits = ref(**ref.prepare_inputs_for_generation(tokens, *caches[0], mask)).logits[:, -1]
            cached = model(**model.prepare_inputs_for_generation(tokens, *caches[1], mask)).logits[:, -1]
            torch.testing.assert_close(cached, logits, **TOL)
            torch.testing.assert_close(static.step(nxt), logits, **TOL)


def _static_steps_match_the_reference(ref, kernels, B: int, n: int = 26) -> None:
    """The static decode step of `ref` rebuilt with `kernels` gives `ref`'s cached logits at
    every step: a left-padded row (when B > 1), ring buffers wrapping twice (window 16), global
    caches allocated 200 slots past what the steps fill (empty key blocks)."""
    from fusiontree.inference.cuda_graph import GraphedDecoder
    from fusiontree.models import HybridLanguageModel

    model = HybridLanguageModel(ref.cfg, kernels).eval()
    model.load_state_dict(ref.state_dict())
    T = 9
    ids = torch.randint(0, ref.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(13))
    mask = torch.ones(B, T, dtype=torch.long)
    if B > 1:
        mask[0, :4] = 0  # a left-padded row
    kv, ms = ref.allocate_inference_cache(B, T + n)
    kv2, ms2 = model.allocate_inference_cache(B, T + n + 200)
    with torch.no_grad():
        logits = ref(**ref.prepare_inputs_for_generation(ids, kv, ms, mask)).logits[:, -1]
        model(**model.prepare_inputs_for_generation(ids, kv2, ms2, mask))
        static = GraphedDecoder(model, kv2, ms2, mask.sum(1), graph=False)
        tokens = ids
        for _ in range(n - 1):
            nxt = logits.argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits = ref(**ref.prepare_inputs_for_generation(tokens, kv, ms, mask)).logits[:, -1]
            torch.testing.assert_close(static.step(nxt), logits, **TOL)


@pytest.mark.parametrize("variant", ["parallel-channel", "transformer"])
def test_filled_blocks_decode_attention_steps_like_the_cached_forward(variant):
    """kernels.decode_attention=filled_blocks: the static decode step (what a CUDA graph
    replays) attends over the filled slots only, and gives the reference model's cached
    logits at every step (batch 2, see `_static_steps_match_the_reference`)."""
    from fusiontree.config import KernelConfig
    from fusiontree.ops import resolve_kernels

    kernels = resolve_kernels(KernelConfig(decode_attention="filled_blocks"), "cpu")
    assert kernels.describe().endswith("decode_attention=filled_blocks")
    _static_steps_match_the_reference(build(variant, seed=12), kernels, B=2)


def _compiled_steps_match_eager(model, ids, n: int, **decoder_kw) -> None:
    """n - 1 greedy steps of GraphedDecoder(compile=True) against the eager static step, each on
    its own copy of the caches after the same prefill of `ids`."""
    from fusiontree.inference.cuda_graph import GraphedDecoder

    B, T = ids.shape
    caches = [model.allocate_inference_cache(B, T + n) for _ in range(2)]
    with torch.no_grad():
        first = [model(ids, past_key_values=kv, past_mamba_states=ms).logits[:, -1] for kv, ms in caches]
        eager = GraphedDecoder(model, *caches[0], torch.full((B,), T), graph=False)
        compiled = GraphedDecoder(model, *caches[1], torch.full((B,), T), graph=False, compile=True, **decoder_kw)
        nxt = first[0].argmax(-1)
        for _ in range(n - 1):
            a, b = compiled.step(nxt).clone(), eager.step(nxt)
            torch.testing.assert_close(a, b, **TOL)
            nxt = b.argmax(-1)


def test_compiled_static_decode_step_matches_the_eager_one():
    """GraphedDecoder(compile=True): the blocks of `decode_step` through Inductor (here its
    CPU code generator; on CUDA the same graphs are then captured), over a ring buffer that
    wraps, against the eager static step on a copy of the same caches."""
    model = build("parallel-channel", seed=6)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(7))
    _compiled_steps_match_eager(model, ids, 24)
    assert model._compiled_decode is not None


def test_compiled_decode_steps_of_models_with_different_decode_paths_in_one_process():
    """Compiled decode code is shared by every model of a process (one code cache per block
    function): a model with the other decode attention path must not reuse a step compiled for
    the first (filled_blocks, then all_slots), and each compiled step equals that model's eager
    static step."""
    from fusiontree.config import KernelConfig
    from fusiontree.models import HybridLanguageModel
    from fusiontree.ops import resolve_kernels

    ref = build("parallel-channel", seed=14)
    ids = torch.randint(0, ref.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(15))
    for path in ("filled_blocks", "all_slots"):
        model = HybridLanguageModel(ref.cfg, resolve_kernels(KernelConfig(decode_attention=path), "cpu")).eval()
        model.load_state_dict(ref.state_dict())
        model.compile_decode(backend="aot_eager", dynamic=False)
        _compiled_steps_match_eager(model, ids, 4)


def test_compiled_decode_blocks_keep_static_shapes_across_batch_sizes():
    """A second batch size compiles the blocks again for its own shapes instead of making the
    batch symbolic (torch.compile's default on a recompile), whose generic kernels are slow to
    replay: every graph the blocks compile, at batch 1 and then 3, has concrete shapes."""
    model = build("parallel-channel", seed=18)
    graphs, symbolic = [], []

    def recorder(gm, example_inputs):
        graphs.append(gm)
        for node in gm.graph.find_nodes(op="placeholder"):
            ev = node.meta.get("example_value")
            if isinstance(ev, torch.SymInt) or (isinstance(ev, torch.Tensor)
                                                and any(isinstance(d, torch.SymInt) for d in ev.shape)):
                symbolic.append(node.name)
        return gm.forward

    torch._dynamo.reset()
    model.compile_decode(backend=recorder)
    g = torch.Generator().manual_seed(19)
    for B in (1, 3):
        ids = torch.randint(0, model.cfg.vocab_size, (B, 5), generator=g)
        kv, ms = model.allocate_inference_cache(B, 8)
        with torch.no_grad():
            model(ids, past_key_values=kv, past_mamba_states=ms)
            logits = model.decode_step(ids[:, -1:], torch.full((B, 1), 5), torch.tensor([5]), kv, ms, compiled=True)
        assert logits.shape == (B, model.cfg.vocab_size)
    assert len(graphs) >= 2 * len({type(layer.attn).__name__ for layer in model.layers}), len(graphs)
    assert not symbolic, symbolic


def test_compiled_decode_blocks_trace_the_flex_backends_cached_attention():
    """With the flex attention backend, the cached regime of a decode step (more keys than
    queries, `all_slots`) is traced into each compiled block rather than breaking it in two: no
    graph break, and the compiled step equals the eager one."""
    from torch._dynamo.utils import counters

    from fusiontree.config import KernelConfig
    from fusiontree.models import HybridLanguageModel
    from fusiontree.ops import resolve_kernels

    ref = build("parallel-channel", seed=16)
    kernels = resolve_kernels(KernelConfig(attention="flex", decode_attention="all_slots"), "cpu")
    model = HybridLanguageModel(ref.cfg, kernels).eval()
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, ref.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(17))
    torch._dynamo.reset()
    counters.clear()
    _compiled_steps_match_eager(model, ids, 6, compile_options={})
    assert counters["stats"]["unique_graphs"] > 0
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_packed_projections_keep_the_models_outputs_parameters_and_gradients(caplog):
    """`pack_projections`: each attention's q/k/v and each MLP's gate/up weights become views of
    one buffer per module (state dict, values and gradients unchanged); without gradients one
    matmul over the buffer gives the separate matmuls' outputs; moving, casting or re-pointing a
    weight drops the packing, loudly where it cannot be seen coming."""
    import logging

    from fusiontree.models.layers import PackedProjections

    model = build("parallel-channel", seed=21)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(ids).logits
    packers = [m for m in model.modules() if isinstance(m, PackedProjections)]
    assert model.pack_projections() == len(packers) == 2 * len(model.layers)
    attn = model.layers[0].attn
    assert attn.wk.weight.untyped_storage().data_ptr() == attn.packed_weight.untyped_storage().data_ptr()
    assert list(model.state_dict()) == list(state) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    calls = []
    hook = attn.wq.register_forward_hook(lambda *a: calls.append(1))  # fires only for a separate matmul
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain, rtol=1e-5, atol=1e-5)
    assert calls == []
    model(ids).logits.float().square().mean().backward()  # with gradients: the separate linears
    assert calls == [1] and attn.wq.weight.grad is not None and attn.wv.weight.grad.abs().sum() > 0
    hook.remove()
    model.layers[0].mlp.w_up.weight.data = model.layers[0].mlp.w_up.weight.detach().clone()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain, rtol=1e-5, atol=1e-5)
    assert "moved out of their packed buffer" in caplog.text and model.layers[0].mlp.packed_weight is None
    assert attn.packed_weight is not None
    model.to(torch.float64)
    assert all(m.packed_weight is None for m in packers)
    assert model.pack_projections(False) == 0


def test_packed_static_decode_steps_match_the_unpacked_ones():
    """GraphedDecoder(pack=True), eager and compiled, against the unpacked eager static step of
    an identical model, each on its own copy of the same prefill's caches (ring buffers
    wrapping, a left-padded row)."""
    from fusiontree.inference.cuda_graph import GraphedDecoder

    ref, model = build("parallel-channel", seed=23), build("parallel-channel", seed=23)
    B, T, n = 2, 9, 20
    ids = torch.randint(0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0
    caches = [m.allocate_inference_cache(B, T + n) for m in (ref, model, model)]
    separate = []
    for m in (ref, model):
        m.layers[0].attn.wq.register_forward_hook(lambda mod, *a, m=m: separate.append(m is model))
    with torch.no_grad():
        for m, (kv, ms) in zip((ref, model, model), caches):
            first = m(**m.prepare_inputs_for_generation(ids, kv, ms, mask)).logits[:, -1]
        plain = GraphedDecoder(ref, *caches[0], mask.sum(1), graph=False, pack=False)
        packed = GraphedDecoder(model, *caches[1], mask.sum(1), graph=False, pack=True)
        compiled = GraphedDecoder(model, *caches[2], mask.sum(1), graph=False, pack=True, compile=True)
        separate.clear()
        nxt = first.argmax(-1)
        for _ in range(n - 1):
            a, b, c = plain.step(nxt).clone(), packed.step(nxt).clone(), compiled.step(nxt).clone()
            torch.testing.assert_close(b, a, **TOL)
            torch.testing.assert_close(c, a, **TOL)
            nxt = a.argmax(-1)
    assert ref.layers[0].attn.packed_weight is None and model.layers[0].attn.packed_weight is not None
    assert separate == [False] * (n - 1)  # the reference's own matmuls each step; the packed model's never
    # A weight re-pointed to new values: the compiled step must not read the stale packed buffer.
    for m in (ref, model):
        w = m.layers[0].mlp.w_up.weight
        w.data = w.detach() * 2
    with torch.no_grad():
        a, c = plain.step(nxt).clone(), compiled.step(nxt).clone()
    torch.testing.assert_close(c, a, **TOL)
    assert model.layers[0].mlp.packed_weight is None and model.layers[1].mlp.packed_weight is not None


def test_compiled_decode_step_takes_a_compile_mode_and_recompiles_for_another():
    """GraphedDecoder(compile_mode=...) compiles the step's blocks in that torch.compile mode
    (here max-autotune, on Inductor's CPU code generator), matching the eager static step; a
    later decoder with Inductor's default options compiles them again rather than reusing them,
    and so does one with the decoder's default (coordinate-descent tuning, combo kernels). A
    mode and options together are refused."""
    from fusiontree.inference.cuda_graph import GraphedDecoder

    model = build("parallel-channel", seed=8)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(9))
    _compiled_steps_match_eager(model, ids, 6, compile_mode="max-autotune-no-cudagraphs", pack=True)
    assert model.decode_options == {"mode": "max-autotune-no-cudagraphs"}
    first = model._compiled_decode
    _compiled_steps_match_eager(model, ids, 4, compile_options={})
    assert model.decode_options == {} and model._compiled_decode[0] is not first[0]
    plain = model._compiled_decode
    tuned = {"coordinate_descent_tuning": True, "combo_kernels": True}
    _compiled_steps_match_eager(model, ids, 4)  # the default: coordinate-descent tuning, combo kernels
    assert model.decode_options == {"options": tuned} and model._compiled_decode[0] is not plain[0]
    kv, ms = model.allocate_inference_cache(1, 8)
    with pytest.raises(ValueError, match="a mode or Inductor options, not both"):
        GraphedDecoder(model, kv, ms, torch.zeros(1), graph=False, compile=True,
                       compile_mode="max-autotune-no-cudagraphs", compile_options=tuned)


def test_packing_leaves_weights_that_share_a_flat_buffer_alone(caplog):
    """Weights that are views into a flat buffer shared with other tensors (as DeepSpeed's ZeRO
    keeps its bf16 parameters) are not packed: packing would re-point them and cut them loose
    from the buffer their optimizer updates. A packing undone by pack_projections(False) is
    taken up again in place, without a copy."""
    import logging

    model = build("parallel-channel", seed=31)
    mlp = model.layers[0].mlp
    flat = torch.cat([p.detach().reshape(-1) for p in mlp.parameters()] + [torch.zeros(5)])
    start = 0
    for p in mlp.parameters():
        p.data = flat[start:start + p.numel()].view_as(p)
        start += p.numel()
    with caplog.at_level(logging.WARNING):
        assert model.pack_projections() == 2 * len(model.layers) - 1
    assert "views into storage shared with other tensors" in caplog.text and mlp.packed_weight is None
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in mlp.parameters())
    with torch.no_grad():
        flat.zero_()  # the optimizer's update reaches the weights: they still are the buffer's views
    assert all(p.abs().sum() == 0 for p in mlp.parameters())
    attn = model.layers[0].attn
    buf = attn.packed_weight
    assert model.pack_projections(False) == 0 and attn.packed_weight is None
    assert model.pack_projections() == 2 * len(model.layers) - 1
    assert attn.packed_weight.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
