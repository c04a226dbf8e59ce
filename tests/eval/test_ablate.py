"""launch/ablate.py: a smoke ablation end to end (data build with passkey documents, two
training runs in parallel, a pruned variant that shares a run), and strict file checking."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from fusiontree.config import load_config
from fusiontree.ablation import ROOT, _override_args, load_ablation, run_ablation

SMOKE = {
    "name": "smoke",
    "description": "two gates, 3 steps each",
    "data_build": {"inputs": ["stdlib:json"], "vocab_size": 400, "seq_lengths": [128], "val_fraction": 0.3,
                   "passkey": {"docs": 40, "max_filler": 6}},
    "base": {"model": {"preset": "debug", "vocab_size": 400, "max_seq_len": 512},
             "data": {"global_batch_tokens": 256, "micro_batch_tokens": 256, "num_workers": 0,
                      "verify_shards": "size", "curriculum": [{"seq_len": 128, "until_tokens": 0}]},
             "train": {"steps": 3, "lr_warmup_steps": 1, "device": "cpu", "eval_every_steps": 1000,
                       "checkpoint_every_steps": 1000, "gate_stats_every_steps": 1, "log_every_steps": 1},
             "generate": {"max_new_tokens": 2}},
    "variants": {"channel": {"model.gate": "channel"}, "token": {"model.gate": "token"},
                 "channel-pruned": {"overrides": {"model.gate": "channel"}, "prune": {"branches": ["0:attention"]}}},
    "eval": {"tasks": ["ppl", "needle"], "threads": 1,
             "options": {"ppl": {"max_batches": 1}, "needle": {"contexts": [128], "depths": [0.0, 1.0],
                                                                  "trials": 2}}},
    "jobs": 2,
}


def _write(tmp_path: Path, spec: dict) -> Path:
    spec = dict(spec, out_dir=str(tmp_path / "out"))
    if "data_build" in spec and isinstance(spec["data_build"], dict):
        spec["data_build"] = dict(spec["data_build"], output=str(tmp_path / "data" / "shards"))
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_smoke_ablation_end_to_end(tmp_path):
    res = run_ablation(_write(tmp_path, SMOKE))
    out = tmp_path / "out"
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["channel", "token", "channel-pruned"]
    assert len(list((out / "runs").iterdir())) == 2  # the pruned variant reuses the channel run
    assert {r["train tokens"] for r in rows.values()} == {3 * 256}  # same tokens for every variant
    assert rows["channel-pruned"]["pruned"] == "0:attention"
    assert rows["channel-pruned"]["params (M)"] < rows["channel"]["params (M)"]
    assert rows["token"]["params (M)"] > rows["channel"]["params (M)"]  # the per-token gate's projection
    for name in ("results.md", "results.json", "results.png", "base_config.yaml"):
        assert (out / name).is_file(), name
    md = (out / "results.md").read_text()
    assert "| channel-pruned |" in md and "passkey@128" in md and "val ppl" in md
    saved = json.loads((out / "results.json").read_text())
    assert saved["variants"]["token"]["eval"]["needle"]["contexts"] == [128]
    # a second run trains nothing: the finished runs are found and reused
    first_ckpts = sorted(str(p) for p in (out / "runs").rglob("step_*"))
    res2 = run_ablation(_write(tmp_path, SMOKE), only=["token"])
    assert [r["variant"] for r in res2["rows"]] == ["token"]
    assert sorted(str(p) for p in (out / "runs").rglob("step_*")) == first_ckpts
    assert res2["variants"]["token"]["train_s"] == res["variants"]["token"]["train_s"]  # reported, not re-measured
    assert "1 of them reused" in (out / "results.md").read_text()


def test_ablation_files_are_checked_strictly(tmp_path):
    bad = dict(SMOKE, colour="red")
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        load_ablation(_write(tmp_path, bad))
    mixed = dict(SMOKE, variants={"x": {"prune": "auto", "model.gate": "token"}})
    with pytest.raises(ValueError, match="put the overrides under 'overrides'"):
        load_ablation(_write(tmp_path, mixed))
    pk = dict(SMOKE, data_build=dict(SMOKE["data_build"], passkey={"docs": 3, "length": 9}))
    with pytest.raises(ValueError, match="data_build.passkey: unknown keys \\['length'\\]"):
        load_ablation(_write(tmp_path, pk))
    opts = dict(SMOKE, eval={"tasks": ["ppl"], "options": {"needle_size": 3}})
    with pytest.raises(ValueError, match="eval.options: unknown config key 'needle_size'"):
        load_ablation(_write(tmp_path, opts))


@pytest.mark.parametrize("path", sorted((ROOT / "configs/ablations").glob("*.yaml")), ids=lambda p: p.name)
def test_committed_ablation_files_load_and_every_variant_is_a_valid_run_config(path, tmp_path):
    spec = yaml.safe_load(path.read_text())
    if "variants" not in spec:  # a shared piece: the base run config or the data spec of other ablation files
        rel = str(path.relative_to(ROOT))
        users = {key: [load_ablation(f) for f in sorted(path.parent.glob("*.yaml"))
                       if re.search(rf"^{key}: {re.escape(rel)}$", f.read_text(), re.M)]
                 for key in ("base_config", "data_build")}
        assert users["base_config"] or users["data_build"], f"no ablation file uses {rel}"
        for ab in users["data_build"]:  # their shards are built from it
            assert ab.data_build is not None and ab.data_build.output == spec["output"]
        if users["base_config"]:  # a valid run config on its own
            assert load_config(path).train.steps > 0
        return
    ab = load_ablation(path)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(ab.base))
    for v in ab.variants:
        cfg = load_config(base, _override_args(v.overrides))
        assert cfg.train.steps * cfg.data.global_batch_tokens > 0


def test_a_bad_variant_fails_before_any_training(tmp_path):
    from fusiontree.ablation import train_all

    spec = dict(SMOKE, variants={"ok": {}, "bad": {"model.window": 0}})
    spec.pop("data_build")
    ab = load_ablation(_write(tmp_path, spec))
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(ab.base))
    with pytest.raises(ValueError, match="window=0 must be > 0"):
        train_all(ab, base, threads=1)
    assert not (tmp_path / "out" / "runs").exists()


def test_data_is_rebuilt_when_the_passkey_template_changes(tmp_path, monkeypatch):
    from fusiontree.eval import passkey
    from fusiontree.ablation import DataBuild, build_data

    spec = DataBuild(output=str(tmp_path / "shards"), inputs=["stdlib:json"], vocab_size=400, seq_lengths=[128],
                     val_fraction=0.3, passkey={"docs": 10, "max_filler": 4})
    manifest = build_data(spec) / "manifest.json"
    first = manifest.stat().st_mtime_ns
    assert build_data(spec) / "manifest.json" == manifest and manifest.stat().st_mtime_ns == first  # reused
    monkeypatch.setattr(passkey, "KEY_SENTENCE", "The pass key is {key}. {key}.")
    build_data(spec)
    assert manifest.stat().st_mtime_ns != first
    docs = (tmp_path / "shards.work" / "passkey.jsonl").read_text()
    assert "Remember it" not in docs


def test_runs_trained_at_once_take_a_gpu_each(tmp_path, monkeypatch):
    """jobs > 1 on a machine with GPUs: each concurrent run sees one GPU of its own
    (CUDA_VISIBLE_DEVICES), a finished run's GPU goes to the next; more jobs than GPUs is an
    error before anything starts."""
    import fusiontree.ablation as abl

    with pytest.raises(ValueError, match="set jobs to at most 2"):
        abl.GpuSlots(3, ["0", "1"])
    assert abl.GpuSlots(1, ["0", "1"]).take() is None and abl.GpuSlots(2, []).take() is None
    spec = {k: v for k, v in SMOKE.items() if k != "data_build"}
    spec["variants"] = {"a": {"model.gate": "channel"}, "b": {"model.gate": "token"}, "c": {"model.window": 8}}
    ab = load_ablation(_write(tmp_path, spec))
    base_yaml = tmp_path / "base.yaml"
    base_yaml.write_text(yaml.safe_dump(ab.base))
    started = []

    class FakeRun:  # run i ends at its (i % 2 + 1)-th poll: a first, then c takes a's GPU
        def __init__(self, cmd, env, **kwargs):
            self.i, self.polls, self.returncode = len(started), 0, 0
            started.append(env.get("CUDA_VISIBLE_DEVICES"))

        def poll(self):
            self.polls += 1
            return 0 if self.polls > self.i % 2 else None

        def kill(self):
            pass

        def wait(self):
            return 0

    monkeypatch.setattr(abl, "visible_gpus", lambda: ["7", "9"])
    monkeypatch.setattr(abl.subprocess, "Popen", FakeRun)
    monkeypatch.setattr(abl.time, "sleep", lambda s: None)
    with pytest.raises(RuntimeError, match="without a checkpoint"):  # the fake runs write none
        abl.train_all(ab, base_yaml, threads=1)
    assert started == ["7", "9", "7"]


def test_inputs_name_the_interpreters_own_sources():
    """`stdlib:REL` and `site:REL` (installed packages) resolve on any machine; a missing one is
    an error naming it."""
    from fusiontree.ablation import _input_path
    from fusiontree.eval.perplexity import expand_files

    assert (_input_path("site:yaml") / "__init__.py").is_file()  # PyYAML, a dependency of the project
    assert (_input_path("stdlib:json") / "decoder.py").is_file()
    assert [p.name for p in expand_files(["site:yaml/__init__.py", "stdlib:json/decoder.py"])] == ["__init__.py",
                                                                                                   "decoder.py"]
    with pytest.raises(ValueError, match="site:no_such_package"):
        _input_path("site:no_such_package")
