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
