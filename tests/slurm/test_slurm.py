"""slurm/build_shards.sh and slurm/pretrain_32k.sh on a real (one-node, localhost) Slurm cluster.

One test, in order, because the training jobs need the shards of the first stage:

1. build_shards.sh submits a tokenizer job, a one-task array and a merge job; the merged
   shards are what the training jobs read.
2. pretrain_32k.sh with CPU overrides (debug preset through a test config, 2 tasks on one
   node, gloo) runs to the end: COMPLETED, losses logged, a checkpoint saved.
3. A second job of the same run config, running beside job 2 (the node has a CPU for each of
   the four tasks; neither job reads the other's files), gets the time-limit warning early
   (SIGUSR1 to the batch shell, as `--signal=B:USR1@...` sends it): its tasks checkpoint and
   exit, the script requeues the job, and the requeued job resumes from that checkpoint and
   completes with the losses of the uninterrupted job 2, bit for bit.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import yaml

from fusiontree.config import load_config
from fusiontree.data.corpus import stdlib_dir
from tests.slurm.conftest import Cluster, free_port
from tests.train.conftest import ROOT, env as train_env, losses, metrics, write_config

STEPS = 12
# How long a job may take before the test calls it hung: a guard, not a time budget (a two-core
# machine shared with other test runs took longer than 240 s for the training job).
HANG_TIMEOUT_S = 1800
CPU_OVERRIDES = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--mem=0",
                 "--time=30"]  # minutes: beyond the script's 900 s signal lead


def wait_for(cluster: Cluster, job_id: int, states: set[str], timeout: float, release: bool = False) -> dict:
    """Poll `scontrol show job` until the job reaches one of `states`.

    release: slurmctld holds a requeued batch job back (it sets its begin time about two
    minutes ahead) so that the node can clean up its previous run; on a cluster it then starts
    by itself. The test moves the begin time to now instead, but only once the node is idle
    again and a few seconds have passed: slurmd revokes the old run's job credential at a
    one-second resolution and refuses a relaunch of the same job id within that second
    ("Job credential revoked"), which fails the job.
    """
    deadline = time.time() + timeout
    info: dict = {}
    held_since = None
    while time.time() < deadline:
        info = cluster.job(job_id)
        if info.get("JobState") in states:
            return info
        if release and info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            held_since = held_since or time.time()
            node = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            if node == "idle" and time.time() - held_since > 3:
                cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not reach {states} in {timeout} s: {info}\n{cluster.daemon_logs()}")


def job_env(cluster: Cluster, **extra: str) -> dict:
    e = dict(train_env())  # venv on PATH, TORCH_EXTENSIONS_DIR, WANDB off
    e.update({k: v for k, v in cluster.env.items() if k in ("SLURM_CONF", "FT_SLURM_TEST", "PATH")})
    e["PATH"] = f"{train_env()['PATH']}:/usr/sbin:/sbin"
    e = {k: v for k, v in e.items() if not k.startswith("SLURM") or k == "SLURM_CONF"}
    e.update(extra)
    return e


def sbatch(cluster: Cluster, args: list[str], env: dict) -> int:
    res = cluster.run("sbatch", "--parsable", *args, env=env)
    return int(res.stdout.strip().split(";")[0])


def build_shards_on_cluster(cluster: Cluster, tmp: Path) -> Path:
    parts = [stdlib_dir() / "json", stdlib_dir() / "email"]
    out = tmp / "shards"
    e = job_env(cluster, INPUT_PARTS=" ".join(map(str, parts)), OUTPUT=str(out), VOCAB_SIZE="512",
                SEQ_LENGTHS="64,128", VAL_FRACTION="0.1", SBATCH_ARGS="--cpus-per-task=1 --mem=0 --time=10",
                REPO=str(ROOT), PYTHON=str(Path(train_env()["PATH"].split(":")[0]) / "python"))
    res = cluster.run("bash", str(ROOT / "slurm/build_shards.sh"), env=e)
    merge_job = int(re.search(r"merge job: (\d+)", res.stdout).group(1))
    info = wait_for(cluster, merge_job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, HANG_TIMEOUT_S)
    logs = "\n".join(p.read_text() for p in sorted((tmp / "shards.parts/logs").glob("*")))
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs}"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["merged_from"] == [str(tmp / f"shards.parts/part-{i:05d}") for i in range(2)]
    part1 = json.loads((tmp / "shards.parts/part-00001/manifest.json").read_text())
    assert part1["tokenizer"]["trained"] is False  # the array task reused part 0's tokenizer
    assert manifest["tokenizer"]["sha256"] == part1["tokenizer"]["sha256"]
    assert "tokenizer job" in res.stdout and "part jobs" in res.stdout
    return out


def run_config(tmp: Path, shards: Path, name: str, **train) -> Path:
    path = write_config(tmp / f"{name}.yaml", shards, tmp / "unused", steps=STEPS, eval_every_steps=STEPS,
                        eval_batches=1, **train)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["num_workers"] = 0
    path.write_text(yaml.safe_dump(cfg))
    return path


def submit_training(cluster: Cluster, tmp: Path, config: Path, name: str) -> tuple[int, Path]:
    out = tmp / f"{name}.out"
    e = job_env(cluster, CONFIG=str(config), RUNS_ROOT=str(tmp / "runs"), REPO=str(ROOT),
                PYTHON=str(Path(train_env()["PATH"].split(":")[0]) / "python"), MASTER_PORT=str(free_port()))
    # arguments after the script are config overrides for the trainer
    job_id = sbatch(cluster, [*CPU_OVERRIDES, f"--job-name={name}", f"--output={out}", str(ROOT / "slurm/pretrain_32k.sh"),
                              "--generate.max_new_tokens=4"], e)
    return job_id, out


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_script_header_and_32k_config():
    header = [line for line in (ROOT / "slurm/pretrain_32k.sh").read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in header and "#SBATCH --open-mode=append" in header
    lead = [int(line.split("@")[1]) for line in header if line.startswith("#SBATCH --signal=B:USR1@")]
    assert lead and lead[0] >= 300  # time to finish a 32K step and write a 1b checkpoint
    cfg = load_config(str(ROOT / "configs/pretrain_32k.yaml"))
    # 1b at 32K fits one GPU: data parallel, compiled blocks, background checkpoints
    assert cfg.model.preset == "1b" and cfg.parallel.tensor_parallel == 1 and not cfg.parallel.sequence_parallel
    assert cfg.train.compile and cfg.train.async_checkpoint
    assert cfg.train.activation_checkpointing and max(s.seq_len for s in cfg.data.curriculum) == 32768
    script = (ROOT / "slurm/pretrain_32k.sh").read_text()
    assert "$REPO/configs/pretrain_32k.yaml" in script and "$REPO/configs/ds/zero1.json" in script
    zero = json.loads((ROOT / "configs/ds/zero1.json").read_text())["zero_optimization"]["stage"]
    assert zero == 1
    # 1 to 8 nodes of 8 GPUs: the global batch splits into whole micro-batches on every rank
    for nodes in (1, 2, 4, 8):
        for tp in (1, 2, 4):
            dp = nodes * 8 // tp
            assert cfg.data.global_batch_tokens % (cfg.data.micro_batch_tokens * dp) == 0, (nodes, tp)
            load_config(str(ROOT / "configs/pretrain_32k.yaml"),
                        [f"--parallel.tensor_parallel={tp}", f"--parallel.sequence_parallel={str(tp > 1).lower()}"])


def test_build_shards_then_train_then_requeue_on_time_limit_signal(slurm_cluster, tmp_path):
    cluster = slurm_cluster
    t0 = time.time()
    shards = build_shards_on_cluster(cluster, tmp_path)
    t_build = time.time() - t0

    # --- 2. a job that runs to the end, and beside it 3. the same run, stopped by the time-limit
    # signal, requeued, resumed
    config = run_config(tmp_path, shards, "full", checkpoint_every_steps=STEPS)
    job1, out1 = submit_training(cluster, tmp_path, config, "ft-full")
    job2, out2 = submit_training(cluster, tmp_path, config, "ft-requeue")
    run1 = tmp_path / "runs" / f"ft-full-{job1}"
    run2 = tmp_path / "runs" / f"ft-requeue-{job2}"
    deadline = time.time() + HANG_TIMEOUT_S
    while not (run2 / "metrics.jsonl").exists() or max(losses(run2) or [0]) < 2:  # the trainer is in its loop
        info = cluster.job(job2)
        assert info.get("JobState") in ("PENDING", "RUNNING"), f"{info}\n{read(out2)[-4000:]}"
        assert time.time() < deadline, f"job {job2} logged no step 2: {read(out2)[-4000:]}"
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job2))  # what --signal=B:USR1@T sends at T
    m = None
    deadline = time.time() + HANG_TIMEOUT_S
    while m is None:
        m = re.search(r"stop requested by signal: checkpoint saved at step (\d+), exiting", read(out2))
        assert time.time() < deadline, f"no stop after the signal: {read(out2)[-4000:]}"
        time.sleep(0.2)
    stop_step = int(m.group(1))
    assert stop_step < STEPS, "the job ended before the signal reached it"

    info = wait_for(cluster, job1, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, HANG_TIMEOUT_S)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{read(out1)[-4000:]}"
    assert info["Requeue"] == "1" and info["NumTasks"] == "2"
    assert yaml.safe_load((run1 / "config.yaml").read_text())["generate"]["max_new_tokens"] == 4
    want = losses(run1)
    assert sorted(want) == list(range(1, STEPS + 1))
    assert (run1 / f"checkpoints/step_{STEPS:08d}/meta.json").is_file()
    assert "training finished: srun exit 0" in read(run1 / "slurm/job.log")
    assert f"step {STEPS}/{STEPS} loss" in read(out1)

    info = wait_for(cluster, job2, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, HANG_TIMEOUT_S, release=True)
    log2 = read(out2)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", \
        f"{info}\n{log2[-6000:]}\n{cluster.daemon_logs()}"
    assert "got SIGUSR1: asking the training tasks to checkpoint and exit" in log2
    assert f"requeueing job {job2}" in log2
    ckpt = run2 / f"checkpoints/step_{stop_step:08d}"
    assert f"resumed from {ckpt} at step {stop_step}" in log2
    assert "attempt 2 (restarts: 1)" in log2 and "training finished: srun exit 0" in log2
    got = losses(run2)
    assert [r["step"] for r in metrics(run2) if "loss" in r] == list(range(1, STEPS + 1))  # each step once
    assert got == want  # the resumed run is the uninterrupted one, bit for bit
    assert (run2 / f"checkpoints/step_{STEPS:08d}/meta.json").is_file()
    print(f"\nslurm test timing: shards {t_build:.1f} s, the full and the signalled + requeued jobs "
          f"{time.time() - t0 - t_build:.1f} s")
