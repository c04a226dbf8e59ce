"""What a run checks and says while it starts: the port of a one-process run, what DeepSpeed
compiles on a first CPU run, a window that covers every training length."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from fusiontree.config import load_config
from fusiontree.train.distributed import deepspeed_cpu_op_message
from fusiontree.train.trainer import window_warning
from tests.train.conftest import ROOT, env, write_config

FIXED_PORT = 29500  # torch's and DeepSpeed's default MASTER_PORT

INIT_ONE_PROCESS = """
import os
from fusiontree.train.distributed import init_distributed, shutdown
init_distributed(device="cpu")
print("MASTER_PORT", os.environ["MASTER_PORT"])
shutdown()
"""


def test_a_one_process_run_takes_a_free_port_when_none_is_set():
    """With the default port in use (another run on this machine), a one-process run without
    MASTER_PORT still starts its process group."""
    e = {k: v for k, v in env().items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE",
                                                     "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")}
    with socket.socket() as busy:
        try:
            busy.bind(("", FIXED_PORT))
            busy.listen()
        except OSError:
            pass  # something else holds the port already: busy all the same
        res = subprocess.run([sys.executable, "-c", INIT_ONE_PROCESS], env=e, cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    port = int(res.stdout.split("MASTER_PORT ")[1].split()[0])
    assert port != FIXED_PORT


def test_a_first_cpu_run_says_what_it_compiles_and_where(tmp_path, monkeypatch):
    built = ROOT / ".venv/torch_extensions"
    if (built / "deepspeed_shm_comm").is_dir():  # `make setup` builds it there
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(built))
        assert deepspeed_cpu_op_message() is None
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    message = deepspeed_cpu_op_message()
    assert message is not None and str(tmp_path / "ext" / "deepspeed_shm_comm") in message
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    message = deepspeed_cpu_op_message()
    assert str(tmp_path / "cache") in message and "set TORCH_EXTENSIONS_DIR" in message


def test_a_window_covering_every_training_length_is_warned_about():
    short = ["--model.preset=debug", "--data.curriculum=[{seq_len: 64, until_tokens: 0}]"]
    cfg = load_config(None, short + ["--model.window=64"])
    assert "model.window=64 covers every training length (the longest is 64)" in window_warning(cfg)
    assert window_warning(load_config(None, short + ["--model.window=32"])) is None
    longer = ["--data.curriculum=[{seq_len: 64, until_tokens: 100}, {seq_len: 128, until_tokens: 0}]"]
    assert window_warning(load_config(None, ["--model.preset=debug", "--model.window=64"] + longer)) is None


def test_resuming_with_a_changed_config_lists_the_keys_in_one_line(tmp_path, train_shards):
    """launch/train.py --resume with a config that differs from the checkpoint's: one line,
    exit status 2, the differing keys and the flag that accepts them; before any start-up."""
    from fusiontree.checkpoint import write_model_checkpoint
    from fusiontree.config import dump_config, load_config

    out = tmp_path / "run"
    cfg_path = write_config(tmp_path / "c.yaml", train_shards, out)
    write_model_checkpoint(out / "checkpoints/step_00000003", {}, dump_config(load_config(cfg_path)), {"step": 3})
    script = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(cfg_path), "--resume", "auto"]
    res = subprocess.run([*script, "--train.lr_peak=0.5", "--data.micro_batch_tokens=128"], env=env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr[-3000:]
    assert "(data.micro_batch_tokens: 256 -> 128; train.lr_peak: 0.003 -> 0.5)" in res.stderr
    assert "--allow_config_change data.micro_batch_tokens,train.lr_peak" in res.stderr
    res = subprocess.run([*script, "--model.d_model=32", "--allow_config_change", "model"], env=env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "the model config differs" in res.stderr and "model.d_model" in res.stderr
