"""Shards and launch helpers for end-to-end training runs (debug preset, CPU, gloo)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from fusiontree.data.build import BuildArgs, build_shards
from fusiontree.data.corpus import stdlib_dir

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_shards") / "shards"
    inputs = [str(stdlib_dir() / d) for d in ("json", "email", "logging", "unittest")]
    build_shards(BuildArgs(inputs=inputs, output=str(out), vocab_size=512, seq_lengths=[64, 128],
                           val_fraction=0.1, workers=2, seed=3, progress=False))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, shards: Path, out_dir: Path, **train) -> Path:
    cfg = {"model": {"preset": "debug", "vocab_size": 512},
           "data": {"shards_dir": str(shards), "global_batch_tokens": 1024, "micro_batch_tokens": 256,
                    "num_workers": 1,
                    "curriculum": [{"seq_len": 64, "until_tokens": 5120}, {"seq_len": 128, "until_tokens": 0}]},
           "train": {"steps": 10, "lr_warmup_steps": 2, "log_every_steps": 1, "eval_every_steps": 5,
                     "eval_batches": 2, "checkpoint_every_steps": 3, "gate_stats_every_steps": 2, **train},
           "out_dir": str(out_dir)}
    path.write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict:
    e = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
             TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(VENV_BIN.parent / "torch_extensions")))
    e["PATH"] = f"{VENV_BIN}:{e['PATH']}"
    return e


def train_cmd(config: Path, launcher: str = "deepspeed", nproc: int = 2, zero: int = 2, extra=()) -> list[str]:
    script = [str(ROOT / "launch/train.py"), "--ds_config", str(ROOT / f"configs/ds/zero{zero}.json"),
              "--config", str(config), *extra]
    if launcher == "deepspeed":
        return [*_launcher("deepspeed", "deepspeed.launcher.runner"), "--num_gpus", str(nproc),
                "--master_port", str(free_port()), *script]
    if launcher == "torchrun":
        return [*_launcher("torchrun", "torch.distributed.run"), "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), *script]
    return [sys.executable, *script]


def _launcher(script: str, module: str) -> list[str]:
    """The launcher's console script beside the interpreter, as users run it; the same program
    as a module where the package was installed without its scripts (pip --target)."""
    return [str(VENV_BIN / script)] if (VENV_BIN / script).exists() else [sys.executable, "-m", module]


def shm_leftovers(cmd: list[str]) -> list[Path]:
    """DeepSpeed CPU all-reduce buffers in /dev/shm that a run started by `cmd` left behind."""
    flag = "--master_port" if "--master_port" in cmd else None
    port = cmd[cmd.index(flag) + 1] if flag else "29500"
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


# A guard against a hung run, not a time budget: on two cores shared with other test runs, a
# run takes many times what it takes on idle cores.
HANG_TIMEOUT_S = 1800


def run(cmd: list[str], timeout: int = HANG_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


class Background:
    """A run started now and collected later, for runs that do not depend on each other: on two
    cores the debug runs spend much of their wall time waiting rather than computing (process
    start-up, rendezvous, collectives, file writes), so two side by side take less time than one
    after the other. Its output goes to files, not pipes (a full pipe would stall it). As a
    context manager it ends the run's whole process group if the test fails before collecting it."""

    def __init__(self, cmd: list[str]):
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, env=env(), stdout=self._out, stderr=self._err, text=True, cwd=ROOT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def result(self, timeout: int = HANG_TIMEOUT_S) -> subprocess.CompletedProcess:
        self.proc.wait(timeout=timeout)
        self._out.seek(0)
        self._err.seek(0)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self._out.read(), self._err.read())

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._out.close()
        self._err.close()


def run_side_by_side(*cmds: list[str]) -> list[subprocess.CompletedProcess]:
    """Independent runs at once (see `Background`); their results in the order given."""
    with contextlib.ExitStack() as stack:
        runs = [stack.enter_context(Background(cmd)) for cmd in cmds]
        return [r.result() for r in runs]


def _not_json(constant: str):
    raise ValueError(f"metrics.jsonl holds {constant}, which is not JSON (null is)")


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows, read as strict JSON (NaN and Infinity are errors)."""
    return [json.loads(line, parse_constant=_not_json)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}
