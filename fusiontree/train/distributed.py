"""Process-group set-up for every launcher: `deepspeed`, `torchrun`, Slurm's srun, plain python.

The rank, world size and local rank come from the environment (RANK / WORLD_SIZE /
LOCAL_RANK, or SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID), or from `--local_rank`
when a launcher passes only that; a plain `python` run is a world of one. CPU runs use gloo,
GPU runs NCCL.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from fusiontree.host import cpu_count

log = logging.getLogger("fusiontree.train")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n, "") != "":
            return int(os.environ[n])
    return default


def local_world_size(default: int) -> int:
    """How many processes of this run share this node, as the launcher (torchrun, DeepSpeed's,
    Slurm) says; `default` when none does."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", default=default))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uses_cuda(device: str) -> bool:
    """Whether a run with train.device=`device` trains on CUDA (`auto`: where a GPU is visible)."""
    return torch.cuda.is_available() if device == "auto" else device == "cuda"


def init_distributed(local_rank_arg: int | None = None, device: str = "auto",
                     timeout_s: int = 1800) -> DistInfo:
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=local_rank_arg if local_rank_arg is not None else 0)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # A launcher sets the port for its processes; a world of one picks a free one, so that
        # two one-process runs on a machine do not both try to listen on a fixed port.
        os.environ["MASTER_PORT"] = str(_free_port()) if world == 1 else "29500"
    use_cuda = uses_cuda(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no GPU is visible; use auto or cpu")
    if use_cuda:
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            # Share the cores among this node's processes instead of oversubscribing them.
            torch.set_num_threads(max(1, cpu_count() // local_world_size(default=world)))
    if not dist.is_initialized():
        if backend == "gloo":
            build_deepspeed_cpu_op(announce=local == 0)
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s), rank=rank, world_size=world)
        _unlink_deepspeed_shm_buffer(rank)
    return DistInfo(rank, world, local, dev, backend)


DEEPSPEED_CPU_OP = "deepspeed_shm_comm"


def deepspeed_cpu_op_message() -> str | None:
    """What a CPU run is about to compile, and where, when DeepSpeed's CPU communication op is
    not built yet (DeepSpeed builds it on first use without a word, for a minute or more);
    None when it is built (or shipped prebuilt)."""
    import importlib.util

    from torch.utils.cpp_extension import _get_build_directory

    try:
        if importlib.util.find_spec(f"deepspeed.ops.comm.{DEEPSPEED_CPU_OP}_op") is not None:
            return None  # installed prebuilt
    except ImportError:
        pass
    build_dir = Path(_get_build_directory(DEEPSPEED_CPU_OP, verbose=False))
    if any(build_dir.glob(f"{DEEPSPEED_CPU_OP}*.so")):
        return None
    chosen = ("TORCH_EXTENSIONS_DIR" if os.environ.get("TORCH_EXTENSIONS_DIR")
              else "torch's default place; set TORCH_EXTENSIONS_DIR to build it elsewhere, e.g. in the venv")
    return (f"compiling DeepSpeed's CPU communication op ({DEEPSPEED_CPU_OP}) into {build_dir} ({chosen}): once, "
            "a minute or more; later runs reuse it")


def interpreter_tools_first() -> None:
    """Put this interpreter's bin directory (a venv's) first on PATH when it holds ninja. torch
    builds extensions with whichever ninja PATH finds, and ninja versions record a build's
    commands differently (1.11 and 1.13 do): with the system's ninja in one process and the
    venv's in another, each finds the other's build of the op changed and builds it again."""
    tools = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if (Path(tools) / "ninja").exists() and path.split(os.pathsep)[0] != tools:
        os.environ["PATH"] = os.pathsep.join([tools, path]) if path else tools


def build_deepspeed_cpu_op(announce: bool = True) -> None:
    """Build DeepSpeed's CPU communication op before DeepSpeed would, under an OS file lock.

    torch's extension builder guards a build with a plain `lock` file in the build directory; a
    build that is killed leaves it behind, and every later run then waits for it forever. Every
    build here runs under `fcntl.flock` on a file beside that directory, which the OS releases
    however the holder ends, so a `lock` file found while holding it was left by a killed build:
    it is removed (with a warning) and the op built. The other processes of the node wait on the
    flock and find the op built."""
    import fcntl

    from torch.utils.cpp_extension import _get_build_directory

    interpreter_tools_first()
    message = deepspeed_cpu_op_message()
    if message is None:
        return
    build_dir = Path(_get_build_directory(DEEPSPEED_CPU_OP, verbose=False))
    with open(build_dir.parent / f"{DEEPSPEED_CPU_OP}.build-lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if deepspeed_cpu_op_message() is None:
            return  # another process built it while this one waited
        stale = build_dir / "lock"
        if stale.exists():
            log.warning(f"removing {stale}, left by a build of {DEEPSPEED_CPU_OP} that was killed (runs would wait "
                        "for it forever); building again")
            stale.unlink()
        if announce:
            log.warning(message)
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()


def deepspeed_shm_buffer(rank: int) -> Path:
    """The /dev/shm file of DeepSpeed's CPU shared-memory all-reduce for this run and rank."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                               f"{os.environ['MASTER_PORT']}_{rank}")


def _unlink_deepspeed_shm_buffer(rank: int) -> None:
    """On CPU, DeepSpeed maps one 66 MB /dev/shm buffer per rank and never unlinks it, so every
    run would leave its buffers in RAM-backed /dev/shm until the machine runs out of memory.
    Each rank maps all its peers' buffers inside init_distributed; once every rank is past it
    (the barrier), each unlinks its own name. The mappings stay valid until the processes
    exit, however they exit."""
    dist.barrier()
    deepspeed_shm_buffer(rank).unlink(missing_ok=True)


def shutdown() -> None:
    """End the process group cleanly so that exits are not flaky."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
