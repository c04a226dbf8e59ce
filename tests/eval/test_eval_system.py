"""eval/system.py: prefill / decode speed, cache sizes, peak memory, training throughput."""

import dataclasses

import pytest
import torch

from fusiontree.eval.system import PeakMemory, measure_system, system_markdown, training_throughput
from fusiontree.models import HybridLanguageModel
from fusiontree.models.flops import flops_per_token
from tests.eval.conftest import tiny_model_config


def test_measure_system_reports_speed_and_exact_cache_sizes():
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = HybridLanguageModel(cfg).eval()
    res = measure_system(model, [32, 96], batch_size=2, decode_steps=4)
    assert [p["context"] for p in res["prefill"]] == [32, 96]
    # rates are the tokens of what was timed over its time: batch x context per prefill, batch per decode step
    for p in res["prefill"]:
        assert p["seconds"] > 0 and p["tokens_per_s"] == pytest.approx(2 * p["context"] / p["seconds"])
    for d in res["decode"]:
        assert d["ms_per_step"] > 0 and d["tokens_per_s"] == pytest.approx(2 / (d["ms_per_step"] / 1e3))
    assert res["params"] == sum(p.numel() for p in model.parameters())
    kv, ms = model.allocate_inference_cache(2, 96 + 4 + 1)
    assert res["prefill"][1]["cache_mib"] == pytest.approx((kv.nbytes() + ms.nbytes()) / 2**20)
    # the local layer's ring buffer stays at `window` slots; only the global layer grows
    small, big = res["prefill"][0]["cache_mib"], res["prefill"][1]["cache_mib"]
    assert small < big < 4 * small
    assert "decode tok/s" in system_markdown(res)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        measure_system(model, [cfg.max_seq_len], decode_steps=4)


def test_measure_system_decode_modes():
    """The static decode step (what a CUDA graph replays) measured like the cached forward;
    graphs need CUDA and say so; an unknown mode is refused."""
    torch.manual_seed(0)
    model = HybridLanguageModel(tiny_model_config()).eval()
    res = measure_system(model, [40], batch_size=2, decode_steps=4, decode_mode="static")
    d = res["decode"][0]
    assert d["mode"] == "static" and d["ms_per_step"] > 0 and d["tokens_per_s"] == pytest.approx(2e3 / d["ms_per_step"])
    assert "| static |" in system_markdown(res)
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        measure_system(model, [40], decode_steps=4, decode_mode="cuda_graph")
    with pytest.raises(ValueError, match="choose one of"):
        measure_system(model, [40], decode_steps=4, decode_mode="graph")


def test_peak_memory_sees_a_large_allocation_on_cpu():
    mem = PeakMemory(torch.device("cpu"))
    with mem.measure():
        x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        x.add_(1)
        del x
    assert mem.delta_bytes >= 48 << 20


def test_training_throughput():
    cfg = tiny_model_config()
    res = training_throughput(cfg, seq_len=64, micro_batch=2, steps=3)
    assert res["precision"] == "fp32" and res["step_s"] > 0
    assert res["tokens_per_s"] == pytest.approx(2 * 64 / res["step_s"])
    assert res["model_tflops"] == pytest.approx(res["tokens_per_s"] * flops_per_token(cfg, 64) / 1e12)
    mamba = training_throughput(dataclasses.replace(cfg, mixer="mamba"), seq_len=64, micro_batch=2, steps=2)
    assert mamba["params"] < res["params"]  # the model of the given config was built
    with pytest.raises(ValueError, match="steps=1"):
        training_throughput(cfg, seq_len=64, micro_batch=2, steps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (allocator peak-memory path)")
def test_measure_system_on_gpu():
    model = HybridLanguageModel(tiny_model_config()).cuda().eval()
    res = measure_system(model, [64], batch_size=2, decode_steps=4)
    assert res["memory_kind"] == "cuda max_memory_allocated"
    graphed = measure_system(model, [64], batch_size=2, decode_steps=4, decode_mode="compiled_cuda_graph")
    assert graphed["decode"][0]["mode"] == "compiled_cuda_graph" and graphed["decode"][0]["tokens_per_s"] > 0
    assert res["prefill"][0]["peak_mib"] >= res["weights_mib"]
    train = training_throughput(tiny_model_config(), seq_len=64, micro_batch=2, steps=2, device="cuda")
    assert train["precision"] == "bf16" and train["tokens_per_s"] > 0
