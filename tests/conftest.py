"""Settings for the test process and every process it starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# The venv's bin directory first on PATH, as for the training runs the tests start (their
# environments put it first): the ranks spawned from this process and the subprocesses that
# inherit its environment then find the same tools, the venv's ninja among them. DeepSpeed's
# CPU op is built with ninja into one directory per venv, and ninja versions hash the commands
# in its build log differently (1.11 and 1.13 do): with a system ninja on PATH here and the
# venv's in the training runs, each finds the other's build "changed" and builds the op
# again, about 40 s of compiling each time.
_VENV_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = os.pathsep.join([_VENV_BIN, os.environ.get("PATH", "")])


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
