"""HybridModelLoss: CE + lambda * gate regulariser, counted once, with document masking."""

import dataclasses

import torch
import torch.nn.functional as F

from fusiontree.config import LossConfig
from fusiontree.train.losses import HybridModelLoss, shifted_targets
from tests.models.conftest import build


def test_loss_is_ce_plus_lambda_reg_computed_by_hand():
    model = build("parallel-token", seed=3)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    out = model(ids)
    lam = 0.37
    loss, parts = HybridModelLoss(LossConfig(gate_reg="entropy", gate_reg_weight=lam))(out.logits, ids, out.gates)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, model.cfg.vocab_size), ids[:, 1:].reshape(-1))
    ents = []
    for g in out.gates:
        if g is not None:
            g = g.double()
            ents.append((-(g * g.log() + (1 - g) * (1 - g).log())).mean())
    reg = torch.stack(ents).mean()
    assert len(ents) == 2
    torch.testing.assert_close(loss.double(), ce.double() + lam * reg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["ce"], ce)
    # the model's forward carries no loss of its own: its outputs have no loss field to add twice
    assert not hasattr(out, "loss")
    bal, _ = HybridModelLoss(LossConfig(gate_reg="balance", gate_reg_weight=lam))(out.logits, ids, out.gates)
    want = torch.stack([(g.double().mean() - 0.5) ** 2 for g in out.gates if g is not None]).mean()
    torch.testing.assert_close(bal.double(), ce.double() + lam * want, rtol=1e-5, atol=1e-6)
    none, _ = HybridModelLoss(LossConfig(gate_reg="none"))(out.logits, ids, out.gates)
    torch.testing.assert_close(none, ce)


def test_gate_regulariser_gradient_reaches_the_gate():
    model = build("parallel-channel")
    ids = torch.randint(0, model.cfg.vocab_size, (1, 10))
    out = model(ids)
    loss, _ = HybridModelLoss(LossConfig(gate_reg_weight=1.0))(out.logits, ids, out.gates)
    loss_ce, _ = HybridModelLoss(LossConfig(gate_reg="none"))(out.logits, ids, out.gates)
    g_reg = torch.autograd.grad(loss, model.layers[0].gate.bias, retain_graph=True)[0]
    g_ce = torch.autograd.grad(loss_ce, model.layers[0].gate.bias)[0]
    assert (g_reg - g_ce).abs().max() > 1e-4


def test_cross_document_and_padding_targets_are_dropped():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    seq = torch.tensor([[0, 0, 0, 1, 1, 1]])
    tgt = shifted_targets(ids, -100, seq)
    assert tgt.tolist() == [[6, 7, -100, 9, 10]]
    assert shifted_targets(ids, -100, seq, mask_cross_document=False).tolist() == [[6, 7, 8, 9, 10]]
    logits = torch.randn(1, 6, 12)
    loss, parts = HybridModelLoss(LossConfig(gate_reg="none"))(logits, ids, [], seq_idx_BT=seq)
    keep = torch.tensor([0, 1, 3, 4])
    want = F.cross_entropy(logits[0, :-1][keep], tgt[0][keep])
    torch.testing.assert_close(loss, want)
    assert int(parts["tokens"]) == 4
    labels = ids.clone()
    labels[0, 5] = -100
    _, parts = HybridModelLoss(dataclasses.replace(LossConfig(), gate_reg="none"))(logits, ids, [], labels_BT=labels)
    assert int(parts["tokens"]) == 4


def test_compiled_cross_entropy_matches_eager_with_gradients():
    """HybridModelLoss(compile_backend="inductor"): Inductor's fused cross entropy gives the
    eager loss and the eager gradient of the logits, from bf16 logits and (at a new length,
    its own graph) from fp32 ones, with dropped cross-document and padding targets."""
    g = torch.Generator().manual_seed(5)
    cfg = LossConfig(gate_reg="none")
    eager, compiled = HybridModelLoss(cfg), HybridModelLoss(cfg, compile_backend="inductor")
    for T, dtype in ((24, torch.bfloat16), (31, torch.float32)):
        ids = torch.randint(0, 50, (2, T), generator=g)
        seq = (torch.arange(T) >= T // 3).long().expand(2, T)
        labels = ids.clone()
        labels[1, :5] = cfg.ignore_index
        base = (3 * torch.randn(2, T, 50, generator=g)).to(dtype)
        results = []
        for loss_fn in (eager, compiled):
            logits = base.clone().requires_grad_(True)
            loss, parts = loss_fn(logits, ids, [], seq_idx_BT=seq, labels_BT=labels)
            loss.backward()
            results.append((loss, parts["tokens"], logits.grad))
        (l0, n0, g0), (l1, n1, g1) = results
        assert int(n0) == int(n1) == 2 * (T - 1) - 2 - 4  # one document start per row, 4 padded labels
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
        tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
        torch.testing.assert_close(g1.float(), g0.float(), **tol)
        assert g1.dtype == dtype
