"""Settings for the test process and every process it starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from fusiontree.train.distributed import interpreter_tools_first

# The venv's tools first on PATH, as every training process does before it builds DeepSpeed's
# CPU op (`interpreter_tools_first`): the ranks spawned from this process and the
# subprocesses that inherit its environment then build with the same ninja.
interpreter_tools_first()
_VENV_BIN = str(Path(sys.executable).parent)


# DeepSpeed's CPU op, built once per venv (about 40 s of C++) when a CPU training run first
# initialises DeepSpeed, is built in the background from the start of the session instead,
# while the tests before the first training run use about one of the cores. The runs share
# the build's file lock (`build_deepspeed_cpu_op`): one that starts before the build is done
# waits for it, then finds the op built.
_BUILD_OP = ("from fusiontree.train.distributed import build_deepspeed_cpu_op; "
             "build_deepspeed_cpu_op(announce=False)")
_op_build: subprocess.Popen | None = None


def pytest_sessionstart(session) -> None:
    global _op_build
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(_VENV_BIN).parent / "torch_extensions"))
    _op_build = subprocess.Popen([sys.executable, "-c", _BUILD_OP], env=env, cwd=Path(__file__).resolve().parents[1],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)


def pytest_sessionfinish(session, exitstatus) -> None:
    """A build still running (a session shorter than the build) ends with its compilers; the
    next run finds the lock file it left and builds again (`build_deepspeed_cpu_op`)."""
    if _op_build is None:
        return
    if _op_build.poll() is None:
        try:
            os.killpg(_op_build.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _op_build.wait()
