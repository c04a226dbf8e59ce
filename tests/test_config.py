"""Strict YAML config loading, dotted overrides, validation messages and presets."""

import dataclasses
from pathlib import Path

import pytest

from fusiontree.config import (ParallelConfig, RunConfig, check_resume_config, config_from_dict, config_to_dict,
                               dump_config, load_config)
from fusiontree.models.config import model_preset, preset_names
from fusiontree.models.flops import count_params, transformer_twin_layers

ROOT = Path(__file__).resolve().parents[1]


def test_pretrain_v1_selects_a_preset_and_overrides_fields(tmp_path):
    cfg = load_config(ROOT / "configs/pretrain_v1.yaml")
    assert cfg.model.preset == "small" and cfg.model.d_model == 1024 and cfg.model.n_layers == 12
    assert cfg.data.curriculum[-1].seq_len == 4096
    cfg2 = load_config(ROOT / "configs/pretrain_v1.yaml", ["--model.window=2048", "--train.steps", "7", "--train.lr_warmup_steps=2",
                                                           "--model.preset=tiny"])
    assert cfg2.model.window == 2048 and cfg2.train.steps == 7 and cfg2.model.d_model == 256
    # the resolved config round-trips through YAML
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg2))
    assert load_config(p) == cfg2


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  d_modle: 512\n")
    with pytest.raises(ValueError, match=r"unknown config key model\.'d_modle'.*d_model"):
        load_config(p)
    with pytest.raises(ValueError, match="unknown config key 'trian'"):
        config_from_dict({"trian": {}})
    with pytest.raises(ValueError, match="unknown config key train.'stepz'"):
        load_config(None, ["--train.stepz=3"])


def test_types_and_choices_are_checked():
    with pytest.raises(ValueError, match="model.d_model='big' must be an integer"):
        load_config(None, ["--model.d_model=big"])
    with pytest.raises(ValueError, match=r"model.gate='layer' is not one of \['channel', 'token'\]"):
        load_config(None, ["--model.gate=layer"])
    with pytest.raises(ValueError, match=r"train.compile_backend='tvm' is not one of \['inductor', 'aot_eager'\]"):
        load_config(None, ["--train.compile_backend=tvm"])
    with pytest.raises(ValueError, match="must look like --section.key=value"):
        load_config(None, ["model.d_model=3"])
    assert load_config(None, ["--train.lr_peak=1"]).train.lr_peak == 1.0  # int accepted for float
    with pytest.raises(ValueError, match=r"train.skip_on_device='maybe' matches none of bool \| 'auto'"):
        load_config(None, ["--train.skip_on_device=maybe"])
    assert [load_config(None, [f"--train.skip_on_device={v}"]).train.skip_on_device
            for v in ("true", "false", "auto")] == [True, False, "auto"]


@pytest.mark.parametrize("override,match", [
    (["--model.n_heads=6", "--model.n_kv_heads=4"], "n_heads=6 must be divisible by n_kv_heads=4; pick n_kv_heads among"),
    (["--model.window=0"], "window=0 must be > 0"),
    (["--model.attn_pattern=LXG"], "attn_pattern='LXG'"),
    (["--model.ssm_groups=3"], "must be divisible by ssm_groups=3"),
    (["--model.block=serial", "--model.mixer=attention"], "block='serial'"),
    (["--data.curriculum=[{seq_len: 4096, until_tokens: 0}]", "--data.micro_batch_tokens=4096"],
     "data.curriculum reaches seq_len=4096, beyond model.max_seq_len=2048"),
    (["--model.preset=huge"], "unknown model preset 'huge'"),
    # the sample after training: checked before training starts, not at the sample
    (["--generate.top_p=0"], r"generate.top_p=0.0 must lie in \(0, 1\]"),
    (["--generate.temperature=-0.5"], r"generate.temperature=-0.5 must be >= 0"),
    (["--generate.top_k=-1"], r"generate.top_k=-1 must be >= 0"),
    (["--model.max_seq_len=128", "--data.curriculum=[{seq_len: 64, until_tokens: 0}]",
      "--generate.max_new_tokens=127"], r"generate.max_new_tokens=127 must lie in \[0, 126\]"),
])
def test_validation_says_how_to_fix(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, override)


def test_presets():
    assert set(preset_names()) >= {"debug", "tiny", "small", "1b", "transformer-tiny", "transformer-1b"}
    assert 8e6 <= count_params(model_preset("tiny")) <= 13e6
    small = model_preset("small")
    assert (small.d_model, small.n_layers) == (1024, 12)
    assert 1.0e9 <= count_params(model_preset("1b")) <= 1.5e9
    assert 7.0e9 <= count_params(model_preset("7b")) <= 8.5e9
    for tp in (2, 4, 8):  # every split of the 7B preset divides
        ParallelConfig(tensor_parallel=tp, sequence_parallel=True).validate(model_preset("7b"), [32768])
    for name in ("tiny", "small", "1b", "7b"):
        twin = model_preset(f"transformer-{name}")
        assert twin.mixer == "attention" and twin.attn_pattern == "G"
        assert abs(count_params(twin) / count_params(model_preset(name)) - 1) < 0.05
    assert isinstance(RunConfig().model, type(small))
    assert dataclasses.replace(small, window=512).window == 512


def test_transformer_twin_depths_follow_the_parameter_count_rule():
    """The twins' depths in the preset table are those the model's own parameter count gives."""
    for name in ("debug", "tiny", "small", "1b", "7b"):
        want = transformer_twin_layers(model_preset(name))
        assert model_preset(f"transformer-{name}").n_layers == want, (
            f"transformer-{name}: set its depth in fusiontree/models/config.py to {want}")


def test_generate_accepts_its_bounds():
    cfg = load_config(None, ["--model.max_seq_len=128", "--data.curriculum=[{seq_len: 64, until_tokens: 0}]",
                             "--generate.max_new_tokens=126", "--generate.top_p=1", "--generate.temperature=0"])
    assert cfg.generate.max_new_tokens == 126
    cfg.generate.check_prompt_fits(1, 128)
    with pytest.raises(ValueError, match="generate.prompt is 2 tokens.*--generate.max_new_tokens=125"):
        cfg.generate.check_prompt_fits(2, 128)


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: debug\ntrain:\n  steps: [1, 2\n  lr_peak: 3\n")
    with pytest.raises(ValueError, match=rf"^{bad}:5:\d+: YAML syntax error: .*fix the file there$") as e:
        load_config(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"--train.steps=\[1: not a YAML value"):
        load_config(None, ["--train.steps=[1"])


def test_resume_lists_the_changed_keys_and_allows_the_named_ones():
    saved = config_to_dict(load_config(None, []))
    same = check_resume_config(saved, load_config(None, []))
    assert same == []
    # where a run logs and saves, and its layout, change freely (and are reported)
    free = check_resume_config(saved, load_config(None, ["--train.log_every_steps=7", "--out_dir=elsewhere"]))
    assert free == ["out_dir: 'runs/default' -> 'elsewhere'", "train.log_every_steps: 10 -> 7"]
    # a key added since the checkpoint was saved, which changes how and not what is computed
    older = {k: {kk: vv for kk, vv in v.items() if kk != "optimizer_impl"} if isinstance(v, dict) else v
             for k, v in saved.items()}
    assert check_resume_config(older, load_config(None, [])) == ["train.optimizer_impl: '<absent>' -> 'auto'"]
    changed = load_config(None, ["--train.steps=50", "--train.lr_peak=0.01", "--data.micro_batch_tokens=1024"])
    with pytest.raises(ValueError, match=r"\(data.micro_batch_tokens: .*; train.lr_peak: .*; train.steps: .* -> 50\); "
                                         r".*--allow_config_change data.micro_batch_tokens,train.lr_peak,train.steps$"):
        check_resume_config(saved, changed)
    assert len(check_resume_config(saved, changed, ["train", "data.micro_batch_tokens"])) == 3
    with pytest.raises(ValueError, match="--allow_config_change data.micro_batch_tokens,train.lr_peak$"):
        check_resume_config(saved, changed, ["train.steps"])
    with pytest.raises(ValueError, match="--allow_config_change train.step: no config key matches it"):
        check_resume_config(saved, changed, ["train.step"])
    # the model never changes under a resume, allowed or not
    with pytest.raises(ValueError, match=r"the model config differs .*\(model.d_model: .* -> 128\).*--init_from"):
        check_resume_config(saved, load_config(None, ["--model.d_model=128"]), ["model"])
