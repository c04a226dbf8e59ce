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
from tests.train.conftest import ROOT, env

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
