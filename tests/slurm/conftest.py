"""A private one-node Slurm cluster on localhost for the tests of slurm/*.sh.

`slurm_cluster` installs Slurm from Debian's packages where it is missing (root only), then
starts munged, slurmctld and slurmd in the foreground as children of the test process, with
a private munge key and socket, a minimal slurm.conf (private ports, state and spool
directories under a temporary directory; proctrack/linuxproc, task/none, no cgroups, no
accounting) and one node of 4 CPUs, room for two training jobs of two tasks at once. Client
commands get SLURM_CONF. At the end (also after a failure) it cancels the jobs, stops the
daemons by their PIDs, and ends any process the cluster started that is still there
(slurmstepd, job tasks): those carry the marker variable FT_SLURM_TEST in their environment,
which nothing outside this cluster has.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun"]
NODE = "ftnode0"
CPUS = 4  # slurmd takes the configured count (SlurmdParameters=config_overrides)


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def ensure_slurm() -> str | None:
    """None when Slurm's binaries are there (installed now if needed), else why not."""
    if all(_which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed and installing it needs root (apt-get install {' '.join(PACKAGES)})"
    if not _which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it with"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", *PACKAGES]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:  # a fresh machine may lack the package lists
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=900)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        return f"installing Slurm failed ({' '.join(cmd)}): {res.stderr.strip()[-500:]}"
    missing = [b for b in BINARIES if not _which(b)]
    return f"Slurm installed but {missing} not found" if missing else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment holds FT_SLURM_TEST=<marker>."""
    want = f"FT_SLURM_TEST={marker}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if want in (d / "environ").read_bytes().split(b"\0"):
                out.append(int(d.name))
        except OSError:  # gone, or not ours to read
            continue
    return out


@dataclass
class Cluster:
    root: Path
    env: dict  # for client commands and jobs: SLURM_CONF and the marker
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, env: dict | None = None
            ) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), env=env or self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stdout}{res.stderr}\n"
                                 f"{self.daemon_logs()}")
        return res

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (empty once slurmctld forgot the job)."""
        res = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if res.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", res.stdout))

    def jobs(self) -> list[int]:
        out = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        return [int(x.split("_")[0]) for x in out if x.split("_")[0].isdigit()]

    def daemon_logs(self, tail: int = 3000) -> str:
        parts = []
        for name in ("slurmctld", "slurmd"):
            p = self.root / f"{name}.out"
            if p.exists():
                parts.append(f"--- {name} ---\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)


def _write_conf(root: Path, host: str) -> Path:
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=fttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=3600
KillWait=10
NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = ensure_slurm()
    if reason is not None:
        print(f"SKIP slurm tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="ft-slurm-"))
    root.chmod(0o755)  # munged wants its socket's directory searchable
    (root / "state").mkdir()
    (root / "spool").mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = _write_conf(root, host)
    marker = str(root)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM") and k not in
            ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env = dict(base, SLURM_CONF=str(conf), FT_SLURM_TEST=marker)
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/sbin"])
    cluster = Cluster(root, env)

    def start(name: str, cmd: list[str]) -> None:
        out = open(root / f"{name}.out", "w")
        cluster.procs[name] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)
        out.close()

    try:
        start("munged", [_which("munged"), "--foreground", "--force", f"--socket={root}/munge.sock",
                         f"--key-file={key}", f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                         f"--seed-file={root}/munged.seed"])
        deadline = time.time() + 20
        while not (root / "munge.sock").exists():
            assert cluster.procs["munged"].poll() is None, (root / "munged.out").read_text()
            assert time.time() < deadline, "munged did not create its socket"
            time.sleep(0.1)
        start("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(conf)])
        start("slurmd", [_which("slurmd"), "-D", "-N", NODE, "-f", str(conf)])
        deadline = time.time() + 60
        while True:
            for name, p in cluster.procs.items():
                assert p.poll() is None, f"{name} exited ({p.returncode}):\n{cluster.daemon_logs()}"
            res = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            if res.returncode == 0 and res.stdout.strip() == "idle":
                break
            assert time.time() < deadline, f"the node never became idle: {res.stdout}{res.stderr}\n" \
                                           f"{cluster.daemon_logs()}"
            time.sleep(0.3)
        yield cluster
    finally:
        for job_id in cluster.jobs() if "slurmctld" in cluster.procs else []:
            cluster.run("scancel", str(job_id), check=False)
        deadline = time.time() + 30
        while cluster.procs.get("slurmctld") and cluster.jobs() and time.time() < deadline:
            time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            if name in cluster.procs:
                _stop(cluster.procs[name])
        for pid in _marked_pids(marker):  # a slurmstepd or job task outliving its daemon
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)
