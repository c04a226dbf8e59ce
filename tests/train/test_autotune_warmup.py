"""The SSD kernels' autotuning in a process beside the trainer's compile
(fusiontree.train.autotune_warmup): when it applies, how the trainer waits for it, what a failed or
late process leaves (the trainer autotunes itself), and on a GPU that the trainer then times only
the kernels Triton's autotuning cache cannot hold."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from fusiontree.config import RunConfig
from fusiontree.ops.backends import common
from fusiontree.train import autotune_warmup as warmup

CUDA_CFG = {"compile": True, "compile_cache_dir": "/tmp/cache"}


def _cfg(**train) -> RunConfig:
    cfg = RunConfig()
    cfg.train = dataclasses.replace(cfg.train, **{**CUDA_CFG, **train})
    return cfg


def _fake_triton(monkeypatch, caches_results: bool) -> None:
    """A Triton whose autotuner does (3.2 on) or does not keep its results on disk."""
    import types

    autotuner = types.ModuleType("triton.runtime.autotuner")
    autotuner.Autotuner = type("Autotuner", (), {"check_disk_cache": lambda self: None} if caches_results else {})
    for name, module in (("triton", types.ModuleType("triton")), ("triton.runtime", types.ModuleType("triton.runtime")),
                         ("triton.runtime.autotuner", autotuner)):
        monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture(autouse=True)
def _no_leftover_waits(monkeypatch):
    monkeypatch.setattr(common, "_before_first_call", [])
    monkeypatch.setattr(warmup, "outcome", {})


def test_it_runs_only_where_it_has_a_compile_to_overlap_and_a_cache_to_fill(monkeypatch):
    monkeypatch.setattr(warmup.importlib.util, "find_spec", lambda name: object())
    _fake_triton(monkeypatch, caches_results=True)
    assert warmup.off_reason(_cfg(), "cuda") is None
    assert "autotune_warmup=false" in warmup.off_reason(_cfg(autotune_warmup=False), "cuda")
    assert "no CUDA" in warmup.off_reason(_cfg(), "cpu")
    assert "train.compile=false" in warmup.off_reason(_cfg(compile=False), "cuda")
    assert "compile_cache_dir" in warmup.off_reason(_cfg(compile_cache_dir=""), "cuda")
    twin = _cfg()
    twin.model = dataclasses.replace(twin.model, mixer="attention")
    assert "no Mamba branch" in warmup.off_reason(twin, "cuda")
    ref = _cfg()
    ref.kernels = dataclasses.replace(ref.kernels, ssd="reference")
    assert "not mamba-ssm" in warmup.off_reason(ref, "cuda")
    tp = _cfg()
    tp.parallel = dataclasses.replace(tp.parallel, tensor_parallel=2)
    assert "tensor parallelism" in warmup.off_reason(tp, "cuda")
    _fake_triton(monkeypatch, caches_results=False)
    assert "Triton 3.2 or later" in warmup.off_reason(_cfg(), "cuda")
    monkeypatch.setattr(warmup.importlib.util, "find_spec", lambda name: None)
    assert "not mamba-ssm" in warmup.off_reason(_cfg(), "cuda")


def test_each_node_and_run_has_its_own_report(tmp_path, monkeypatch):
    monkeypatch.setattr(warmup.socket, "gethostname", lambda: "node07.cluster")
    marker, log_file = warmup.report_paths(tmp_path / "run")
    assert marker == tmp_path / "run" / "logs" / "autotune_warmup.node07.json"
    assert log_file == tmp_path / "run" / "logs" / "autotune_warmup.node07.log"
    monkeypatch.setattr(warmup.socket, "gethostname", lambda: "node08")
    assert warmup.report_paths(tmp_path / "run")[0] != marker
    assert warmup.report_paths(tmp_path / "other")[0].parent == tmp_path / "other" / "logs"


def test_the_trainer_starts_one_process_per_node_and_every_rank_waits_for_it(tmp_path, monkeypatch):
    """Trainer._start_autotune_warmup: local rank 0 starts the process with the first
    micro-batch's shape and the run's precision, every rank registers the wait on the same
    report, and a run it does not apply to starts nothing."""
    import types

    from fusiontree.train.trainer import Trainer

    started, expected = [], []
    monkeypatch.setattr(warmup, "off_reason", lambda cfg, device_type: None)
    monkeypatch.setattr(warmup, "start", lambda spec, marker, log_file: started.append((spec, marker, log_file)) or "proc")
    monkeypatch.setattr(warmup, "expect", lambda marker, proc, log_file: expected.append((marker, proc, log_file)))
    cfg = _cfg(compile_cache_dir=str(tmp_path / "cache"))
    loader = types.SimpleNamespace(micro_batch_size=8, seq_len=4096)
    for local_rank in (0, 1):
        di = types.SimpleNamespace(device=torch.device("cuda", local_rank), local_rank=local_rank, rank=local_rank,
                                   is_main=local_rank == 0)
        fake = types.SimpleNamespace(cfg=cfg, di=di, train_loader=loader, autotune_threads=8, run_dir=tmp_path / "run")
        Trainer._start_autotune_warmup(fake)
    assert len(started) == 1 and len(expected) == 2
    spec, marker, log_file = started[0]
    assert (spec["batch"], spec["seq_len"], spec["dtype"], spec["threads"], spec["device"]) == \
        (8, 4096, "bfloat16", 8, "cuda:0")
    assert (marker, log_file) == warmup.report_paths(tmp_path / "run")
    assert expected == [(marker, "proc", log_file), (marker, None, None)]
    monkeypatch.setattr(warmup, "off_reason", lambda cfg, device_type: "train.autotune_warmup=false")
    Trainer._start_autotune_warmup(fake)
    assert len(started) == 1 and len(expected) == 2
    # a process that cannot start: rank 0 goes on without waiting and reports it for the others

    def no_start(spec, marker, log_file):
        raise OSError("no space left on device")

    monkeypatch.setattr(warmup, "off_reason", lambda cfg, device_type: None)
    monkeypatch.setattr(warmup, "start", no_start)
    fake.di = types.SimpleNamespace(device=torch.device("cuda", 0), local_rank=0, rank=0, is_main=True)
    Trainer._start_autotune_warmup(fake)
    assert len(expected) == 2
    assert json.loads(marker.read_text()) == {"ok": False, "error": "not started: no space left on device"}


def test_the_mixer_it_runs_is_the_models_in_the_engines_dtype_on_packed_rows():
    from fusiontree.config import KernelConfig
    from fusiontree.models.config import model_preset
    from fusiontree.ops import resolve_kernels

    kernels = resolve_kernels(KernelConfig(ssd="reference", conv1d="reference"), "cpu")
    cfg = model_preset("debug")
    mixer = warmup.mixer_forward_backward(cfg, kernels, 2, 64, torch.bfloat16, torch.device("cpu"))
    assert mixer.in_proj.weight.shape[0] == 2 * cfg.ssm_d_inner + 2 * cfg.ssm_groups * cfg.ssm_state + cfg.ssm_heads
    for name, p in mixer.named_parameters():
        assert p.dtype == torch.bfloat16, name  # DeepSpeed's bf16 engine casts every parameter
        assert p.grad is not None and torch.isfinite(p.grad.float()).all(), name


def test_a_failed_process_is_reported_and_the_first_kernel_call_goes_on(tmp_path, caplog):
    """On CPU the SSD resolves to the reference: the process reports that it had nothing to
    autotune, and the waiting first call logs it and returns."""
    spec = warmup.make_spec(_cfg(), "cpu", 2, 64, False, 1)
    spec["kernels"]["ssd"] = "reference"
    marker, log_file = tmp_path / "cache" / "m.json", tmp_path / "warmup.log"
    proc = warmup.start(spec, marker, log_file)
    warmup.expect(marker, proc, log_file, timeout_s=120)
    assert common._before_first_call
    with caplog.at_level(logging.WARNING, logger="fusiontree.train"):
        common.run_before_first_kernel_call()
    assert not common._before_first_call and proc.returncode == 1
    assert "resolved to reference, not mamba-ssm's" in caplog.text and str(log_file) in caplog.text
    assert "Traceback" in log_file.read_text()


def test_a_process_that_reports_nothing_or_too_late_is_not_waited_for_forever(tmp_path):
    """Our own process ending without a report, or not reporting in time (it is stopped): the
    failure is the answer, and is written as its report, which the node's other ranks (waiting
    on the report alone) then read. A process that reports and lingers is stopped after a grace."""
    marker = tmp_path / "m.json"
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    failed = {"ok": False, "error": "the process ended with code 3 and no report"}
    assert warmup.wait(marker, dead, timeout_s=60) == failed
    assert warmup.wait(marker, None, timeout_s=5) == failed
    marker.unlink()
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    report = warmup.wait(marker, slow, timeout_s=0.5)
    assert report["ok"] is False and report["error"].startswith("no report within")
    assert slow.poll() is not None and slow.returncode != 0  # stopped, and reaped
    assert warmup.wait(marker, None, timeout_s=5) == report
    marker.unlink()
    lingering = subprocess.Popen([sys.executable, "-c", "import json, pathlib, time; "
                                  f"pathlib.Path({str(marker)!r}).write_text(json.dumps({{'ok': True, 'seconds': 2.0}})); "
                                  "time.sleep(60)"])
    assert warmup.wait(marker, lingering, timeout_s=60, exit_grace_s=0.5) == {"ok": True, "seconds": 2.0}
    assert lingering.poll() is not None and lingering.returncode != 0
    marker.unlink()
    # another rank's view: no process of its own, the report appears
    marker.write_text('{"ok": true, "seconds": 1.5}')
    assert warmup.wait(marker, None, timeout_s=5) == {"ok": True, "seconds": 1.5}


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="Triton autotuning needs a CUDA device, and this machine has none (run it on a GPU)")
def test_after_the_process_the_trainer_times_only_what_tritons_cache_cannot_hold(tmp_path):
    """In a fresh process with empty caches: the autotuning process times every kernel's
    candidates (Triton prints each autotuning it runs), then this process's first SSD forward
    and backward, on the same mixer and shape, reads the choices from the cache. Triton's cache
    leaves out kernels whose configs carry a pre-hook (mamba-ssm's backward kernels zero their
    gradient buffers in one): only those are timed again, on candidates already compiled."""
    pytest.importorskip("mamba_ssm", reason="mamba-ssm is not installed (the GPU machine builds it)")
    script = textwrap.dedent(f"""
        import json, pathlib
        from triton.runtime.autotuner import Autotuner
        from fusiontree.config import RunConfig
        from fusiontree.models.config import ModelConfig
        from fusiontree.train import autotune_warmup as w
        from mamba_ssm.ops.triton import ssd_bmm, ssd_chunk_scan, ssd_chunk_state, ssd_combined, ssd_state_passing
        mods = (ssd_bmm, ssd_chunk_scan, ssd_chunk_state, ssd_combined, ssd_state_passing)
        hooked = sorted({{o.base_fn.__name__ for m in mods for o in vars(m).values()
                         if isinstance(o, Autotuner) and any(c.pre_hook for c in o.configs)}})
        print("HOOKED", json.dumps(hooked), flush=True)
        cfg = RunConfig()
        cfg.model = ModelConfig(preset="debug", vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                                head_dim=64, ssm_head_dim=64, ssm_state=128, chunk_size=256, mlp_hidden=384,
                                window=64)
        spec = w.make_spec(cfg, "cuda:0", 2, 1024, True, 4)
        spec["kernels"]["ssd"] = "mamba_ssm"
        tmp = pathlib.Path({str(tmp_path)!r})
        marker, log_file = tmp / "m.json", tmp / "warmup.log"
        proc = w.start(spec, marker, log_file)
        w.expect(marker, proc, log_file)
        print("TRAINER STARTS", flush=True)
        w.run(spec)
        print("TRAINER DONE", json.loads(marker.read_text())["ok"], flush=True)
    """)
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton"), "TRITON_CACHE_AUTOTUNING": "1",
           "TRITON_PRINT_AUTOTUNING": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "TRAINER DONE True" in res.stdout, res.stdout[-3000:]
    tuned = re.compile(r"Triton autotuning for function (\w+),")
    hooked = set(json.loads(res.stdout.split("HOOKED ", 1)[1].splitlines()[0]))
    ahead = set(tuned.findall((tmp_path / "warmup.log").read_text()))
    again = set(tuned.findall(res.stdout.split("TRAINER STARTS", 1)[1]))
    cacheable = ahead - hooked
    assert len(cacheable) >= 5, (sorted(ahead), sorted(hooked))
    assert again <= hooked, sorted(again - hooked)  # every cacheable choice came from the cache
