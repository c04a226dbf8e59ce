"""Settings for the test process and every process it starts."""

from __future__ import annotations

import os
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
