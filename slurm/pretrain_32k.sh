#!/bin/bash
# Multi-node FusionTree pretraining at 32K context (configs/pretrain_32k.yaml).
#
#   sbatch slurm/pretrain_32k.sh                               # from the repository root
#   sbatch --nodes=8 slurm/pretrain_32k.sh --train.steps=80000 # sbatch options, then config overrides
#   RUN_DIR=/scratch/runs/exp7 sbatch slurm/pretrain_32k.sh    # any variable below, from the environment
#
# One srun task per GPU: launch/train.py reads its rank, world size and local rank from
# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and uses GPU cuda:<local rank>, so every task
# must see all GPUs of its node (no per-task GPU binding). Rendezvous: MASTER_ADDR is the
# first node of the allocation.
#
# Time limit and requeue: Slurm sends SIGUSR1 to this batch shell SIGNAL_LEAD seconds before
# the time limit (--signal=B:USR1@...). The trap below forwards it to srun, which passes it to
# every training task; the trainer finishes its current step, saves a checkpoint (all ranks
# agree through an all-reduce) and exits 0. The script then requeues the job: same job id,
# same RUN_DIR, and `--resume auto` continues from that checkpoint. A SIGTERM (scancel,
# preemption) also makes the tasks checkpoint before they exit, but is not requeued by this
# script: a cancelled job stays cancelled; preemption requeues through Slurm's PreemptMode.
#
# Edit the #SBATCH lines for your cluster (partition, account, nodes, time), or override
# them on the sbatch command line, which takes precedence.
#SBATCH --job-name=ft-pretrain-32k
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my-project

set -uo pipefail

# ---- variables to edit (each can also be set in the environment of sbatch) ------------------
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}              # the FusionTree checkout, on a shared filesystem
PYTHON=${PYTHON:-$REPO/.venv/bin/python}             # the interpreter with FusionTree installed
CONFIG=${CONFIG:-$REPO/configs/pretrain_32k.yaml}    # run config (model, data, parallel layout, steps)
DS_CONFIG=${DS_CONFIG:-$REPO/configs/ds/zero1.json}  # DeepSpeed ZeRO stage
RUNS_ROOT=${RUNS_ROOT:-$REPO/runs}                   # per-job run directories go here
# Checkpoints, metrics.jsonl, logs/rank*.log and slurm/job.log. The job id survives a requeue,
# so a requeued job finds its checkpoints here; set RUN_DIR to continue a run in a new job.
RUN_DIR=${RUN_DIR:-$RUNS_ROOT/${SLURM_JOB_NAME:-pretrain_32k}-${SLURM_JOB_ID:-local}}
TRAIN_ARGS=${TRAIN_ARGS:-}                           # extra config overrides, e.g. "--parallel.tensor_parallel=4"
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}  # per job: jobs sharing a node differ
MAX_REQUEUES=${MAX_REQUEUES:-50}                     # stop requeueing after this many restarts
# NCCL: report problems only; fail a hung collective instead of waiting for the time limit
# (srun --kill-on-bad-exit then ends the other tasks). Set NCCL_SOCKET_IFNAME / NCCL_IB_HCA to
# your cluster's interfaces if NCCL's own choice is wrong (NCCL_DEBUG=INFO shows it).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
# ---------------------------------------------------------------------------------------------

mkdir -p "$RUN_DIR/slurm"
log() { echo "[$(date '+%F %T')] pretrain_32k.sh: $*" | tee -a "$RUN_DIR/slurm/job.log"; }

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "pretrain_32k.sh: not inside a Slurm job; submit it with sbatch" >&2
    exit 2
fi
RESTARTS=${SLURM_RESTART_COUNT:-0}
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The address Slurm itself reaches the node at (NodeAddr), which is its hostname on most clusters.
NODE_ADDR=$(scontrol show node -o "$FIRST_NODE" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
export MASTER_ADDR=${MASTER_ADDR:-${NODE_ADDR:-$FIRST_NODE}}
export MASTER_PORT
# The trainer prefers RANK / WORLD_SIZE / LOCAL_RANK over SLURM_*: never inherit stale ones.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE

log "job $SLURM_JOB_ID attempt $((RESTARTS + 1)) (restarts: $RESTARTS) on $SLURM_JOB_NUM_NODES node(s) [$SLURM_JOB_NODELIST], $SLURM_NTASKS tasks"
log "run dir $RUN_DIR; master $MASTER_ADDR:$MASTER_PORT; config $CONFIG; ds config $DS_CONFIG"
log "commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"

SRUN_PID=""
REQUEUE=0
# shellcheck disable=SC2317  # called by the traps below
stop_training() {  # $1: the signal this shell got
    if [[ -n $SRUN_PID ]] && kill -0 "$SRUN_PID" 2>/dev/null; then
        log "got SIG$1: asking the training tasks to checkpoint and exit"
        [[ $1 == USR1 ]] && REQUEUE=1
        kill -USR1 "$SRUN_PID" 2>/dev/null  # srun forwards it to every task
    fi
}
trap 'stop_training USR1' USR1
trap 'stop_training TERM' TERM

# In the background: bash runs a trap only between commands, and `wait` is interruptible.
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of options
srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
    "$PYTHON" "$REPO/launch/train.py" --config "$CONFIG" --ds_config "$DS_CONFIG" --resume auto \
    "--out_dir=$RUN_DIR" $TRAIN_ARGS "$@" &
SRUN_PID=$!
while :; do
    wait "$SRUN_PID"
    STATUS=$?
    # > 128 with srun still alive: a trap interrupted the wait, not the end of srun
    if (( STATUS > 128 )) && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
    break
done

if (( REQUEUE )); then
    if (( RESTARTS >= MAX_REQUEUES )); then
        log "training stopped for the time limit (srun exit $STATUS); not requeueing: $RESTARTS restarts reached MAX_REQUEUES=$MAX_REQUEUES"
        exit 1
    fi
    log "training stopped for the time limit (srun exit $STATUS); requeueing job $SLURM_JOB_ID, it resumes from the latest checkpoint in $RUN_DIR/checkpoints"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        log "scontrol requeue failed (JobRequeue=0 or no permission?); resubmit with RUN_DIR=$RUN_DIR to continue"
        exit 1
    fi
    exit 0  # Slurm ends this attempt and queues the next
fi
log "training finished: srun exit $STATUS"
exit "$STATUS"
