"""benchmarks/decode_gpu.py --dry-run: every decode path of the GPU benchmark runs on the CPU
(debug preset), so a GPU call does not fail on the script itself. Its times mean nothing."""

import json
import subprocess
import sys

from tests.train.conftest import ROOT, env


def test_decode_benchmark_dry_run_covers_every_path(tmp_path):
    out = tmp_path / "decode.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/decode_gpu.py"), "--dry-run", "--twin-flash",
                          "--modes", "eager,graph", "--contexts", "40", "--batches", "1,2", "--steps", "3",
                          "--out", str(out), "--profile", str(tmp_path / "prof")], env=env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    cases = {(r["model"], r["decode_attention"], r["batch"]) for r in rows}
    assert cases == {(m, p, b) for m in ("debug", "transformer-debug") for p in ("all_slots", "filled_blocks")
                     for b in (1, 2)} | {("transformer-debug", "sdpa_flash", b) for b in (1, 2)}
    for r in rows:
        assert "error" not in r, r
        assert r["eager_ms_per_token"] > 0 and r["graph_ms_per_token"] > 0 and r["tokens_per_s"] > 0
        assert r["floor_bytes_per_token"] <= r["bytes_per_token"]
        assert r["kernels"].endswith("decode_attention=filled_blocks") == (r["decode_attention"] == "filled_blocks")
    # the fixed-length flash step is the model's step when its length is the filled count
    flash = next(r for r in rows if r["decode_attention"] == "sdpa_flash" and r["batch"] == 1)
    assert flash["first_step_max_err"] < 1e-4
    for r in rows:  # one kernel profile per graphed case, named in its row
        text = (tmp_path / "prof" / r["graph_profile"]).read_text()
        assert r["graph_profile"] == f"{r['model']}_{r['decode_attention']}_40_b{r['batch']}_graph.txt"
        assert "Self CPU" in text and "8 steps" in text
    assert "| debug | filled_blocks | 40 | 2 |" in res.stdout and "Tokens/s at batch 2 over batch 1" in res.stdout
    best = next(line for line in res.stdout.splitlines() if line.startswith("  context 40, batch 2: debug"))
    mine, twin = (max((r for r in rows if (r["model"], r["batch"]) == (m, 2)), key=lambda r: r["tokens_per_s"])
                  for m in ("debug", "transformer-debug"))
    assert f"bytes per step {twin['bytes_per_token'] / mine['bytes_per_token']:.2f}x" in best, best


def test_decode_benchmark_refuses_bad_option_objects_in_one_line(tmp_path):
    """--inductor-options and --decode-kernel-options take JSON objects and --max-slots-per-split
    a positive count; anything else stops the script before any work with a one-line error
    naming the flag and an example."""
    script = str(ROOT / "benchmarks/decode_gpu.py")
    for flag, value in (("--inductor-options", "{coordinate"), ("--decode-kernel-options", "[4]"),
                        ("--max-slots-per-split", "-5")):
        res = subprocess.run([sys.executable, script, "--dry-run", flag, value, "--out", str(tmp_path / "x.json")],
                             env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert res.returncode != 0
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(flag) and "such as" in last, res.stderr[-2000:]
    assert not (tmp_path / "x.json").exists()


def test_decode_benchmark_dry_run_with_decode_kernel_options(tmp_path):
    out = tmp_path / "decode.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/decode_gpu.py"), "--dry-run", "--no-twin",
                          "--decode-attention", "filled_blocks", "--modes", "graph", "--contexts", "40",
                          "--batches", "1", "--steps", "2", "--decode-kernel-options", '{"SPLIT_KV": 2}',
                          "--out", str(out)], env=env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "--decode-kernel-options" in data["meta"]["command"]
    assert [r["decode_attention"] for r in data["rows"]] == ["filled_blocks"]
