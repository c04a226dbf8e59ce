"""benchmarks/train_e2e_gpu.py's own mechanics that a GPU call depends on: a case cut at its
time limit takes its launcher's training processes with it (they would keep their GPU memory
and fail the next case), and a dry run maps every case onto the debug preset (a 7b case run
as given would exhaust a CPU machine's memory)."""

from __future__ import annotations

import importlib.util
import os
import sys
import time

from tests.train.conftest import ROOT


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("train_e2e_gpu", ROOT / "benchmarks/train_e2e_gpu.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = open(f"/proc/{pid}/status").read() if os.path.exists(f"/proc/{pid}/status") else ""
    return "State:\tZ" not in status  # a zombie is dead, waiting for its parent to be reaped


def test_a_cut_case_takes_its_whole_process_group_with_it(tmp_path):
    bench = _bench()
    child_pid = tmp_path / "child.pid"
    # a launcher that starts a worker and waits for it, as the deepspeed runner does
    launcher = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
                f"time.sleep(600)']); open({str(child_pid)!r}, 'w').write(str(p.pid)); p.wait()")
    with open(tmp_path / "log", "w") as log:
        t0 = time.time()
        code, cut = bench.run_group([sys.executable, "-c", launcher], dict(os.environ), 5, stdout=log)
    assert cut and code != 0 and time.time() - t0 < 60
    pid = int(child_pid.read_text())
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the launcher's worker outlived the cut"
    with open(tmp_path / "log2", "w") as log:
        assert bench.run_group([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), 60, stdout=log) == (3, False)


def test_a_dry_run_case_is_the_debug_preset_with_the_same_flags():
    bench = _bench()
    for case, preset in [("7b@32768x1+ckpt+tp2+acc1", "debug"), ("transformer-1b@4096x4+compile+ckpt10", "transformer-debug"),
                         ("mamba-ref-1b@32768x1+ckpt10", "mamba-ref-debug")]:
        c = bench.parse_case(case)
        d = bench.dry_run_case(c)
        assert d["preset"] == preset and d["seq_len"] == bench.DRY_SEQ and d["case"] == case
        assert {k: d[k] for k in ("tp", "gpus", "compile", "accum")} == {k: c[k] for k in ("tp", "gpus", "compile", "accum")}
        assert (d["checkpoint_layers"] is None) == (c["checkpoint_layers"] is None)


def test_save_flags_take_an_interval():
    bench = _bench()
    got = {case: (c["save"], c["save_every"], c["async_save"])
           for case in ("1b@32768x1+asave", "1b@32768x1+asave12", "1b@32768x1+save3", "1b@32768x1")
           for c in [bench.parse_case(case)]}
    assert got == {"1b@32768x1+asave": (True, 5, True), "1b@32768x1+asave12": (True, 12, True),
                   "1b@32768x1+save3": (True, 3, False), "1b@32768x1": (False, 0, False)}


def test_case_settings_reach_the_trainer_command(tmp_path):
    from types import SimpleNamespace

    import pytest

    bench = _bench()
    c = bench.parse_case("small@4096x4+compile+graphs~train.compile_loss=true~model.chunk_size=128")
    assert c["preset"] == "small" and c["graphs"] and c["settings"] == {"train.compile_loss": "true",
                                                                         "model.chunk_size": "128"}
    args = SimpleNamespace(vocab=32000, shards=tmp_path, steps=10, dry_run=False)
    cmd = bench.trainer_command(c, args, tmp_path / "run", tmp_path / "cache")
    assert "--train.compile_loss=true" in cmd and "--model.chunk_size=128" in cmd and "--train.compile=True" in cmd
    assert bench.parse_case("small@4096x4")["settings"] == {}
    for bad in ("small@4096x4~compile_loss", "small@4096x4~train.x", "mamba-ref-1b@4096x1~train.compile=true"):
        with pytest.raises(SystemExit):
            bench.parse_case(bad)


def test_overlap_flag_gives_the_trainer_a_deepspeed_json_with_overlapped_reduction(tmp_path):
    import json
    from types import SimpleNamespace

    bench = _bench()
    args = SimpleNamespace(vocab=32000, shards=tmp_path, steps=10, dry_run=False)
    plain = bench.trainer_command(bench.parse_case("1b@32768x1+gpus2+z2"), args, tmp_path / "runs/a", tmp_path / "c")
    assert plain[plain.index("--ds_config") + 1].endswith("configs/ds/zero2.json")
    c = bench.parse_case("1b@32768x1+gpus2+z2+overlap")
    cmd = bench.trainer_command(c, args, tmp_path / "runs/b", tmp_path / "c")
    ds = json.loads(open(cmd[cmd.index("--ds_config") + 1]).read())
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["overlap_comm"] is True and ds["zero_optimization"]["contiguous_gradients"] is True
    assert "overlap_comm" in bench.layout(c) and "overlap_comm" not in bench.layout(bench.parse_case("1b@32768x1+gpus2"))
    assert not (tmp_path / "runs/b").exists()  # the run directory stays the trainer's to create


def test_a_profiled_peer_case_asks_train_gpu_for_a_profile_and_keeps_it_next_to_the_json(tmp_path):
    """The peer (mamba-ssm's model through benchmarks/train_gpu.py) honours +profile as the
    trainer cases do: the table lands next to the benchmark's JSON and the row names it."""
    import json
    from types import SimpleNamespace

    bench = _bench()
    seen = {}

    def fake_train_gpu(cmd, env, timeout, stdout):  # what train_gpu.py writes for one case
        seen["cmd"] = cmd
        row = dict(case="peer", tokens_per_s=10.0, peak_mem_gib=1.0, kernels="mamba-ssm")
        if "--profile" in cmd:
            prof_dir = cmd[cmd.index("--profile") + 1]
            os.makedirs(prof_dir, exist_ok=True)
            row["profile"] = os.path.join(prof_dir, "profile_peer.txt")
            with open(row["profile"], "w") as f:
                f.write("GPU busy 1.0 ms, 3 kernels\n")
        with open(cmd[cmd.index("--out") + 1], "w") as f:
            json.dump({"rows": [row]}, f)
        return 0, False

    bench.run_group = fake_train_gpu
    args = SimpleNamespace(case_timeout=60, out=str(tmp_path / "out" / "e2e.json"))
    (tmp_path / "out").mkdir()
    row = bench.run_peer_case(bench.parse_case("mamba-ref-1b@32768x1+fused+ckpt10+profile"), args, tmp_path, {})
    assert "--profile" in seen["cmd"] and "+profile" not in seen["cmd"][seen["cmd"].index("--cases") + 1]
    assert row["profile"] == str(tmp_path / "out" / "profile_e2e_mamba-ref-1b_32768x1_ckpt10_fused.txt")
    assert open(row["profile"]).read().startswith("GPU busy 1.0 ms")
    unprofiled = bench.run_peer_case(bench.parse_case("mamba-ref-1b@32768x1+fused"), args, tmp_path, {})
    assert "--profile" not in seen["cmd"] and "profile" not in unprofiled
