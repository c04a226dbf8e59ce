#!/bin/bash
# Build the training shards on a Slurm cluster: one CPU job per input part, then one merge.
#
#   INPUT_PARTS='/data/raw/part-*' OUTPUT=/data/shards_32k bash slurm/build_shards.sh
#
# Run it with bash on a login node (from the repository root or anywhere): it writes the list
# of parts to $OUTPUT.parts/parts.txt and submits this same file as three Slurm stages:
#
#   1. tokenizer  (one job)       builds part 0 and trains the SentencePiece tokenizer on it
#                                 (--tokenizer-sample-mb of its text); skipped when TOKENIZER
#                                 names an existing .model or tokenizer.json, which every part
#                                 then uses
#   2. part       (a job array)   builds each remaining part with that tokenizer, into
#                                 $OUTPUT.parts/part-NNNNN/ (one directory per part)
#   3. merge      (one job)       data_pipeline/merge_shards.py merges the parts, in order,
#                                 into $OUTPUT: one manifest, one tokenizer
#
# Each stage starts only if the previous one succeeded (afterok dependencies). Point
# training at $OUTPUT (data.shards_dir). The per-part builds stay in $OUTPUT.parts
# (delete them once the merge is checked); logs go to $OUTPUT.parts/logs/.
#
# A part is one entry of INPUT_PARTS, in sorted order: a file (.txt .md .py .jsonl .jsonl.gz
# .jsonl.zst .jsonl.xz .parquet .arrow), a directory (searched recursively, or written by
# datasets' save_to_disk), or a mixture .yaml (build_shards.py --mixture: that part of every
# source, with the weights; give every part the same source names and weights, and the
# merged build follows the weights too). Part 0 trains the tokenizer, so make it a
# representative sample of the corpus, or pass TOKENIZER (a .model or a tokenizer.json).
#
# These #SBATCH lines apply to every stage; SBATCH_ARGS adds options (partition, account).
#SBATCH --job-name=ft-build-shards
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=12:00:00

set -euo pipefail

# ---- variables to edit (each can also be set in the environment) ----------------------------
INPUT_PARTS=${INPUT_PARTS:-}                          # a glob (quoted) or a space-separated list of parts
OUTPUT=${OUTPUT:-data/shards_32k}                     # the merged build: set data.shards_dir to it
PARTS_DIR=${PARTS_DIR:-$OUTPUT.parts}                 # per-part builds, parts.txt and logs
TOKENIZER=${TOKENIZER:-}                              # an existing .model or tokenizer.json (default: train on part 0)
VOCAB_SIZE=${VOCAB_SIZE:-32000}
SEQ_LENGTHS=${SEQ_LENGTHS:-4096,8192,16384,32768}     # the buckets of configs/pretrain_32k.yaml's curriculum
VAL_FRACTION=${VAL_FRACTION:-0.002}
SEED=${SEED:-1234}                                    # the same for every part: it assigns documents to splits
BUILD_ARGS=${BUILD_ARGS:-}                            # more build_shards.py options, e.g. "--text-field content"
ARRAY_MAX_PARALLEL=${ARRAY_MAX_PARALLEL:-64}          # part jobs running at once
SBATCH_ARGS=${SBATCH_ARGS:-}                          # e.g. "--partition=cpu --account=my-project"
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
# ---------------------------------------------------------------------------------------------

log() { echo "[$(date '+%F %T')] build_shards.sh${STAGE:+ [$STAGE]}: $*"; }
part_dir() { printf '%s/part-%05d' "$PARTS_DIR" "$1"; }
part_input() { sed -n "$(($1 + 1))p" "$PARTS_DIR/parts.txt"; }

build_part() {  # $1: part index; $2: tokenizer to reuse ("" trains one)
    local input out
    input=$(part_input "$1")
    out=$(part_dir "$1")
    [[ -n $input ]] || { log "part $1 is not listed in $PARTS_DIR/parts.txt"; exit 2; }
    log "part $1: $input -> $out${2:+ (tokenizer $2)}"
    local tok_args=(--vocab-size "$VOCAB_SIZE") in_args=(--input "$input")
    [[ -n $2 ]] && tok_args=(--tokenizer "$2")
    [[ $input == *.yaml || $input == *.yml ]] && in_args=(--mixture "$input")
    # shellcheck disable=SC2086  # BUILD_ARGS is a list of options
    "$PYTHON" "$REPO/data_pipeline/build_shards.py" "${in_args[@]}" --output "$out" "${tok_args[@]}" \
        --seq-lengths "$SEQ_LENGTHS" --val-fraction "$VAL_FRACTION" --seed "$SEED" \
        --workers "${SLURM_CPUS_PER_TASK:-1}" --no-progress $BUILD_ARGS
}

case "${STAGE:-submit}" in
submit)
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        echo "build_shards.sh: run it with bash on a login node (it submits its own jobs), not with sbatch" >&2
        exit 2
    fi
    [[ -n $INPUT_PARTS ]] || { echo "build_shards.sh: set INPUT_PARTS to the input parts (a glob or a list)" >&2; exit 2; }
    # shellcheck disable=SC2206  # the glob / list is expanded here on purpose
    parts=($INPUT_PARTS)
    for p in "${parts[@]}"; do
        [[ -e $p ]] || { echo "build_shards.sh: input part $p does not exist" >&2; exit 2; }
    done
    mkdir -p "$PARTS_DIR/logs"
    PARTS_DIR=$(cd "$PARTS_DIR" && pwd)
    OUTPUT=$(mkdir -p "$(dirname "$OUTPUT")" && cd "$(dirname "$OUTPUT")" && pwd)/$(basename "$OUTPUT")
    for p in "${parts[@]}"; do (cd "$(dirname "$p")" && echo "$(pwd)/$(basename "$p")"); done | sort > "$PARTS_DIR/parts.txt"
    n=${#parts[@]}
    export REPO PYTHON OUTPUT PARTS_DIR VOCAB_SIZE SEQ_LENGTHS VAL_FRACTION SEED BUILD_ARGS
    # shellcheck disable=SC2086  # SBATCH_ARGS is a list of options
    submit() { sbatch --parsable $SBATCH_ARGS "$@" | cut -d';' -f1; }
    if [[ -n $TOKENIZER ]]; then
        TOKENIZER=$(cd "$(dirname "$TOKENIZER")" && pwd)/$(basename "$TOKENIZER")
        [[ -f $TOKENIZER ]] || { echo "build_shards.sh: TOKENIZER $TOKENIZER does not exist" >&2; exit 2; }
        first=0 dep=()
    else
        TOKENIZER=$(part_dir 0)/tokenizer.model
        tok_job=$(STAGE=tokenizer TOKENIZER="" submit --export=ALL --output="$PARTS_DIR/logs/%x-%j-tokenizer.out" "$0")
        log "tokenizer job $tok_job (part 0 of $n)"
        first=1 dep=("--dependency=afterok:$tok_job")
    fi
    export TOKENIZER
    last_dep=("${dep[@]}")
    if (( first < n )); then
        array_job=$(STAGE=part submit --export=ALL "${dep[@]}" --array="$first-$((n - 1))%$ARRAY_MAX_PARALLEL" \
            --output="$PARTS_DIR/logs/%x-%A_%a.out" "$0")
        log "part jobs $array_job (array $first-$((n - 1)))"
        last_dep=("--dependency=afterok:$array_job")
    fi
    merge_job=$(STAGE=merge submit --export=ALL "${last_dep[@]}" --output="$PARTS_DIR/logs/%x-%j-merge.out" "$0")
    log "merge job $merge_job -> $OUTPUT"
    echo "merge job: $merge_job"
    ;;
tokenizer)
    build_part 0 ""
    ;;
part)
    build_part "$SLURM_ARRAY_TASK_ID" "$TOKENIZER"
    ;;
merge)
    n=$(wc -l < "$PARTS_DIR/parts.txt")
    dirs=()
    for ((i = 0; i < n; i++)); do dirs+=("$(part_dir "$i")"); done
    log "merging $n part(s) into $OUTPUT"
    "$PYTHON" "$REPO/data_pipeline/merge_shards.py" --input "${dirs[@]}" --output "$OUTPUT"
    log "done: set data.shards_dir=$OUTPUT"
    ;;
*)
    echo "build_shards.sh: unknown STAGE=$STAGE (submit, tokenizer, part or merge)" >&2
    exit 2
    ;;
esac
