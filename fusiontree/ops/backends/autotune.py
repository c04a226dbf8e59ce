"""Triton autotuning with its candidates compiled in parallel.

Triton's autotuner (`triton.runtime.autotuner.Autotuner`, 3.x) compiles each candidate config
lazily inside its benchmark loop, one after the other; compiling, not timing, is most of an
autotuning. On an H200, mamba-ssm's SSD kernels autotuned 19 times in the first step of `small`
at 4K: 87 s of its 137 s cold start.

`parallel_autotune_compile(threads)` makes each autotuning first compile all its candidates
(the kernel's `run(..., warmup=True)`: compile without launching) under Triton's own
`AsyncCompileMode`, which hands the compiles to `threads` threads and files the results into the
kernel's cache, then benchmark them one at a time as before, so the timings, and the config
Triton keeps, come from the same sequential loop. A candidate that fails to compile ahead is
compiled again by that loop, which treats a failure as it always does. Compiled kernels land in
Triton's caches (memory and `TRITON_CACHE_DIR`) exactly as a lazy compile would.

It changes Triton's `Autotuner._bench` in this process; `threads <= 1` restores the original.
"""

from __future__ import annotations

import inspect
import logging
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

_state: dict = {"original": None, "pool": None, "threads": 0, "async_mode": None}


def _triton():
    try:
        from triton import AsyncCompileMode
        from triton.runtime.autotuner import Autotuner
    except ImportError as e:
        raise RuntimeError(f"parallel autotune compilation needs Triton 3.6 or later (AsyncCompileMode), "
                           f"which does not import: {e}; set train.autotune_compile_threads=0") from e
    return Autotuner, AsyncCompileMode


def _check_interface(Autotuner) -> None:
    bench = inspect.signature(_state["original"] or Autotuner._bench).parameters
    if "config" not in bench or bench["config"].kind is not inspect.Parameter.KEYWORD_ONLY \
            or not hasattr(Autotuner, "prune_configs"):
        raise RuntimeError("parallel autotune compilation needs Triton's Autotuner._bench(*args, config, **meta) and "
                           "Autotuner.prune_configs (Triton 3.x), which this Triton lacks; set "
                           "train.autotune_compile_threads=0")


def parallel_autotune_compile(threads: int) -> None:
    """Compile autotuning candidates on `threads` threads from now on (<= 1: Triton's own loop)."""
    Autotuner, async_mode = _triton()
    if threads <= 1:
        if _state["original"] is not None:
            Autotuner._bench = _state["original"]
            _state["original"] = None
        if _state["pool"] is not None:
            _state["pool"].shutdown(wait=True)
        _state.update(pool=None, threads=0)
        return
    _check_interface(Autotuner)
    if _state["pool"] is None or _state["threads"] != threads:
        if _state["pool"] is not None:
            _state["pool"].shutdown(wait=True)
        _state.update(pool=ThreadPoolExecutor(threads, thread_name_prefix="autotune-compile"), threads=threads,
                      async_mode=async_mode)
    if _state["original"] is None:
        original = _state["original"] = Autotuner._bench

        def _bench(self, *args, config, **meta):
            _compile_candidates(self, args, config, meta)
            return original(self, *args, config=config, **meta)

        Autotuner._bench = _bench


def _compile_candidates(tuner, args: tuple, config, meta: dict) -> None:
    """At the first candidate of an autotuning, compile every candidate in parallel."""
    candidates = tuner.prune_configs(meta)  # what the benchmark loop iterates over, in its order
    if not candidates or config is not candidates[0]:
        return
    try:
        mode = _state["async_mode"](_state["pool"], ignore_errors=True)
        mode.__enter__()
    except RuntimeError as e:  # another asynchronous compile is active on this thread: leave it be
        log.info("autotune candidates compile one by one here: %s", e)
        return
    try:
        for candidate in candidates:
            try:
                tuner.fn.run(*args, **{**meta, **candidate.all_kwargs(), "warmup": True})
            except Exception as e:  # the benchmark loop compiles it again and handles the failure
                log.debug("autotune candidate %s did not compile ahead: %s", candidate, e)
    finally:
        mode.__exit__(None, None, None)  # waits for every compile; failed ones are left out
