"""Tensor-parallel checkpoints are consolidated before export; an export imports back exactly,
and training continues from the import with a fresh optimizer."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import yaml

from fusiontree.checkpoint import checkpoint_tokenizer, file_record, load_checkpoint
from fusiontree.config import dump_config, load_config
from fusiontree.hf.checkpoints import read_checkpoint
from fusiontree.hf.convert import from_hf_state_dict
from fusiontree.hf.export import export_hf, import_hf, load_safetensors
from fusiontree.parallel.reshard import shard_state_dict
from tests.hf.conftest import losses, run_config, train, train_config, VOCAB
from tests.models.conftest import perturb_


def _plain_model(shards):
    from fusiontree.config import model_preset
    from fusiontree.models import HybridLanguageModel

    cfg = dataclasses.replace(model_preset("debug"), vocab_size=VOCAB, ssm_groups=2)
    torch.manual_seed(3)
    return perturb_(HybridLanguageModel(cfg), 3).eval()


def test_tensor_parallel_engine_files_are_consolidated(tmp_path, hf_shards):
    """A TP=2 checkpoint without model.pt: DeepSpeed's per-rank module files (the layout a
    `--parallel.tensor_parallel=2` run writes: engine/mp_rank_0R_model_states.pt holding the
    rank's share under "module", with megatron's _extra_state entries) export to the plain
    weights, exactly."""
    model = _plain_model(hf_shards)
    plain = model.state_dict()
    ckpt = tmp_path / "tp_ckpt"
    (ckpt / "engine").mkdir(parents=True)
    cfg = run_config(hf_shards, tmp_path)
    cfg = dataclasses.replace(cfg, model=model.cfg, parallel=dataclasses.replace(cfg.parallel, tensor_parallel=2))
    (ckpt / "config.yaml").write_text(dump_config(cfg))
    (ckpt / "meta.json").write_text(json.dumps({"step": 5, "tokenizer": str(hf_shards / "tokenizer.model")}))
    for rank in range(2):
        shard = shard_state_dict(plain, model.cfg, tensor_parallel=2, rank=rank)
        shard["layers.0.attn.wq._extra_state"] = None
        assert shard["layers.0.mamba.in_proj.weight"].shape[0] < plain["layers.0.mamba.in_proj.weight"].shape[0]
        torch.save({"module": shard, "mp_world_size": 2}, ckpt / "engine" / f"mp_rank_{rank:02d}_model_states.pt")
    summary = export_hf(ckpt, tmp_path / "hf")
    assert summary["weights_from"] == "engine (TP=2 consolidated)"
    exported = from_hf_state_dict(load_safetensors(tmp_path / "hf"))
    assert sorted(exported) == sorted(plain)
    for name, t in plain.items():
        assert torch.equal(exported[name], t), name

    (ckpt / "engine" / "mp_rank_01_model_states.pt").unlink()
    with pytest.raises(ValueError, match="ranks \\[0\\].*tensor_parallel=2"):
        export_hf(ckpt, tmp_path / "hf2")


def test_import_gives_back_the_checkpoint_and_training_continues_from_it(trained_run, tmp_path, hf_shards):
    export_hf(trained_run, tmp_path / "hf")
    imported = import_hf(tmp_path / "hf", tmp_path / "imported")
    original = read_checkpoint(trained_run)
    back = read_checkpoint(imported)
    assert sorted(back.state) == sorted(original.state)
    for name, t in original.state.items():
        assert back.state[name].dtype == t.dtype and torch.equal(back.state[name], t), name
    assert back.cfg.model == original.cfg.model
    assert back.cfg.data.shards_dir == original.cfg.data.shards_dir  # the run config came along
    assert (imported / "tokenizer.model").read_bytes() == (hf_shards / "tokenizer.model").read_bytes()
    moved = shutil.copytree(imported, tmp_path / "moved")  # the checkpoint reads its own copy anywhere
    assert checkpoint_tokenizer(load_checkpoint(moved)).name == str(moved / "tokenizer.model")
    assert back.meta["kind"] == "imported" and back.meta["exported_step"] == 6
    assert json.loads((imported / "meta.json").read_text())["files"]["model.pt"] == file_record(imported / "model.pt")

    # Two steps from the imported weights == two steps from the original checkpoint's weights
    # (fresh optimizer both times), and they start far below the loss of a fresh model on the
    # same first batch (the trained run's first step: same data, seed and model config).
    config = train_config(hf_shards, 2)
    config["train"]["checkpoint_every_steps"] = 100
    runs = {"fresh": losses(trained_run)}
    for name, init in (("imported", imported), ("original", original.path)):
        # a run directory of its own: a run writes its config.yaml there, which would be the
        # imported checkpoint's (its content hash then no longer matches)
        train(config, tmp_path / f"run_{name}", "--init_from", str(init))
        runs[name] = losses(tmp_path / f"run_{name}")
    assert runs["imported"] == runs["original"]
    assert runs["imported"][1] < runs["fresh"][1] - 0.3, runs


def test_import_and_init_from_refuse_bad_input(tmp_path, trained_run, hf_shards):
    with pytest.raises(ValueError, match="has no config.json"):
        import_hf(tmp_path, tmp_path / "out")
    export_hf(trained_run, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 128}))
    with pytest.raises(ValueError, match=r"config.json\) do not match its model config"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    # --init_from with weights of another shape: a clear error, not a half-loaded model
    config = train_config(hf_shards, 1)
    config["model"]["d_model"] = 32
    run = tmp_path / "mismatch"
    run.mkdir()
    (tmp_path / "mismatch.yaml").write_text(yaml.safe_dump({**config, "out_dir": str(run)}))
    with pytest.raises(AssertionError, match="do not fit this run's model config"):
        train(config, run, "--init_from", str(trained_run))
    assert load_config(tmp_path / "mismatch.yaml").model.d_model == 32


def test_safetensors_writer_is_read_back_by_the_safetensors_library(tmp_path):
    from safetensors import safe_open

    from fusiontree.hf.export import save_file

    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "scalar": torch.tensor(3.0),
               "i64": torch.arange(5), "strided": torch.randn(4, 4)[:, 1], "empty": torch.zeros(0, 3),
               "flag": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "x.safetensors"), {"format": "pt"})
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name
    with pytest.raises(ValueError, match="safetensors cannot store"):
        save_file({"c": torch.zeros(2, dtype=torch.complex64)}, str(tmp_path / "y.safetensors"), {})
