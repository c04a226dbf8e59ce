"""HybridOutput reads like a transformers output: attribute and key access give the same objects."""

import pytest
import torch

from tests.models.conftest import build


def test_output_attribute_and_key_access():
    model = build("parallel-token")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    out = model(ids, collect_gate_stats=True)
    assert out["logits"] is out.logits
    assert out["gates"] is out.gates
    assert out["gate_stats"] is out.gate_stats
    for i in range(model.cfg.n_layers):
        assert out["gate_stats"][i] is out.gate_stats[i]
        assert set(out["gate_stats"][i]) == {"mean", "channel_mean", "attn_frac", "hist"}
    assert out.keys() == ["logits", "past_key_values", "past_mamba_states", "gates", "gate_stats"]
    assert dict(out.items())["logits"] is out.logits
    assert "gate_stats" in out and "loss" not in out


def test_output_unknown_key_names_the_fields():
    out = build("parallel-channel")(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(KeyError, match="fields: \\['logits'"):
        out["loss"]
    with pytest.raises(TypeError, match="indexed by field name"):
        out[0]
