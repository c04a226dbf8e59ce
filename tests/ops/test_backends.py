"""Backend selection, and the backends' logic that runs on CPU: FlexAttention's masks (forward;
FlexAttention has no CPU backward), the SDPA paths, seq_idx relabelling, the compiled decode step.
The GPU kernels themselves are tested in test_gpu_backends.py."""

import dataclasses
import logging

import pytest
import torch

from fusiontree import ops
from fusiontree.config import KernelConfig
from fusiontree.models.hybrid import positions_from_seq_idx
from fusiontree.ops import resolve_kernels
from fusiontree.models import HybridLanguageModel
from fusiontree.models.config import model_preset
from fusiontree.ops.attention import attention_ref
from fusiontree.ops.conv1d import causal_conv1d_ref
from fusiontree.ops.backends.common import canonical_seq_idx, conv1d_custom_ops, require_cuda, unit_sums_as_views
from fusiontree.ops.backends.flex import attention_flex, flex_block_masks
from fusiontree.ops.ssd import ssd_chunked_ref

TOL = dict(rtol=1e-5, atol=1e-5)



# ------------------------------------------------------------------ selection


def test_auto_on_cpu_picks_the_references():
    k = resolve_kernels(KernelConfig(), "cpu")
    assert (k.ssd_name, k.attention_name) == ("reference", "reference")
    assert k.describe() == "ssd=reference attention=reference conv1d=reference"


def test_unknown_backend_is_a_value_error_listing_the_choices():
    with pytest.raises(ValueError, match=r"not a known backend.*'mamba_ssm'.*'reference'"):
        resolve_kernels(KernelConfig(ssd="triton"), "cpu")
    with pytest.raises(ValueError, match=r"not a known backend.*'flex'"):
        resolve_kernels(KernelConfig(attention="flash_attn"), "cpu")


@pytest.mark.parametrize("ssd", ["mamba_ssm", "mamba_ssm_saved"])
def test_named_backend_that_cannot_load_raises_with_the_reason(ssd):
    with pytest.raises(RuntimeError, match=f"kernels.ssd='{ssd}' cannot load on cpu: .*CUDA device"):
        resolve_kernels(KernelConfig(ssd=ssd), "cpu")


def test_packed_ssd_entry_passes_views_or_the_packed_tensor():
    """`Kernels.ssd_chunked_packed`: with the reference, the same result as `ssd_chunked` on the
    split views (outputs and the packed input's gradient); a backend with a packed entry of its
    own gets the packed tensor itself."""
    H, P, G, N, T = 3, 4, 1, 5, 11
    xBC = torch.randn(2, T, H * P + 2 * G * N, requires_grad=True)
    dt, A, D = torch.rand(2, T, H) * 0.2, -torch.rand(H) - 0.1, torch.randn(H)
    k = resolve_kernels(KernelConfig(), "cpu")
    y, final = k.ssd_chunked_packed(xBC, dt, A, D, head_dim=P, groups=G, chunk_size=4)
    x, B, C = xBC[..., :H * P], xBC[..., H * P:H * P + G * N], xBC[..., H * P + G * N:]
    y_r, final_r = ssd_chunked_ref(x.unflatten(-1, (H, P)), dt, A, B.unflatten(-1, (G, N)),
                                   C.unflatten(-1, (G, N)), D, chunk_size=4)
    assert torch.equal(y, y_r) and torch.equal(final, final_r)
    g, = torch.autograd.grad(y.square().sum(), xBC)
    g_r, = torch.autograd.grad(y_r.square().sum(), xBC)
    assert torch.equal(g, g_r)
    seen = {}
    own = dataclasses.replace(k, ssd_chunked_xbc=lambda t, *a, **kw: seen.update(t=t, **kw) or (1, 2))
    assert own.ssd_chunked_packed(xBC, dt, A, D, head_dim=P, groups=G, chunk_size=4) == (1, 2)
    assert seen["t"] is xBC and (seen["head_dim"], seen["groups"], seen["chunk_size"]) == (P, G, 4)


def test_unit_sums_become_views_and_other_sums_run_unchanged():
    """The mode the kept-states SSD backward runs under: a floating sum over one dimension of
    size 1 returns a view of the same values; every other sum returns what it returns outside."""
    t = torch.randn(3, 1, 4, 1)
    ints = torch.ones(2, 1, dtype=torch.int32)
    with unit_sums_as_views():
        views = [t.sum(1), t.sum(dim=1), t.sum(-1)]
        others = [t.sum(0), t.sum(1, keepdim=True), t.sum(dim=(1, 3)), t.sum(), ints.sum(1), torch.sum(t, 2)]
    for v, d in zip(views, [1, 1, -1]):
        assert v._base is t and torch.equal(v, t.sum(d))
    want = [t.sum(0), t.sum(1, keepdim=True), t.sum(dim=(1, 3)), t.sum(), ints.sum(1), torch.sum(t, 2)]
    for got, w in zip(others, want):
        assert got._base is None and got.dtype == w.dtype and torch.equal(got, w)


def _fake(name, fail_with=None):
    def loader(device):
        if fail_with is not None:
            raise fail_with
        return dict(ssd_chunked=name, ssd_step=name)
    return loader


def test_auto_on_cuda_takes_the_first_backend_that_loads_and_logs_the_others(monkeypatch, caplog):
    table = {"mamba_ssm": _fake("m", ImportError("No module named 'mamba_ssm'")),
             "other": _fake("c"), "reference": _fake("r")}
    monkeypatch.setitem(ops.AUTO_ORDER, "cuda", ["mamba_ssm", "other", "flex", "causal_conv1d", "filled_blocks",
                                                 "reference", "all_slots"])
    monkeypatch.setattr(ops, "SSD_BACKENDS", table)
    monkeypatch.setattr(ops, "ATTENTION_BACKENDS", {"flex": lambda d: dict(attention="f"),
                                                    "reference": lambda d: dict(attention="r")})

    def no_causal_conv1d(device):
        raise ImportError("No module named 'causal_conv1d_cuda'")

    monkeypatch.setitem(ops.CONV1D_BACKENDS, "causal_conv1d", no_causal_conv1d)
    with caplog.at_level(logging.INFO, logger="fusiontree.ops"):
        k = resolve_kernels(KernelConfig(), "cuda")
    assert (k.ssd_name, k.ssd_chunked, k.attention_name, k.attention) == ("other", "c", "flex", "f")
    assert (k.conv1d_name, k.conv1d) == ("reference", causal_conv1d_ref)
    assert "mamba_ssm unavailable (No module named 'mamba_ssm')" in caplog.text
    assert "causal_conv1d unavailable (No module named 'causal_conv1d_cuda')" in caplog.text
    # and a named backend never falls back, even when another one would load
    with pytest.raises(RuntimeError, match="kernels.ssd='mamba_ssm' cannot load on cuda: No module named"):
        resolve_kernels(KernelConfig(ssd="mamba_ssm"), "cuda")


def test_auto_on_cuda_prefers_mamba_ssm_flex_and_causal_conv1d():
    order = ops.AUTO_ORDER["cuda"]
    for name in ("mamba_ssm_saved", "mamba_ssm", "flex", "causal_conv1d"):
        assert order.index(name) < order.index("reference"), name
    assert order.index("mamba_ssm_saved") < order.index("mamba_ssm")


def test_gpu_backends_name_the_cpu_tensors_and_the_setting_that_runs_on_cpu():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=r"backend runs CUDA kernels, but \['x', 'b'\] are not CUDA tensors; "
                                         r"move the model to the GPU or use kernels.conv1d=reference on CPU"):
        require_cuda("the causal_conv1d conv1d backend runs CUDA kernels", "kernels.conv1d=reference",
                     x=x, a=None, b=x)


def test_causal_conv1d_is_a_cuda_backend_and_refuses_shapes_its_kernels_lack():
    for name in ("causal_conv1d", "triton"):
        with pytest.raises(RuntimeError, match=f"kernels.conv1d='{name}' cannot load on cpu: .*CUDA device"):
            resolve_kernels(KernelConfig(conv1d=name), "cpu")
    # a model whose conv channels the kernels cannot take stops at construction, naming the fix
    cfg = dataclasses.replace(model_preset("debug"), ssm_state=13)  # 128 + 2 * 13 = 154 channels
    kernels = dataclasses.replace(ops.reference_kernels(), conv1d_name="causal_conv1d")
    with pytest.raises(ValueError,
                       match="154 channels.*set kernels.conv1d=triton .any shape. or kernels.conv1d=reference"):
        HybridLanguageModel(cfg, kernels)
    HybridLanguageModel(model_preset("debug"), kernels)  # 160 channels: fine


def test_flex_loads_on_cpu_when_named_with_its_mask_builder():
    k = resolve_kernels(KernelConfig(attention="flex"), "cpu")
    assert (k.attention_name, k.attention, k.attention_masks) == ("flex", attention_flex, flex_block_masks)
    assert resolve_kernels(KernelConfig(), "cpu").attention_masks is None


# ------------------------------------------------------------------ flex attention on CPU


def _qkv(B, T, S0, H, K, D, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, D, generator=g), torch.randn(B, S0 + T, K, D, generator=g),
            torch.randn(B, S0 + T, K, D, generator=g))


@pytest.mark.parametrize("T", [1, 63, 300])
@pytest.mark.parametrize("window", [None, 1, 7, 128, 1000])
def test_flex_training_path_matches_reference(T, window):
    q, k, v = _qkv(2, T, 0, 6, 2, 16, seed=T)
    pos = torch.arange(T).expand(2, T)
    torch.testing.assert_close(attention_flex(q, k, v, pos, pos, window=window),
                               attention_ref(q, k, v, pos, pos, window=window), **TOL)


@pytest.mark.parametrize("window", [None, 16])
def test_flex_document_masks_match_reference(window):
    seq = torch.tensor([[0] * 40 + [1] + [2] * 109, [7] * 100 + [3] * 50])  # ids need not be sorted
    pos = positions_from_seq_idx(seq)
    q, k, v = _qkv(2, 150, 0, 4, 4, 16, seed=1)
    o = attention_flex(q, k, v, pos, pos, window=window, q_seq_BT=seq, k_seq_BS=seq)
    torch.testing.assert_close(o, attention_ref(q, k, v, pos, pos, window=window, q_seq_BT=seq, k_seq_BS=seq),
                               **TOL)


def test_flex_keeps_two_runs_of_one_document_id_apart():
    """A document is a contiguous run of one id (as for the SSD, conv1d and the model's
    positions); FlexAttention relabels ids per run. 300 tokens: past the short-input path."""
    seq = torch.tensor([[4] * 100 + [5] * 100 + [4] * 100])
    runs = canonical_seq_idx(seq)
    pos = positions_from_seq_idx(seq)
    q, k, v = _qkv(1, 300, 0, 4, 2, 16, seed=5)
    o = attention_flex(q, k, v, pos, pos, window=None, q_seq_BT=seq, k_seq_BS=seq)
    torch.testing.assert_close(o, attention_ref(q, k, v, pos, pos, q_seq_BT=runs, k_seq_BS=runs), **TOL)


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("T", [70, 300])  # the short-input (masked SDPA) and FlexAttention paths
def test_flex_left_padding_matches_reference_on_real_tokens(window, T):
    real = torch.ones(2, T, dtype=torch.bool)
    real[0, :13] = False
    pos = (real.long().cumsum(1) - 1).clamp(min=0)
    kpos = pos.masked_fill(~real, -1)
    q, k, v = _qkv(2, T, 0, 4, 2, 16, seed=2)
    o = attention_flex(q, k, v, pos, kpos, window=window)
    torch.testing.assert_close(o[real], attention_ref(q, k, v, pos, kpos, window=window)[real], **TOL)
    assert torch.isfinite(o).all()
    if T >= 128:
        assert o[0, :13].abs().max() == 0  # on the FlexAttention path padding queries see nothing


@pytest.mark.parametrize("window", [3, 16, None])
@pytest.mark.parametrize("T", [1, 21, 40])
def test_flex_cached_path_matches_reference(window, T):
    """Cached keys in ring order, empty slots, a row whose query sees no key at all."""
    S0 = 16
    q, k, v = _qkv(3, T, S0, 4, 2, 16, seed=3)
    qpos = torch.arange(S0, S0 + T).expand(3, T).clone()
    g = torch.Generator().manual_seed(7)  # the slot order: fixed, so that a failure repeats
    cpos = torch.stack([torch.randperm(S0, generator=g) for _ in range(3)])
    cpos[1, :5] = -1
    kpos = torch.cat([cpos, qpos], 1)
    kpos[2] = -1  # row 2: nothing visible
    o = attention_flex(q, k, v, qpos, kpos, window=window)
    torch.testing.assert_close(o, attention_ref(q, k, v, qpos, kpos, window=window), **TOL)
    assert o[2].abs().max() == 0


def test_flex_compiles_with_a_raised_recompile_limit(monkeypatch):
    """FlexAttention compiles once per shape, window path and kernel option; past torch's
    default 8 entries torch runs the function eagerly (every T x T score materialised: it ran
    out of memory that way at 32K). Compiling must raise the limit first."""
    import torch._dynamo.config as dynamo_config

    from fusiontree.ops.backends import common, flex

    monkeypatch.setattr(common, "_compiled", {})
    with dynamo_config.patch(recompile_limit=8):  # restored on exit
        flex._flex_fn(torch.device("cuda"))  # wraps only: nothing runs on the device
        assert dynamo_config.recompile_limit >= 64


def test_compiled_code_records_einops_calls_whole():
    """Under `compile_once` an einops call is one call in the captured graph (not the parser's
    operations traced one by one), and the compiled function computes what eager code does."""
    import einops

    from fusiontree.ops.backends.common import compile_once

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(x_BTC):
        return einops.rearrange(x_BTC, "b t (h d) -> b h t d", h=2).sin()

    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(compile_once(fn, backend=capture)(x), fn(x))
    assert [n.target for n in graphs[0].graph.nodes if n.op == "call_function"][0] is einops.rearrange


def test_flex_rejects_bad_input_and_cpu_backward():
    q, k, v = _qkv(1, 8, 0, 4, 3, 16, seed=0)
    pos = torch.arange(8)[None]
    with pytest.raises(ValueError, match="H % K == 0"):
        attention_flex(q, k, v, pos, pos)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 200, 0, 4, 2, 16, seed=0))
    pos = torch.arange(200)[None]
    with pytest.raises(ValueError, match="no backward on CPU"):
        attention_flex(q, k, v, pos, pos, window=4)
    with pytest.raises(ValueError, match="both q_seq_BT and k_seq_BS"):
        attention_flex(q, k, v, pos, pos, window=4, q_seq_BT=torch.zeros(1, 200, dtype=torch.long))


# ------------------------------------------------------------------ SSD helpers on CPU


def test_canonical_seq_idx_keeps_the_reference_semantics():
    seq = torch.tensor([[5, 5, 7, 7, 5, 5, 5, 2], [0, 0, 0, 0, 0, 0, 0, 0], [3, 1, 1, 1, 1, 1, 4, 4]])
    assert canonical_seq_idx(seq).tolist() == [[0, 0, 1, 1, 2, 2, 2, 3], [0] * 8, [0, 1, 1, 1, 1, 1, 2, 2]]
    assert canonical_seq_idx(seq).dtype == torch.int32
    g = torch.Generator().manual_seed(0)
    B, T, H, P, G, N = 3, 8, 2, 3, 1, 4
    x, Bm, Cm = torch.randn(B, T, H, P, generator=g), torch.randn(B, T, G, N, generator=g), torch.randn(B, T, G, N, generator=g)
    dt, A, h0 = torch.rand(B, T, H, generator=g), -torch.rand(H, generator=g), torch.randn(B, H, P, N, generator=g)
    y, f = ssd_chunked_ref(x, dt, A, Bm, Cm, chunk_size=4, initial_state_BHPN=h0, seq_idx_BT=seq)
    y2, f2 = ssd_chunked_ref(x, dt, A, Bm, Cm, chunk_size=4, initial_state_BHPN=h0, seq_idx_BT=canonical_seq_idx(seq))
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(f, f2)


# ------------------------------------------------------------------ one set of masks per forward


def test_flex_block_masks_are_what_each_call_would_build():
    """Masks built once for a forward (documents and padding, local and global windows) give
    every layer's call the output it computes when it builds its own."""
    seq = torch.tensor([[0] * 140 + [1] * 160, [3] * 300])
    pos = positions_from_seq_idx(seq)
    masks = flex_block_masks(pos, pos, seq, seq, {16, None})
    assert masks is not None and len(masks) == 2
    q, k, v = _qkv(2, 300, 0, 4, 2, 16, seed=7)
    for window in (16, None):
        torch.testing.assert_close(
            attention_flex(q, k, v, pos, pos, window=window, q_seq_BT=seq, k_seq_BS=seq, block_masks=masks),
            attention_flex(q, k, v, pos, pos, window=window, q_seq_BT=seq, k_seq_BS=seq), rtol=0, atol=0)
    # No documents and no padding: masks of shapes alone, nothing to build per forward.
    assert flex_block_masks(pos, pos, None, None, {16, None}) is None
    # Short inputs take the masked SDPA path.
    assert flex_block_masks(pos[:, :100], pos[:, :100], seq[:, :100], seq[:, :100], {16}) is None


def test_model_builds_the_flex_masks_once_per_forward_and_matches_the_reference(monkeypatch):
    from tests.models.conftest import build

    ref = build("parallel-channel", n_layers=3, attn_pattern="LLG")
    model = build("parallel-channel", n_layers=3, attn_pattern="LLG")
    calls = []
    flex_kernels = resolve_kernels(KernelConfig(attention="flex"), "cpu")

    def counting_masks(*args):
        calls.append(args[-1])
        return flex_block_masks(*args)

    kernels = type(flex_kernels)(**{**flex_kernels.__dict__, "attention_masks": counting_masks})
    model.kernels = kernels
    for layer in model.layers:
        layer.attn.kernels = kernels
        layer.mamba.kernels = kernels
    ids = torch.randint(0, ref.cfg.vocab_size, (2, 200), generator=torch.Generator().manual_seed(3))
    seq = torch.tensor([[0] * 77 + [1] * 123, [0] * 10 + [1] * 150 + [2] * 40])
    with torch.no_grad():
        got, want = model(ids, seq_idx=seq).logits, ref(ids, seq_idx=seq).logits
    assert calls == [{16, None}]  # one build for the three layers: the local window and global
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ decode attention selection


def test_decode_attention_auto_takes_filled_blocks_on_cuda(monkeypatch):
    from fusiontree.ops import DECODE_ATTENTION_BACKENDS
    from fusiontree.ops.backends.decode import decode_attention_filled_blocks

    k = resolve_kernels(KernelConfig(), "cpu")  # auto on CPU: every slot
    assert (k.decode_attention, k.decode_attention_name) == (None, "all_slots")
    k = resolve_kernels(KernelConfig(attention="flex", decode_attention="filled_blocks"), "cpu")
    assert (k.decode_attention, k.decode_attention_name) == (decode_attention_filled_blocks, "filled_blocks")
    assert k.describe() == "ssd=reference attention=flex conv1d=reference decode_attention=filled_blocks"
    # auto on CUDA (the loader stands in for the GPU one: this machine may have no triton)
    monkeypatch.setitem(DECODE_ATTENTION_BACKENDS, "filled_blocks", lambda d: dict(decode_attention=_sentinel))
    k = resolve_kernels(KernelConfig(ssd="reference", attention="reference"), "cuda")
    assert (k.decode_attention, k.decode_attention_name) == (_sentinel, "filled_blocks")
    assert k.describe().endswith("decode_attention=filled_blocks")
    k = resolve_kernels(KernelConfig(ssd="reference", attention="reference", decode_attention="all_slots"), "cuda")
    assert k.decode_attention is None
    # auto where filled_blocks cannot load: every slot, and the reason is logged
    monkeypatch.setitem(DECODE_ATTENTION_BACKENDS, "filled_blocks", _fake("x", ImportError("no triton")))
    k = resolve_kernels(KernelConfig(ssd="reference", attention="reference"), "cuda")
    assert (k.decode_attention, k.decode_attention_name) == (None, "all_slots")
    with pytest.raises(ValueError, match=r"not a known backend.*'all_slots', 'filled_blocks'"):
        resolve_kernels(KernelConfig(decode_attention="flash"), "cpu")


def _sentinel(*args, **kwargs):
    raise AssertionError("not called")


# A stand-in conv with a closed-form backward (a custom op's body runs below autograd): one tap,
# y = act(x * w[:, 0] + bias + the initial state's first slot), every input with a gradient of its own.
def _one_tap(x_BTC, weight_CK, bias_C, initial_state_BCK):
    pre = x_BTC.float() * weight_CK[:, 0].float()
    if bias_C is not None:
        pre = pre + bias_C.float()
    if initial_state_BCK is not None:
        pre = pre + initial_state_BCK[..., 0].float()[:, None, :]
    return pre


def _one_tap_fwd(x_BTC: torch.Tensor, weight_CK: torch.Tensor, bias_C: torch.Tensor | None,
                 seq_idx_BT: torch.Tensor | None, initial_state_BCK: torch.Tensor | None, silu: bool) -> torch.Tensor:
    pre = _one_tap(x_BTC, weight_CK, bias_C, initial_state_BCK)
    return (torch.nn.functional.silu(pre) if silu else pre).to(x_BTC.dtype)


def _one_tap_bwd(x_BTC: torch.Tensor, weight_CK: torch.Tensor, bias_C: torch.Tensor | None,
                 seq_idx_BT: torch.Tensor | None, initial_state_BCK: torch.Tensor | None, dy_BTC: torch.Tensor,
                 silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    pre = _one_tap(x_BTC, weight_CK, bias_C, initial_state_BCK)
    d = dy_BTC.float()
    if silu:
        sig = torch.sigmoid(pre)
        d = d * sig * (1 + pre * (1 - sig))
    dw = torch.zeros_like(weight_CK)
    dw[:, 0] = (d * x_BTC.float()).sum((0, 1))
    dinit = x_BTC.new_empty(0)
    if initial_state_BCK is not None:
        dinit = torch.zeros_like(initial_state_BCK)
        dinit[..., 0] = d.sum(1)
    return ((d * weight_CK[:, 0].float()).to(x_BTC.dtype), dw,
            x_BTC.new_empty(0) if bias_C is None else d.sum((0, 1)).to(bias_C.dtype), dinit)


# The registration the GPU conv backends use, here around the stand-in on CPU.
_ONE_TAP_OP = conv1d_custom_ops("one_tap_conv_for_tests", _one_tap_fwd, _one_tap_bwd, device_types="cpu")


@pytest.mark.parametrize("with_bias,with_init", [(True, True), (False, False), (True, False)])
def test_conv1d_custom_ops_pass_opcheck_and_route_every_gradient(with_bias, with_init):
    """`conv1d_custom_ops` (the custom-op registration of the causal_conv1d and triton backends),
    around a stand-in with a closed-form backward: torch's opcheck of both ops (schema, fake
    tensors, autograd registration), and through autograd, eagerly and compiled in one graph,
    the values and every gradient of the same expression in plain PyTorch, on a strided slice
    of a wider projection; no gradient for an absent bias or initial state."""
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(2, 40, 30, generator=g)
    w = torch.randn(24, 4, generator=g)
    b = torch.randn(24, generator=g) if with_bias else None
    init = torch.randn(2, 24, 3, generator=g) if with_init else None
    seq = torch.tensor([[0] * 10 + [1] * 30, [5] * 25 + [2] * 15])
    dy = torch.randn(2, 40, 24, generator=g)
    x = proj[..., 3:27]
    torch.library.opcheck(_ONE_TAP_OP, (x, w, b, seq, init, True))
    torch.library.opcheck(torch.ops.fusiontree.one_tap_conv_for_tests_bwd.default, (x, w, b, seq, init, dy, True))

    def grads(fn):
        leaves = {n: t.clone().requires_grad_() for n, t in (("proj", proj), ("w", w), ("b", b), ("init", init))
                  if t is not None}
        y = fn(leaves["proj"][..., 3:27], leaves["w"], leaves.get("b"), leaves.get("init"))
        return [y.detach(), *torch.autograd.grad((y * dy).sum(), list(leaves.values()))]

    want = grads(lambda x, w, b, i: torch.nn.functional.silu(_one_tap(x, w, b, i)))
    assert len(want) == 3 + with_bias + with_init
    for fn in (_ONE_TAP_OP, torch.compile(_ONE_TAP_OP, fullgraph=True, backend="aot_eager")):
        got = grads(lambda x, w, b, i: fn(x, w, b, seq, i, True))
        assert len(got) == len(want)
        for a, r in zip(got, want):
            torch.testing.assert_close(a, r)
