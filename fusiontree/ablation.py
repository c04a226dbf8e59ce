"""Ablation runner: train variants of one run config with the same seed, data and tokens,
evaluate each, and write a markdown table, a plot and JSON.

    python launch/ablate.py configs/ablations/gate_cpu.yaml

It orchestrates the other layers (shard builds, training runs through launch/train.py,
evaluation), so it sits above them, outside `fusiontree.eval`.

An ablation file (strict: unknown keys are errors):

    name: gate_cpu
    description: per-channel vs per-token gate
    out_dir: runs/ablations/gate_cpu          # results.md, results.json, results.png, eval/<variant>/
    runs_dir: runs/ablations/cpu_runs         # training runs (default <out_dir>/runs); ablations that
                                              # share it share identical runs
    base_config: configs/ablations/cpu_base.yaml   # a run config for launch/train.py (optional)
    base: {train: {steps: 60}}                # nested overrides on top of base_config (optional)
    data_build: {...}                         # optional: build the shards first (see DataBuild),
                                              # inline or the path of a YAML file holding it
    variants:
      channel: {model.gate: channel}          # dotted overrides of the run config
      token:   {model.gate: token}
      token-pruned: {overrides: {model.gate: token}, prune: {off_threshold: 0.3}}
    eval: {tasks: [ppl, needle], options: {needle: {contexts: [128, 256]}}}   # fusiontree.eval.tasks.EvalOptions
    jobs: 1                                   # variants trained at once

Every variant trains through `launch/train.py` in its own process (`python`, one process,
CPU or one GPU) with the same seed, shards and `train.steps x data.global_batch_tokens`
tokens; variants whose resolved run configs are equal share one training run (a `prune`
variant is evaluated on a pruned copy of its run's checkpoint), and so do ablations with the
same `runs_dir`. A run that already finished is not trained again, a run that stopped
part-way resumes (`--resume auto`), so re-running an ablation after a crash or with a new
variant only does the missing work.

`prune`: `auto` (the run's exported GateMonitor plan), `{off_threshold, frac_threshold}`
(the plan its gate evidence gives at those thresholds), or `{branches: ["3:mamba", ...]}`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fusiontree.checkpoint import CheckpointManager, checkpoint_step
from fusiontree.config import dataclass_from_dict, merge_dicts, read_yaml
from fusiontree.eval.report import markdown_table, summary_row
from fusiontree.eval.tasks import EvalOptions, expand_tasks
from fusiontree.host import cpu_count

log = logging.getLogger("fusiontree.ablate")
ROOT = Path(__file__).resolve().parents[1]
TOP_KEYS = {"name", "description", "out_dir", "runs_dir", "base_config", "base", "data_build", "variants", "eval",
            "jobs"}
VARIANT_KEYS = {"overrides", "prune"}
EVAL_KEYS = {"tasks", "options", "threads"}
PASSKEY_KEYS = {"docs", "digits", "min_filler", "max_filler", "seed"}


@dataclass
class DataBuild:
    """Shards built before training (skipped when `output` already holds a build of the same
    spec). `inputs`: files/dirs/globs, `stdlib:REL` for a part of the standard library,
    `site:REL` for installed packages' sources (site-packages).
    `passkey`: synthetic passkey documents mixed in (fusiontree/eval/passkey.py), each padded
    to fill one sample of the largest bucket on its own; the tokenizer is trained on the
    inputs plus unpadded passkey documents first, so the padding can be counted in tokens."""
    output: str
    inputs: list[str] = field(default_factory=list)
    vocab_size: int = 1024
    seq_lengths: list[int] = field(default_factory=lambda: [256])
    val_fraction: float = 0.05
    seed: int = 1234
    passkey: dict = field(default_factory=dict)  # {docs, digits, min_filler, max_filler, seed}


@dataclass
class Variant:
    name: str
    overrides: dict  # dotted key -> value
    prune: object = None  # None | "auto" | {off_threshold, frac_threshold} | {branches: [...]}


@dataclass
class Ablation:
    name: str
    out_dir: Path
    runs_dir: Path
    base: dict
    variants: list[Variant]
    eval_tasks: list[str]
    eval_options: EvalOptions
    eval_threads: int = 0
    jobs: int = 1
    description: str = ""
    data_build: DataBuild | None = None
    source: str = ""


def _resolve(path: str) -> Path:
    """Absolute: relative paths name files under the current directory if they exist there,
    else under the repository root (so ablation files work from anywhere)."""
    p = Path(path)
    return p.resolve() if p.is_absolute() or p.exists() else (ROOT / p).resolve()


def load_ablation(path: str | Path) -> Ablation:
    path = _resolve(str(path))
    if not path.is_file():
        raise ValueError(f"ablation file {path} does not exist; see configs/ablations/")
    spec = read_yaml(path) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: an ablation file is a mapping")
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    for key in ("name", "variants"):
        if key not in spec:
            raise ValueError(f"{path}: missing '{key}'")
    base: dict = {}
    if spec.get("base_config"):
        cfg_path = _resolve(spec["base_config"])
        if not cfg_path.is_file():
            raise ValueError(f"{path}: base_config {spec['base_config']} does not exist")
        base = read_yaml(cfg_path) or {}
    base = merge_dicts(base, spec.get("base") or {})
    variants = []
    if not isinstance(spec["variants"], dict) or not spec["variants"]:
        raise ValueError(f"{path}: 'variants' must map variant names to overrides")
    for name, v in spec["variants"].items():
        v = v or {}
        if not isinstance(v, dict):
            raise ValueError(f"{path}: variant {name!r} must be a mapping of dotted overrides")
        if set(v) & VARIANT_KEYS:
            if set(v) - VARIANT_KEYS:
                raise ValueError(f"{path}: variant {name!r} mixes {sorted(VARIANT_KEYS)} with dotted overrides "
                                 f"{sorted(set(v) - VARIANT_KEYS)}; put the overrides under 'overrides'")
            variants.append(Variant(str(name), dict(v.get("overrides") or {}), v.get("prune")))
        else:
            variants.append(Variant(str(name), dict(v)))
    ev = spec.get("eval") or {}
    if set(ev) - EVAL_KEYS:
        raise ValueError(f"{path}: unknown eval keys {sorted(set(ev) - EVAL_KEYS)}; allowed: {sorted(EVAL_KEYS)}")
    data_build = None
    if spec.get("data_build"):
        db = spec["data_build"]
        if isinstance(db, str):  # a file of its own, shared by several ablations
            db_path = _resolve(db)
            if not db_path.is_file():
                raise ValueError(f"{path}: data_build file {db} does not exist")
            db = read_yaml(db_path) or {}
        try:
            data_build = DataBuild(**db)
        except TypeError as e:
            raise ValueError(f"{path}: data_build: {e}; allowed keys: "
                             f"{[f.name for f in dataclasses.fields(DataBuild)]}") from e
        unknown_pk = sorted(set(data_build.passkey) - PASSKEY_KEYS)
        if unknown_pk:
            raise ValueError(f"{path}: data_build.passkey: unknown keys {unknown_pk}; allowed: {sorted(PASSKEY_KEYS)}")
    jobs = int(spec.get("jobs", 1))
    if jobs < 1:
        raise ValueError(f"{path}: jobs={jobs} must be >= 1")
    tasks = expand_tasks(ev.get("tasks", ["ppl", "needle"]))
    try:
        opts = dataclass_from_dict(EvalOptions, ev.get("options") or {})
    except ValueError as e:
        raise ValueError(f"{path}: eval.options: {e}") from e
    out_dir = _resolve(spec.get("out_dir", f"runs/ablations/{spec['name']}"))
    runs_dir = _resolve(spec["runs_dir"]) if spec.get("runs_dir") else out_dir / "runs"
    return Ablation(name=str(spec["name"]), out_dir=out_dir, runs_dir=runs_dir, base=base, variants=variants,
                    eval_tasks=tasks, eval_options=opts, eval_threads=int(ev.get("threads", 0)), jobs=jobs,
                    description=spec.get("description", ""), data_build=data_build, source=str(path))


# ------------------------------------------------------------------------------ data

def build_data(spec: DataBuild) -> Path:
    """Build the shards of `spec` (with passkey documents if asked) unless already built."""
    from fusiontree.data.build import BuildArgs, build_shards
    from fusiontree.eval import passkey
    from fusiontree.eval.passkey import write_training_jsonl

    out = _resolve(spec.output)

    # The spec and the passkey document template: a changed template must rebuild the data
    # (and so retrain: the run key holds the manifest) even though the spec file is unchanged.
    template = [passkey.FILLER, passkey.KEY_SENTENCE, passkey.QUESTION] if spec.passkey else []
    fingerprint = hashlib.sha256(json.dumps([dataclasses.asdict(spec), template], sort_keys=True).encode()).hexdigest()
    stamp = out.parent / f"{out.name}.spec.json"
    if (out / "manifest.json").is_file() and stamp.is_file() and json.loads(stamp.read_text())["sha"] == fingerprint:
        log.info("shards %s already built for this spec", out)
        return out
    if not spec.inputs and not spec.passkey:
        raise ValueError("data_build needs inputs (files, dirs, stdlib:REL, site:REL) or passkey documents")
    inputs = [str(_input_path(s)) for s in spec.inputs]
    workers = min(2, cpu_count())
    work = out.parent / f"{out.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    if spec.passkey:
        pk = dict(spec.passkey)
        docs = int(pk.pop("docs", 2000))
        first = write_training_jsonl(work / "passkey.jsonl", docs, **pk)
        # First build: the tokenizer, trained on the inputs plus unpadded passkey documents.
        build_shards(BuildArgs(inputs=inputs + [str(first)], output=str(work / "tokenizer_build"),
                               vocab_size=spec.vocab_size, seq_lengths=spec.seq_lengths,
                               val_fraction=spec.val_fraction, seed=spec.seed, workers=workers, progress=False))
        from fusiontree.data.tokenizer import load_sentencepiece

        tok = work / "tokenizer_build" / "tokenizer.model"
        sp = load_sentencepiece(tok)
        padded = write_training_jsonl(work / "passkey.jsonl", docs, sp=sp, pad_to_tokens=max(spec.seq_lengths) - 1,
                                      **pk)
        build_shards(BuildArgs(inputs=inputs + [str(padded)], output=str(out), tokenizer=str(tok),
                               seq_lengths=spec.seq_lengths, val_fraction=spec.val_fraction, seed=spec.seed,
                               workers=workers, progress=False))
    else:
        build_shards(BuildArgs(inputs=inputs, output=str(out), vocab_size=spec.vocab_size,
                               seq_lengths=spec.seq_lengths, val_fraction=spec.val_fraction, seed=spec.seed,
                               workers=workers, progress=False))
    stamp.write_text(json.dumps({"sha": fingerprint, "spec": dataclasses.asdict(spec)}, indent=2))
    return out


def _input_path(spec: str) -> Path:
    from fusiontree.data.corpus import interpreter_path

    p = interpreter_path(spec) if spec.startswith(("stdlib:", "site:")) else _resolve(spec)
    if not p.exists():
        raise ValueError(f"data_build input {spec!r} does not exist ({p})")
    return p


# ------------------------------------------------------------------------------ training

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _override_args(overrides: dict) -> list[str]:
    return [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]


def run_finished(run_dir: Path, steps: int) -> Path | None:
    latest = CheckpointManager(run_dir / "checkpoints", 0, 1).latest_valid() if (run_dir / "checkpoints").is_dir() \
        else None
    if latest is not None and checkpoint_step(latest) >= steps:
        return latest
    return None


def train_command(base_yaml: Path, run_dir: Path, overrides: dict, resume: bool) -> list[str]:
    return [sys.executable, str(ROOT / "launch/train.py"), "--config", str(base_yaml), f"--out_dir={run_dir}",
            *(["--resume", "auto"] if resume else []), *_override_args(overrides)]


def run_key(base_yaml: Path, overrides: dict) -> str:
    """The identity of a training run: its resolved run config and the shards' manifest. Runs
    with the same key are the same run (whichever variant, or ablation, asks for it); a changed
    base config or rebuilt data never reuses an old run."""
    from fusiontree.config import dump_config, load_config
    from fusiontree.data.shards import manifest_fingerprint

    cfg = load_config(base_yaml, _override_args(overrides))  # a bad override fails here, before training
    shards = Path(cfg.data.shards_dir)
    data = manifest_fingerprint(shards) if (shards / "manifest.json").is_file() else "no-shards"
    return hashlib.sha256((dump_config(cfg) + data).encode()).hexdigest()[:10]


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them ([] without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    named = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return named[:n] if named else [str(i) for i in range(n)]


class GpuSlots:
    """One GPU per run when runs train at once on a machine with GPUs: `take()` gives a free
    device's name (None when runs need no GPU of their own: one job, or no GPU), `give(dev)`
    returns it."""

    def __init__(self, jobs: int, gpus: list[str]):
        if jobs > 1 and gpus and jobs > len(gpus):
            raise ValueError(f"jobs={jobs} runs at once, but {len(gpus)} GPU(s) are visible: each run takes a "
                             f"GPU of its own; set jobs to at most {len(gpus)}")
        self.free = list(gpus) if jobs > 1 else []

    def take(self) -> str | None:
        return self.free.pop(0) if self.free else None

    def give(self, dev: str | None) -> None:
        if dev is not None:
            self.free.append(dev)


def train_all(ab: Ablation, base_yaml: Path, threads: int) -> dict[str, dict]:
    """Train every distinct run, `ab.jobs` at a time (each on a GPU of its own when there are
    GPUs). Returns {run_key: info}."""
    from fusiontree.config import load_config

    runs: dict[str, dict] = {}
    for v in ab.variants:
        key = run_key(base_yaml, v.overrides)
        if key in runs:
            continue
        found = sorted(ab.runs_dir.glob(f"*-{key}")) if ab.runs_dir.is_dir() else []
        # named after the first variant that used it (here or in another ablation sharing runs_dir)
        run_dir = found[0] if found else ab.runs_dir / f"{v.name}-{key}"
        cfg = load_config(base_yaml, _override_args(v.overrides))
        runs[key] = {"run_dir": run_dir, "overrides": v.overrides, "steps": cfg.train.steps,
                     "tokens": cfg.train.steps * cfg.data.global_batch_tokens}
    pending = [k for k, r in runs.items() if run_finished(r["run_dir"], r["steps"]) is None]
    started = set(pending)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.setdefault("WANDB_MODE", "disabled")
    slots = GpuSlots(ab.jobs, visible_gpus())
    active: list[tuple[str, subprocess.Popen, float, object, str | None]] = []
    try:
        while pending or active:
            while pending and len(active) < ab.jobs:
                key = pending.pop(0)
                r = runs[key]
                r["run_dir"].mkdir(parents=True, exist_ok=True)
                resume = (r["run_dir"] / "checkpoints").is_dir()
                cmd = train_command(base_yaml, r["run_dir"], r["overrides"], resume)
                logf = open(r["run_dir"] / "train_stdout.log", "a")
                dev = slots.take()
                log.info("training %s%s: %s", r["run_dir"].name, "" if dev is None else f" on GPU {dev}",
                         " ".join(cmd[1:]))
                # a fresh port per run: runs in parallel must not share a rendezvous port
                run_env = dict(env, MASTER_PORT=str(_free_port()), **({} if dev is None else {"CUDA_VISIBLE_DEVICES": dev}))
                proc = subprocess.Popen(cmd, env=run_env, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
                active.append((key, proc, time.perf_counter(), logf, dev))
            time.sleep(0.5)
            for item in list(active):
                key, proc, t0, logf, dev = item
                if proc.poll() is None:
                    continue
                active.remove(item)
                slots.give(dev)
                logf.close()
                runs[key]["train_s"] = time.perf_counter() - t0
                if proc.returncode != 0:
                    tail = (runs[key]["run_dir"] / "train_stdout.log").read_text()[-3000:]
                    raise RuntimeError(f"training run {runs[key]['run_dir'].name} ({runs[key]['overrides']}) failed "
                                       f"with status {proc.returncode}:\n{tail}")
                log.info("trained %s in %.0f s", runs[key]["run_dir"].name, runs[key]["train_s"])
                # kept with the run, so an ablation that reuses it still reports its training time
                (runs[key]["run_dir"] / "train_time.json").write_text(json.dumps(
                    {"train_s": runs[key]["train_s"], "jobs": ab.jobs, "threads": threads}))
    finally:
        for _, proc, _, logf, _ in active:  # a failure or an interrupt must not leave runs behind
            proc.kill()
            proc.wait()
            logf.close()
    for key, r in runs.items():
        r["reused"] = key not in started
        if r["reused"] and (r["run_dir"] / "train_time.json").is_file():
            r["train_s"] = json.loads((r["run_dir"] / "train_time.json").read_text())["train_s"]
        r["checkpoint"] = run_finished(r["run_dir"], r["steps"])
        if r["checkpoint"] is None:
            raise RuntimeError(f"run {r['run_dir']} finished without a checkpoint at step {r['steps']}")
    return runs


def _train_stats(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "loss" in r]
    last = [r["loss"] for r in steps[-10:] if r["loss"] is not None]  # null: a skipped step
    out = {"final_train_loss": sum(last) / len(last) if last else float("nan"),
           "tokens_seen": steps[-1]["tokens_seen"] if steps else 0}
    tps = [r["tokens_per_s"] for r in steps[1:] if r.get("tokens_per_s")]
    if tps:
        out["train_tokens_per_s"] = sorted(tps)[len(tps) // 2]
    return out


# ------------------------------------------------------------------------------ evaluation

def _plan_for(prune, checkpoint: Path) -> dict:
    from fusiontree.eval.pruning import load_plan, plan_with_thresholds

    if prune == "auto":
        return load_plan(checkpoint / "pruning_plan.json")
    if isinstance(prune, dict) and "branches" in prune:
        entries = []
        for b in prune["branches"]:
            layer, _, branch = str(b).partition(":")
            entries.append({"layer": int(layer), "branch": branch})
        return {"prune": entries}
    if isinstance(prune, dict):
        return plan_with_thresholds(load_plan(checkpoint / "pruning_plan.json"),
                                    float(prune.get("off_threshold", 0.05)), float(prune.get("frac_threshold", 0.02)))
    raise ValueError(f"prune={prune!r}: use auto, {{off_threshold, frac_threshold}} or {{branches: [LAYER:BRANCH]}}")


def evaluate_variant(v: Variant, run: dict, ab: Ablation) -> dict:
    from fusiontree.checkpoint import checkpoint_tokenizer, load_checkpoint
    from fusiontree.eval.pruning import apply_pruning
    from fusiontree.eval.tasks import evaluate

    ckpt_dir = run["checkpoint"]
    info: dict = {"overrides": v.overrides, "run_dir": str(run["run_dir"]), "checkpoint": str(ckpt_dir),
                  "train_s": run.get("train_s"), **_train_stats(run["run_dir"])}
    out = ab.out_dir / "eval" / v.name
    if v.prune is not None:
        plan = _plan_for(v.prune, ckpt_dir)
        ckpt_dir = apply_pruning(ckpt_dir, plan, out / "pruned_checkpoint")
        info["pruned"] = [f"{p['layer']}:{p['branch']}" for p in plan["prune"]]
    ck = load_checkpoint(ckpt_dir)
    m = ck.cfg.model
    info.update(params=sum(p.numel() for p in ck.model.parameters()), n_layers=m.n_layers, mixer=m.mixer,
                attn_pattern=m.attn_pattern if m.has_attention else "-", window=m.local_window)
    sp = checkpoint_tokenizer(ck)
    info["eval"] = evaluate(ck.model, sp, ab.eval_tasks, ab.eval_options, out, shards_dir=ck.cfg.data.shards_dir,
                            title=f"{ab.name}: {v.name}", loss=ck.cfg.loss)
    return info


def table_row(name: str, info: dict) -> dict:
    row = {"variant": name, "mixer": info["mixer"], "layers": info["n_layers"], "pattern": info["attn_pattern"],
           "window": info["window"] if info["window"] is not None else "-",
           "params (M)": info["params"] / 1e6, "train tokens": info["tokens_seen"],
           "train loss": info["final_train_loss"]}
    if info.get("pruned") is not None:
        row["pruned"] = ", ".join(info["pruned"]) or "nothing"
    row.update(summary_row(info["eval"], passkey_per_context=True))
    if info.get("train_s"):
        row["train s"] = info["train_s"]
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c in rows[0] if c in ("val ppl", "held-out files ppl", "next-line EM") or c.startswith("passkey@")
               or c.startswith("HumanEval")]
    metrics = [m for m in metrics if all(isinstance(r.get(m), (int, float)) for r in rows)
               and not (m.endswith(" >W") and all(abs(r[m] - r[m[:-3]]) < 1e-9 for r in rows))] or ["train loss"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.2 + 2.6 * len(metrics), 3.4), squeeze=False)
    names = [r["variant"] for r in rows]
    for ax, m in zip(axes[0], metrics):
        vals = [r[m] for r in rows]
        ax.bar(range(len(rows)), vals, color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(m, fontsize=9)
        if m.startswith("passkey") or m.endswith("EM") or m.startswith("HumanEval"):
            ax.set_ylim(0, 1)
        for i, val in enumerate(vals):
            ax.text(i, val, f"{val:.2f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_ablation(path: str | Path, only: list[str] | None = None) -> dict:
    """Train (as needed), evaluate, and write results.{md,json,png} to the ablation's out_dir."""
    import torch

    ab = load_ablation(path)
    if only:
        unknown = set(only) - {v.name for v in ab.variants}
        if unknown:
            raise ValueError(f"--only {sorted(unknown)}: no such variants; have {[v.name for v in ab.variants]}")
        ab.variants = [v for v in ab.variants if v.name in only]
    ab.out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base = dict(ab.base)
    if ab.data_build is not None:
        shards = build_data(ab.data_build)
        base = merge_dicts(base, {"data": {"shards_dir": str(shards)}})
    base_yaml = ab.out_dir / "base_config.yaml"
    base_yaml.write_text(yaml.safe_dump(base, sort_keys=False))
    cores = cpu_count()
    threads = max(1, cores // ab.jobs)
    runs = train_all(ab, base_yaml, threads)
    t_train = time.perf_counter() - t_start
    if ab.eval_threads:
        torch.set_num_threads(ab.eval_threads)
    results = {}
    for v in ab.variants:
        log.info("evaluating %s", v.name)
        results[v.name] = evaluate_variant(v, runs[run_key(base_yaml, v.overrides)], ab)
    rows = [table_row(name, info) for name, info in results.items()]
    table = markdown_table(rows)
    elapsed = time.perf_counter() - t_start
    source = os.path.relpath(ab.source, ROOT) if ab.source.startswith(str(ROOT)) else ab.source
    cmd = f"python launch/ablate.py {source}"
    reused = sum(r["reused"] for r in runs.values())
    header = [f"# Ablation: {ab.name}", "", ab.description.strip(), "", f"Command: `{cmd}`", "",
              f"Same seed, shards and tokens for every variant ({len(runs)} training run(s), {ab.jobs} at a time, "
              f"{threads} thread(s) each; {reused} of them reused from earlier invocations, whose training time "
              f"the 'train s' column still shows). Wall time of this invocation: {elapsed:.0f} s "
              f"({t_train:.0f} s data + training).", ""]
    (ab.out_dir / "results.md").write_text("\n".join(header) + table + "\n")
    (ab.out_dir / "results.json").write_text(json.dumps({"name": ab.name, "command": cmd, "rows": rows,
                                                         "variants": results, "wall_s": elapsed}, indent=2,
                                                        default=str))
    plot(rows, ab.out_dir / "results.png", ab.name)
    return {"rows": rows, "table": table, "out_dir": ab.out_dir, "variants": results}
