"""What a run checks and says while it starts: the port of a one-process run, what DeepSpeed
compiles on a first CPU run, a window that covers every training length."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from fusiontree.config import load_config
from fusiontree.train.distributed import build_deepspeed_cpu_op, deepspeed_cpu_op_message
from fusiontree.train.mechanics import EXPERIMENTAL_COMPILED_TP_ENV, compiled_tensor_parallel_error
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


def test_a_lock_left_by_a_killed_build_of_the_cpu_op_is_removed(tmp_path, monkeypatch, caplog):
    """torch's extension builder waits forever on a `lock` file that a killed build left; the
    build under the project's flock removes it and builds once, and a process that waited on the
    flock while another built does not build again."""
    import fcntl
    import importlib
    import threading

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` the attribute is torch

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    op_dir = tmp_path / "ext" / "deepspeed_shm_comm"
    op_dir.mkdir(parents=True)
    (op_dir / "lock").touch()  # what a SIGKILLed build leaves
    builds = []

    def fake_build():  # torch's builder would wait for `lock` to go; here it must be gone already
        assert not (op_dir / "lock").exists()
        builds.append(1)
        (op_dir / "deepspeed_shm_comm.so").touch()

    monkeypatch.setattr(ds_torch, "build_shm_op", fake_build)
    with caplog.at_level("WARNING", logger="fusiontree.train"):
        build_deepspeed_cpu_op()
    assert builds == [1]
    assert any("left by a build of deepspeed_shm_comm that was killed" in r.message for r in caplog.records)
    assert any("compiling DeepSpeed's CPU communication op" in r.message for r in caplog.records)
    build_deepspeed_cpu_op()  # built: nothing to do
    assert builds == [1]

    (op_dir / "deepspeed_shm_comm.so").unlink()
    (op_dir / "lock").touch()  # this time a live build holds the flock and finishes meanwhile
    with open(tmp_path / "ext" / "deepspeed_shm_comm.build-lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=build_deepspeed_cpu_op)
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive()  # waits on the flock
        (op_dir / "deepspeed_shm_comm.so").touch()
        (op_dir / "lock").unlink()
    waiter.join(timeout=30)
    assert not waiter.is_alive() and builds == [1]


def test_a_window_covering_every_training_length_is_warned_about():
    short = ["--model.preset=debug", "--data.curriculum=[{seq_len: 64, until_tokens: 0}]"]
    cfg = load_config(None, short + ["--model.window=64"])
    assert "model.window=64 covers every training length (the longest is 64)" in window_warning(cfg)
    assert window_warning(load_config(None, short + ["--model.window=32"])) is None
    longer = ["--data.curriculum=[{seq_len: 64, until_tokens: 100}, {seq_len: 128, until_tokens: 0}]"]
    assert window_warning(load_config(None, ["--model.preset=debug", "--model.window=64"] + longer)) is None


def test_compiled_blocks_under_tensor_parallelism_are_refused_on_cuda_only():
    """On CUDA the stalling combination stops at start-up with a one-line fix; gloo runs, plain
    data parallelism and the debugging switch go ahead."""
    error = compiled_tensor_parallel_error(2, "cuda", {})
    assert error is not None and "\n" not in error
    assert "set train.compile=false" in error and EXPERIMENTAL_COMPILED_TP_ENV in error
    assert compiled_tensor_parallel_error(1, "cuda", {}) is None
    assert compiled_tensor_parallel_error(2, "cpu", {}) is None
    assert compiled_tensor_parallel_error(2, "cuda", {EXPERIMENTAL_COMPILED_TP_ENV: "1"}) is None
    assert compiled_tensor_parallel_error(2, "cuda", {EXPERIMENTAL_COMPILED_TP_ENV: "0"}) is not None


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


def test_the_interpreters_ninja_builds_the_op(monkeypatch):
    """One ninja for every process: the venv's, first on PATH before a build (two ninja
    versions rebuild each other's builds)."""
    from pathlib import Path

    from fusiontree.train.distributed import interpreter_tools_first

    tools = str(Path(sys.executable).parent)
    if not (Path(tools) / "ninja").exists():
        pytest.skip("this interpreter's bin directory has no ninja (the project's venv installs one)")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    interpreter_tools_first()
    assert os.environ["PATH"] == f"{tools}:/usr/bin:/bin"
    interpreter_tools_first()  # already first: unchanged
    assert os.environ["PATH"] == f"{tools}:/usr/bin:/bin"
