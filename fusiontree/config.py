"""One typed config tree for FusionTree, loaded strictly from YAML with dotted overrides.

Every section is a dataclass; each function takes only the section it needs, and the code a
section describes builds from it (`HybridLanguageModel(cfg.model)`, `resolve_kernels(cfg.kernels)`,
`HybridModelLoss(cfg.loss)`, `build_train_loader(cfg.data)`, `parallelize(model, cfg.parallel)`,
`build_optimizer(model, cfg.train)`). Units live in field names (`global_batch_tokens`,
`lr_peak`). Loading is strict: an unknown key is a `ValueError` naming the key and the keys
allowed there.

    cfg = load_config("configs/pretrain_v1.yaml", ["--model.d_model=512", "--train.steps=10"])

The model section and its presets live beside the model (`fusiontree/models/config.py`):
`model.preset` names one (`debug`, `tiny`, `small`, `1b`, `transformer-*`) and the other
`model.*` keys override its fields. This module imports only that section and the
tensor-parallel split table, so any layer of the package may read it. `load_dataclass`
loads any such tree (the evaluation options use it too).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fusiontree.models.config import ModelConfig, model_preset
from fusiontree.models.splits import check_tensor_parallel

# ----------------------------------------------------------------------------------------
# kernels, loss, training, generation


@dataclass
class KernelConfig:
    # `auto` picks the fastest backend that loads on this device; a named backend that
    # cannot load is an error, never a silent fallback.
    ssd: str = "auto"
    attention: str = "auto"
    # The Mamba conv1d: `causal_conv1d` (the causal-conv1d package's CUDA kernels), `triton`
    # (our Triton kernels) or `reference` (PyTorch, fused into the compiled blocks); `auto`
    # takes causal_conv1d on CUDA when the package imports, else triton.
    conv1d: str = "auto"
    # The static decode step's attention over a cache (CUDA-graphed generation): `all_slots`
    # reads every allocated slot through the attention backend; `filled_blocks` reads only the
    # filled blocks (FlexAttention's decoding kernel); `auto` takes filled_blocks on CUDA (the
    # faster there at every batch measured) and all_slots otherwise.
    decode_attention: str = "auto"


@dataclass
class LossConfig:
    ignore_index: int = -100
    # Drop the targets that cross a document boundary of a packed sequence.
    mask_cross_document: bool = True
    # Gate regulariser: `entropy` pushes each gate towards a decision (0 or 1), which makes
    # pruning plans sharper; `balance` pulls the mean gate towards 0.5 against collapse.
    gate_reg: Literal["none", "entropy", "balance"] = "entropy"
    gate_reg_weight: float = 1e-3


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    lr_peak: float = 3e-3
    lr_min_ratio: float = 0.1  # final lr = lr_peak * lr_min_ratio
    lr_warmup_steps: int = 20
    lr_decay: Literal["cosine", "wsd", "constant"] = "cosine"
    lr_decay_fraction: float = 0.2  # wsd: the share of steps spent decaying
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # AdamW's update kernels: "fused" (one kernel reads and writes each tensor once), "foreach"
    # (multi-tensor kernels, one pass per operation of the update), or "auto": fused on CUDA,
    # foreach on CPU. Same update, same state.
    optimizer_impl: Literal["auto", "fused", "foreach"] = "auto"
    # Decide a non-finite step's skip on the device (fused AdamW only): the fused kernel skips
    # the update itself, so the optimizer step waits for no host read of the gradients' check;
    # the trainer learns the outcome with the step's loss. Under ZeRO-1 and 2 the fused kernel
    # also applies train.grad_clip (by DeepSpeed's norm), since DeepSpeed's own clipping reads
    # the norm on the host. false: the decision is read on the host before the update, and
    # DeepSpeed clips (a sync in every optimizer step). auto: true with the fused AdamW.
    skip_on_device: bool | Literal["auto"] = "auto"
    # auto: bf16 on GPU, fp32 on CPU
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    activation_checkpointing: bool = False
    # With activation_checkpointing: recompute only the first N blocks and keep the others'
    # activations (Megatron's "block" recompute method), trading memory for less recomputation.
    # 0: every block.
    checkpoint_num_layers: int = 0
    # Compile each block with torch.compile (fusiontree.train.mechanics.apply_compile): fuses the
    # elementwise work around the matmuls and kernels. Costs compile time at each new length.
    compile: bool = False
    # torch.compile's backend for `compile` and `compile_loss`: "inductor" generates fused
    # kernels (the point of compiling); "aot_eager" traces the same graphs, forward and
    # backward, and runs them with the eager kernels: a check of graph capture without code
    # generation, minutes faster to compile on a CPU.
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    # Compile the loss's cross entropy too (one fused reduction over the bf16 logits instead of
    # an fp32 copy, a log-softmax and their gradients in memory). Independent of train.compile.
    compile_loss: bool = False
    # Capture each block's training forward and backward as CUDA graphs and replay them
    # (fusiontree/train/cuda_graphs.py): the host launches two graphs per block instead of
    # hundreds of kernels. CUDA only, one tensor-parallel rank per model, ZeRO 0-2; blocks that
    # `activation_checkpointing` recomputes stay ungraphed. Captured at the first step of each
    # sequence length.
    cuda_graphs: bool = False
    # Where Inductor and Triton keep compiled kernels and autotuning results ("": their own
    # defaults under /tmp and ~/.triton). Point every rank of a cluster at one shared directory
    # so that only the first run of a configuration compiles and autotunes.
    compile_cache_dir: str = ""
    # CUDA: compile each Triton autotuning's candidate configs on this many threads before its
    # benchmark loop times them one by one (fusiontree/ops/backends/autotune.py); 0 or 1:
    # Triton's own loop, which compiles each candidate when it first times it; -1: 8 threads (or
    # the cores of this node shared among its ranks, if fewer) where the installed Triton has the
    # interface, else Triton's own loop with a warning. mamba-ssm's kernels autotune 19 times in
    # a first step; on an H200 8 threads cut that from 98 to 45 s (BENCHMARKS.md).
    autotune_compile_threads: int = -1
    # CUDA, compiled blocks, a compile cache and mamba-ssm's SSD: run the SSD kernels' autotuning
    # in a separate process (one per node) while the trainer builds and compiles its model, and
    # read the choices from the cache at the first step (fusiontree/train/autotune_warmup.py);
    # false: the first step autotunes after the compile, one after the other.
    autotune_warmup: bool = True
    # Optimizer steps (1-based) to run under torch.profiler; each writes a table of the top
    # operators by GPU (or CPU) time to <out_dir>/profile/step_<N>.txt.
    profile_steps: list[int] = field(default_factory=list)
    # Non-finite loss or gradients skip the step; this many in a row stop the run.
    max_bad_steps: int = 5
    log_every_steps: int = 10
    eval_every_steps: int = 100
    eval_batches: int = 4
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 3
    # false: no checkpoints at all, not even at the end (throughput benchmarks, smoke tests).
    save_checkpoints: bool = True
    # Training waits only while the state is copied to host memory; the files are written by
    # a background thread (fusiontree/checkpoint.py). Complete-or-ignored either way.
    async_checkpoint: bool = False
    gate_stats_every_steps: int = 25
    wandb_project: str = "fusiontree"
    peak_flops_per_device: float = 0.0  # 0: the GPU's known bf16 peak, or measured on CPU
    # Fault injection for tests: make the loss of these optimizer steps (1-based) non-finite.
    inject_nan_steps: list[int] = field(default_factory=list)

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"train.steps={self.steps} must be >= 1")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ValueError(f"train.lr_min_ratio={self.lr_min_ratio} must lie in [0, 1]")
        if self.lr_warmup_steps < 0 or self.lr_warmup_steps > self.steps:
            raise ValueError(f"train.lr_warmup_steps={self.lr_warmup_steps} must lie in [0, train.steps]")
        if self.autotune_compile_threads < -1:
            raise ValueError(f"train.autotune_compile_threads={self.autotune_compile_threads} must be >= -1 "
                             "(-1: automatic, 0: Triton's own autotuning loop)")
        if any(n < 1 for n in self.profile_steps):
            raise ValueError(f"train.profile_steps={self.profile_steps} must list optimizer steps >= 1")
        if self.checkpoint_num_layers < 0:
            raise ValueError(f"train.checkpoint_num_layers={self.checkpoint_num_layers} must be >= 0 "
                             "(0 recomputes every block)")
        for name in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "gate_stats_every_steps",
                     "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")


def check_sampling(temperature: float, top_k: int, top_p: float, where: str = "") -> None:
    """The sampling settings `fusiontree.inference.sample_next` accepts (greedy at temperature 0)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{where}temperature={temperature} must be >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"{where}top_p={top_p} must lie in (0, 1] (1: no nucleus cut)")
    if top_k < 0:
        raise ValueError(f"{where}top_k={top_k} must be >= 0 (0: no top-k cut)")


@dataclass
class GenerateConfig:
    """The sample printed at the end of training (and saved as sample.txt)."""
    prompt: str = "def "
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0

    def validate(self, max_seq_len: int) -> None:
        """Checked with the rest of the config, so that a bad setting fails before training
        rather than at the sample after it. The prompt's length in tokens is checked once the
        tokenizer is loaded (`check_prompt_fits`)."""
        check_sampling(self.temperature, self.top_k, self.top_p, "generate.")
        # BOS, at least one prompt token, then the new tokens: all within the model's positions.
        if not 0 <= self.max_new_tokens <= max_seq_len - 2:
            raise ValueError(f"generate.max_new_tokens={self.max_new_tokens} must lie in [0, {max_seq_len - 2}]: "
                             f"BOS + prompt + new tokens must fit model.max_seq_len={max_seq_len}")

    def check_prompt_fits(self, prompt_tokens: int, max_seq_len: int) -> None:
        if 1 + prompt_tokens + self.max_new_tokens > max_seq_len:
            raise ValueError(f"generate.prompt is {prompt_tokens} tokens; with BOS and generate.max_new_tokens="
                             f"{self.max_new_tokens} that is beyond model.max_seq_len={max_seq_len}; shorten the "
                             f"prompt or set --generate.max_new_tokens={max(0, max_seq_len - 1 - prompt_tokens)}")


@dataclass
class ParallelConfig:
    """How each layer is split across GPUs (see fusiontree/parallel/). The data-parallel size
    is what is left: world size // tensor_parallel."""
    tensor_parallel: int = 1
    # Norms, residuals and gates run on sequence shards; all-gather before the column-parallel
    # projections, reduce-scatter after the row-parallel ones (needs tensor_parallel > 1).
    sequence_parallel: bool = False

    def validate(self, model: ModelConfig, seq_lens: typing.Iterable[int] = ()) -> None:
        """`seq_lens`: training sequence lengths the run will use (checked under sequence
        parallelism, as is model.max_seq_len)."""
        tp = self.tensor_parallel

        def bad(msg: str) -> None:
            raise ValueError(f"parallel config: {msg}")

        if tp < 1:
            bad(f"tensor_parallel={tp} must be >= 1")
        if self.sequence_parallel and tp == 1:
            bad("sequence_parallel=true shards the sequence over the tensor-parallel group, so it needs "
                "tensor_parallel > 1; set sequence_parallel=false or raise tensor_parallel")
        if tp == 1:
            return
        check_tensor_parallel(model, tp)
        if self.sequence_parallel:
            for name, n in [("model.max_seq_len", model.max_seq_len)] + \
                    [("sequence length", n) for n in seq_lens]:
                if n % tp:
                    bad(f"{name}={n} is not divisible by tensor_parallel={tp}, which sequence parallelism "
                        f"needs; use lengths that are multiples of {tp} or set sequence_parallel=false")


@dataclass
class CurriculumStage:
    seq_len: int = 512  # tokens per sample; must be a bucket of the built shards
    # The stage ends once training has seen this many tokens (all ranks together, counted
    # from the start of the run); 0 on the last stage: it runs to the end of training.
    until_tokens: int = 0


@dataclass
class DataConfig:
    """Shards, batch geometry and the length curriculum (fusiontree/data/loader.py)."""
    shards_dir: str = "data/shards"  # the --output of data_pipeline/build_shards.py
    # A SentencePiece .model or a Hugging Face tokenizer.json; "": the one the shards' manifest names.
    tokenizer: str = ""
    # Tokens per optimizer step over all ranks, the same in every curriculum stage.
    global_batch_tokens: int = 16384
    # Tokens per micro-batch per rank. micro-batch size = micro_batch_tokens // seq_len, so
    # longer sequences come in smaller micro-batches, and the gradient-accumulation steps,
    # global_batch_tokens // (micro_batch_tokens * data-parallel size), never change.
    micro_batch_tokens: int = 4096
    curriculum: list[CurriculumStage] = field(default_factory=lambda: [
        CurriculumStage(seq_len=512, until_tokens=1_638_400), CurriculumStage(seq_len=1024, until_tokens=0)])
    num_workers: int = 2  # DataLoader worker processes per rank; 0 reads in the training process
    prefetch_factor: int = 4  # micro-batches each worker keeps ready
    shuffle: bool = True  # reshuffle shards and samples every epoch (seeded by the run's seed)
    # At loader start: `size` stats every shard; `sha256` also hashes them (each rank hashes
    # its share) against the manifest. A mismatch is an error naming the shard.
    verify_shards: Literal["sha256", "size", "none"] = "sha256"
    # An unreadable shard while training: `error` stops naming it; `skip` logs it, counts it
    # and fills its samples' slots with readable samples (batches keep their size on every rank).
    on_corrupt_shard: Literal["error", "skip"] = "error"
    # Resuming from loader state written with another data-parallel size, worker count,
    # seed, micro_batch_tokens or shard build cannot replay the same samples: `error`
    # refuses; `next_epoch` starts every bucket at its next epoch.
    resume_mismatch: Literal["error", "next_epoch"] = "error"

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"data config: {msg}")

        if self.micro_batch_tokens < 1 or self.global_batch_tokens < 1:
            bad(f"micro_batch_tokens={self.micro_batch_tokens} and global_batch_tokens={self.global_batch_tokens} "
                "must be positive")
        if self.global_batch_tokens % self.micro_batch_tokens:
            bad(f"global_batch_tokens={self.global_batch_tokens} is not a multiple of micro_batch_tokens="
                f"{self.micro_batch_tokens}; make it one (global = micro x grad-accumulation steps x "
                "data-parallel size)")
        if not self.curriculum:
            bad("curriculum is empty; give at least one stage, e.g. [{seq_len: 512, until_tokens: 0}]")
        for i, stage in enumerate(self.curriculum):
            where = f"curriculum[{i}]"
            if stage.seq_len < 1:
                bad(f"{where}.seq_len={stage.seq_len} must be positive")
            if self.micro_batch_tokens % stage.seq_len:
                bad(f"{where}.seq_len={stage.seq_len} does not divide micro_batch_tokens={self.micro_batch_tokens}"
                    " (micro-batch size = micro_batch_tokens // seq_len); use a micro_batch_tokens that is a "
                    f"multiple of every stage's seq_len, e.g. {max(s.seq_len for s in self.curriculum)}")
            last = i == len(self.curriculum) - 1
            if stage.until_tokens < 0 or (stage.until_tokens == 0 and not last):
                bad(f"{where}.until_tokens={stage.until_tokens}: every stage but the last needs a positive "
                    "until_tokens (where it ends, in tokens seen); the last may use 0 (runs to the end)")
            if i and 0 < stage.until_tokens <= self.curriculum[i - 1].until_tokens:
                bad(f"{where}.until_tokens={stage.until_tokens} must exceed the previous stage's "
                    f"{self.curriculum[i - 1].until_tokens}; stages are listed in training order")
        if self.num_workers < 0 or self.prefetch_factor < 1:
            bad(f"num_workers={self.num_workers} must be >= 0 and prefetch_factor={self.prefetch_factor} >= 1")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=lambda: model_preset("debug"))
    kernels: KernelConfig = field(default_factory=KernelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 1234
    out_dir: str = "runs/default"

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        self.data.validate()
        self.generate.validate(self.model.max_seq_len)
        seq_lens = [s.seq_len for s in self.data.curriculum]
        self.parallel.validate(self.model, seq_lens)
        if self.train.cuda_graphs:
            if self.train.device == "cpu":
                raise ValueError("train.cuda_graphs=true needs a CUDA device, but train.device=cpu; "
                                 "set train.cuda_graphs=false on CPU")
            if self.parallel.tensor_parallel > 1:
                raise ValueError("train.cuda_graphs=true captures blocks on one GPU, and tensor parallelism "
                                 "puts collectives inside them; set train.cuda_graphs=false with "
                                 "parallel.tensor_parallel > 1")
            k = self.train.checkpoint_num_layers
            if self.train.activation_checkpointing and (k == 0 or k >= self.model.n_layers):
                raise ValueError("train.cuda_graphs=true graphs the blocks that keep their activations, but "
                                 "train.activation_checkpointing recomputes every block; set "
                                 f"train.checkpoint_num_layers below model.n_layers={self.model.n_layers}")
        if max(seq_lens) > self.model.max_seq_len:
            raise ValueError(f"data.curriculum reaches seq_len={max(seq_lens)}, beyond model.max_seq_len="
                             f"{self.model.max_seq_len}; raise model.max_seq_len or shorten the curriculum")


# ----------------------------------------------------------------------------------------
# resuming under a changed config

# Keys a resumed run may change freely: where and how it runs, what it logs and saves, never
# what it computes. The layout (parallel.*, the DeepSpeed JSON) is resharded on resume.
RESUME_FREE = ["out_dir", "kernels.*", "parallel.*", "generate.*", "train.log_every_steps",
               "train.eval_every_steps", "train.eval_batches", "train.checkpoint_every_steps",
               "train.keep_checkpoints", "train.save_checkpoints", "train.async_checkpoint",
               "train.gate_stats_every_steps", "train.wandb_project", "train.profile_steps", "train.compile",
               "train.compile_backend", "train.compile_loss", "train.compile_cache_dir", "train.autotune_compile_threads",
               "train.autotune_warmup",
               "train.optimizer_impl", "train.skip_on_device",
               "train.cuda_graphs", "train.activation_checkpointing",
               "train.checkpoint_num_layers", "train.peak_flops_per_device", "train.device", "train.max_bad_steps",
               "train.inject_nan_steps", "data.shards_dir", "data.tokenizer", "data.num_workers",
               "data.prefetch_factor", "data.verify_shards", "data.on_corrupt_shard", "data.resume_mismatch"]
# Keys that can never change in a resumed run: the saved weights and optimizer state have the
# model's shapes, and its function is what the run has been training.
RESUME_NEVER = ["model.*"]


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _matches(key: str, patterns: typing.Iterable[str]) -> bool:
    """`patterns`: dotted keys, globs (`train.lr_*`) or sections (`train` = every train.* key)."""
    import fnmatch

    return any(fnmatch.fnmatchcase(key, p) or key.startswith(p.rstrip(".*") + ".") for p in patterns)


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume_config(saved: dict, cfg: RunConfig, allow: typing.Sequence[str] = (), where: str = "the checkpoint"
                        ) -> list[str]:
    """Compare the config a checkpoint was saved with (`saved`, its config.yaml) with the
    config of the run resuming it. Returns the changed keys a resume accepts (RESUME_FREE, and
    those named in `allow`), as 'key: old -> new'. Raises a ValueError that lists the others:
    model keys (never) and everything else (unless allowed)."""
    old, new = _flat(saved), _flat(config_to_dict(cfg))
    for pattern in allow:
        if not any(_matches(k, [pattern]) for k in new):
            raise ValueError(f"--allow_config_change {pattern}: no config key matches it; name keys as "
                             "section.key (train.steps), globs (train.lr_*) or sections (train)")
    changed = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
    text = {k: f"{k}: {_show(old.get(k, '<absent>'))} -> {_show(new.get(k, '<absent>'))}" for k in changed}
    never = [k for k in changed if _matches(k, RESUME_NEVER)]
    if never:
        raise ValueError(f"the model config differs from the one {where} was saved with ({'; '.join(text[k] for k in never)}); "
                         "a resumed run keeps its model: undo the change, or start a new run from these weights "
                         "with --init_from")
    refused = [k for k in changed if not _matches(k, RESUME_FREE) and not _matches(k, allow)]
    if refused:
        raise ValueError(f"the config differs from the one {where} was saved with ({'; '.join(text[k] for k in refused)}); "
                         f"undo the change, or resume with it on purpose: --allow_config_change {','.join(refused)}")
    return [text[k] for k in changed]


# ----------------------------------------------------------------------------------------
# strict loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return " | ".join(repr(arg) for arg in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (int->float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{where}={value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{where}={value!r} matches none of {_type_name(tp)}: {errors}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}={value!r} must be a string")
        return value
    raise TypeError(f"{where}: unsupported annotation {tp!r}")


def _build(cls: type, data: dict, where: str, base: Any = None) -> Any:
    """Build dataclass `cls` from `data`, starting from `base` (or the defaults)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if cls is ModelConfig and "preset" in data:
        base = model_preset(data["preset"])
    for key in data:
        if key not in names:
            raise ValueError(f"unknown config key {where + '.' if where else ''}{key!r}; "
                             f"allowed keys{' in ' + where if where else ''}: {names}")
    obj = base if base is not None else cls()
    updates = {}
    for key, value in data.items():
        sub = f"{where}.{key}" if where else key
        current = getattr(obj, key)
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            updates[key] = _build(hints[key], value, sub, base=current)
        else:
            updates[key] = _coerce(value, hints[key], sub)
    return dataclasses.replace(obj, **updates)


def parse_overrides(args: list[str]) -> dict:
    """`["--model.d_model=512", "--train.steps", "10"]` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"config override {arg!r} must look like --section.key=value")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ValueError(f"config override --{key} has no value; write --{key}=VALUE")
            value = args[i + 1]
            i += 1
        i += 1
        node = out
        parts = key.split(".")
        if not all(parts):
            raise ValueError(f"config override --{key}: empty key segment")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"config override --{key} conflicts with an earlier override")
        try:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as e:
            raise ValueError(f"config override --{key}={value}: not a YAML value ({_yaml_problem(e, lines=False)}); quote "
                             f"strings and close brackets, e.g. --{key}='[1, 2]'") from None
    return out


def _yaml_problem(e: yaml.YAMLError, lines: bool = True) -> str:
    """A YAML error's reason in one line, without the excerpt of the text PyYAML appends."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context, mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and mark is not None and lines:
        return f"{problem} ({context} that starts at line {mark.line + 1})"
    return f"{problem} ({context})" if context else problem


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; a syntax error is a ValueError naming the file, line and column."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: YAML syntax error: {_yaml_problem(e)}; fix the file there") from None


def merge_dicts(a: dict, b: dict) -> dict:
    """`b` over `a`, recursively for nested dicts (neither is modified)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dataclass_from_dict(cls: type, data: dict) -> Any:
    """Build the dataclass tree `cls` strictly from `data` and run its `validate()` if it has one."""
    if not isinstance(data, dict):
        raise ValueError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    obj = _build(cls, data, "")
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def load_dataclass(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """`cls` from a YAML file (optional) with `--a.b=c` overrides on top, strictly."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config must be a mapping at the top level")
    return dataclass_from_dict(cls, merge_dicts(data, parse_overrides(overrides or [])))


def config_from_dict(data: dict) -> RunConfig:
    return dataclass_from_dict(RunConfig, data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    return load_dataclass(RunConfig, path, overrides)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
