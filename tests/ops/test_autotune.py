"""Parallel compilation of autotuning candidates, against a stand-in for Triton's autotuner with
the structure of Triton 3.6 (`run` -> `prune_configs` -> `_bench(*args, config, **meta)` per
candidate -> the kernel's `run(..., grid, warmup)`, which compiles a candidate the first time it
sees it, through `AsyncCompileMode`'s executor while one is active). The real Triton runs on GPU
machines only; there the same code is exercised by every autotuning of mamba-ssm's kernels when
`train.autotune_compile_threads` > 1."""

import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest

from fusiontree.config import TrainConfig
from fusiontree.ops.backends import autotune

COMPILE_S = 0.2


class Config:
    def __init__(self, block):
        self.block = block

    def all_kwargs(self):
        return {"BLOCK": self.block, "num_warps": 4}

    def __repr__(self):
        return f"BLOCK={self.block}"


class AsyncCompileMode:
    """Triton's contract: while active, a kernel's compile is submitted to `executor` and filed
    into the kernel's cache when the mode exits (failures dropped with ignore_errors)."""

    active = None

    def __init__(self, executor, *, ignore_errors=False):
        self.executor, self.ignore_errors, self.futures = executor, ignore_errors, {}

    def submit(self, key, compile_fn, finalize_fn):
        if key not in self.futures:
            self.futures[key] = (self.executor.submit(compile_fn), finalize_fn)
        return self.futures[key][0]

    def __enter__(self):
        if AsyncCompileMode.active is not None:
            raise RuntimeError("Another AsyncCompileMode is already active")
        AsyncCompileMode.active = self
        return self

    def __exit__(self, *exc):
        for future, finalize in self.futures.values():
            try:
                finalize(future.result())
            except Exception:
                if not self.ignore_errors:
                    raise
        AsyncCompileMode.active = None


class Kernel:
    """Compiles (COMPILE_S of host time) once per BLOCK; a launch reports a time per BLOCK."""

    def __init__(self, fail=(), reject=()):
        self.compiled, self.events, self.fail, self.reject = {}, [], dict.fromkeys(fail, 0), reject
        self.lock = threading.Lock()
        self.active = self.max_active = 0

    def _compile(self, block):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(COMPILE_S)
        with self.lock:
            self.active -= 1
            self.events.append(("compile", block, threading.current_thread().name))
        if block in self.fail:
            self.fail[block] += 1
            raise RuntimeError(f"BLOCK={block} does not fit")
        return f"binary-{block}"

    def run(self, *args, grid, warmup, BLOCK, num_warps):
        if BLOCK in self.reject:  # refused before any compile, as a bad argument binding would be
            raise RuntimeError(f"BLOCK={BLOCK} rejected")
        if BLOCK not in self.compiled:
            mode = AsyncCompileMode.active
            if mode is not None:
                future = mode.submit(BLOCK, lambda: self._compile(BLOCK),
                                     lambda binary: self.compiled.__setitem__(BLOCK, binary))
                if warmup:
                    return future
                self.compiled[BLOCK] = future.result()
            else:
                self.compiled[BLOCK] = self._compile(BLOCK)
        if not warmup:
            self.events.append(("launch", BLOCK, threading.current_thread().name))
            return abs(BLOCK - 32) + args[0]  # the stand-in's timing: BLOCK=32 is fastest


class Autotuner:
    def __init__(self, fn, configs):
        self.fn, self.configs, self.cache = fn, configs, {}

    def prune_configs(self, kwargs):
        return list(self.configs)

    def _bench(self, *args, config, **meta):
        try:
            return self.fn.run(*args, **dict(meta, **config.all_kwargs()))
        except RuntimeError:
            return float("inf")  # as Triton does with a config that cannot compile

    def run(self, *args, **kwargs):
        key = args
        if key not in self.cache:
            timings = {c: self._bench(*args, config=c, **kwargs) for c in self.prune_configs(kwargs)}
            self.cache[key] = min(timings, key=timings.get)
        return self.cache[key]


@pytest.fixture
def fake_triton(monkeypatch):
    mod = types.ModuleType("triton.runtime.autotuner")
    mod.Autotuner = Autotuner
    top = types.ModuleType("triton")
    top.AsyncCompileMode = AsyncCompileMode
    for name, m in (("triton", top), ("triton.runtime", types.ModuleType("triton.runtime")),
                    ("triton.runtime.autotuner", mod)):
        monkeypatch.setitem(sys.modules, name, m)
    original = Autotuner._bench
    yield Autotuner
    autotune.parallel_autotune_compile(0)
    assert Autotuner._bench is original


def _tune(fail=(), reject=()):
    kernel = Kernel(fail, reject)
    best = Autotuner(kernel, [Config(b) for b in (8, 16, 32, 64)]).run(1, grid=(1,), warmup=False)
    return kernel, best


def test_candidates_compile_in_parallel_before_the_loop_times_them(fake_triton):
    serial, best_serial = _tune()
    assert serial.max_active == 1 and [e[0] for e in serial.events[:2]] == ["compile", "launch"]
    autotune.parallel_autotune_compile(4)
    kernel, best = _tune()
    assert best.block == best_serial.block == 32
    kinds = [e[0] for e in kernel.events]
    assert kinds == ["compile"] * 4 + ["launch"] * 4  # every candidate compiled before the first timing
    assert kernel.max_active >= 2  # at the same time
    assert all(e[2].startswith("autotune-compile") for e in kernel.events[:4])
    assert all(e[2] == threading.current_thread().name for e in kernel.events[4:])  # timed one by one, here
    # a second autotuning (a new key) of the same kernel: compiled already, nothing compiles again
    Autotuner(kernel, [Config(b) for b in (8, 16, 32, 64)]).run(2, grid=(1,), warmup=False)
    assert [e[0] for e in kernel.events].count("compile") == 4


def test_a_candidate_that_fails_on_a_thread_is_left_to_the_loop(fake_triton):
    autotune.parallel_autotune_compile(3)
    kernel, best = _tune(fail=(32,))
    assert best.block in (16, 64)  # the best of those that compile, as without threads
    assert kernel.fail[32] == 2  # tried on a thread, then again by the loop, which ruled it out
    assert _tune(fail=(32,))[1].block == best.block
    assert _tune(reject=(32,))[1].block == best.block  # a candidate refused at once, likewise


def test_inside_another_asynchronous_compile_the_candidates_compile_one_by_one(fake_triton):
    autotune.parallel_autotune_compile(4)
    kernel = Kernel()
    with ThreadPoolExecutor(2) as executor, AsyncCompileMode(executor):  # someone else's, active here
        best = Autotuner(kernel, [Config(b) for b in (8, 16, 32, 64)]).run(1, grid=(1,), warmup=False)
    assert best.block == 32
    assert kernel.max_active == 1 and [e[0] for e in kernel.events[:2]] == ["compile", "launch"]


def test_an_autotuner_of_another_shape_is_refused(fake_triton, monkeypatch):
    class OtherAutotuner(Autotuner):
        def _bench(self, *args, **meta):
            return 0.0

    monkeypatch.setattr(sys.modules["triton.runtime.autotuner"], "Autotuner", OtherAutotuner)
    with pytest.raises(RuntimeError, match="Autotuner._bench.*set train.autotune_compile_threads=0"):
        autotune.parallel_autotune_compile(2)


def test_thread_count_is_validated():
    with pytest.raises(ValueError, match="autotune_compile_threads=-2 must be >= -1"):
        TrainConfig(autotune_compile_threads=-2).validate()


def _trainer_on(device_type: str):
    from types import SimpleNamespace as NS

    from fusiontree.train.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # only what _init_autotune reads
    trainer.di = NS(device=NS(type=device_type), world_size=16)
    return trainer


def test_automatic_threads_take_the_cores_each_rank_of_the_node_gets(monkeypatch):
    import fusiontree.train.trainer as trainer_mod

    calls = []
    monkeypatch.setattr(trainer_mod, "parallel_autotune_compile", calls.append)
    monkeypatch.setattr(trainer_mod, "cpu_count", lambda: 32)
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    _trainer_on("cuda")._init_autotune(-1)  # no launcher says: the run's 16 ranks share the node
    assert calls[-1] == 2
    for name, ranks, want in (("LOCAL_WORLD_SIZE", "1", 8), ("LOCAL_SIZE", "8", 4), ("SLURM_NTASKS_PER_NODE", "64", 1)):
        monkeypatch.setenv(name, ranks)  # torchrun's, DeepSpeed's launcher's, Slurm's
        _trainer_on("cuda")._init_autotune(-1)
        assert calls[-1] == want
        monkeypatch.delenv(name)
    _trainer_on("cpu")._init_autotune(-1)  # no Triton autotuning on CPU: nothing patched
    _trainer_on("cuda")._init_autotune(0)
    assert len(calls) == 4


def test_automatic_threads_warn_and_keep_tritons_loop_where_triton_lacks_the_interface(monkeypatch, caplog):
    import fusiontree.train.trainer as trainer_mod

    def refuse(threads):
        raise RuntimeError("this Triton lacks Autotuner._bench; set train.autotune_compile_threads=0")

    monkeypatch.setattr(trainer_mod, "parallel_autotune_compile", refuse)
    with caplog.at_level("WARNING", logger="fusiontree.train"):
        _trainer_on("cuda")._init_autotune(-1)
    assert "compiles its candidates one by one: this Triton lacks" in caplog.text
    with pytest.raises(RuntimeError, match="lacks"):  # asked for explicitly: refused
        _trainer_on("cuda")._init_autotune(4)
