"""Tensor and sequence parallelism for FusionTree, applied from outside to a plain model.

A trainer makes these calls, in this order, on every rank:

    from fusiontree.parallel import DeepSpeedMPU, init_parallel_state, parallelize
    from fusiontree.train.distributed import init_distributed

    dist_info = init_distributed(device=cfg.train.device)      # 1. torch.distributed (NCCL / gloo)
    init_parallel_state(cfg.parallel)                          # 2. megatron-core TP and DP groups
    torch.manual_seed(cfg.seed)                                # 3. the plain model, same on every rank,
    model = HybridLanguageModel(cfg.model, kernels).to(dist_info.device)   #    on this rank's device
    model = parallelize(model, cfg.parallel)                   # 4. in place: this rank's TP share
    apply_compile(model); apply_activation_checkpointing(model)  #    then the training mechanics, if any
    engine, optimizer, _, _ = deepspeed.initialize(            # 5. ZeRO over the data-parallel group only
        model=model, optimizer=optimizer_over(model.parameters()), config=ds_config, mpu=DeepSpeedMPU())
    ...
    out = engine(input_ids)                                    # same batch on every rank of a TP group,
    loss, parts = loss_fn(out.logits, input_ids, out.gates)    # a different one per data-parallel rank
    engine.backward(loss); engine.step()

- Without tensor parallelism the trainer skips steps 2 and 4 and passes `mpu=None`: DeepSpeed's
  group over all ranks is then the data-parallel group, and megatron-core is never imported
  (the package loads its modules on first use).
- Data: the ranks of one tensor-parallel group read the same batch; the data-parallel rank
  and size are `parallel_state.get_data_parallel_rank() / _world_size()` (or the mpu's).
  Every rank of a tensor-parallel group computes the same loss; log it from any one.
- Sequence parallelism needs every batch's length divisible by the tensor-parallel size.
- Gradients of replicated parameters under sequence parallelism (norm gains, gate, SRTE,
  final norm) are all-reduced over the tensor-parallel group by hooks that `parallelize`
  registers on them, inside the backward, before DeepSpeed (which does not do it) reads
  them. Nothing to call after backward. `sequence_parallel_params(model)` lists them.
- Checkpoints: DeepSpeed writes one model file per tensor-parallel rank (`mp_rank_XX`).
  `consolidate_state_dicts` turns the k files of a TP=k run into a plain (TP=1) state dict;
  `shard_state_dict` makes rank r's share of a plain one, for `model.load_state_dict` after
  `parallelize`. Optimizer states are not resharded.
- Generation: parallelize with `sequence_parallel=false`; caches then hold each rank's heads.
  With sampling, seed the generator identically on the ranks of a tensor-parallel group.
"""

import importlib

# Loaded on first use (PEP 562): importing megatron-core costs seconds of CPU per process, and a
# run without tensor parallelism never needs it (its data-parallel groups are DeepSpeed's own).
_HOME = {"DeepSpeedMPU": "mpu", "init_parallel_state": "mpu", "destroy_parallel_state": "mpu",
         "parallelize": "tensor_parallel", "sequence_parallel_params": "tensor_parallel",
         "consolidate_state_dicts": "reshard", "consolidated_model_state": "reshard", "shard_state_dict": "reshard"}

__all__ = [*_HOME, "tensor_parallel_splits"]


def __getattr__(name: str):
    if name == "tensor_parallel_splits":
        from fusiontree.models.splits import tensor_parallel_splits

        return tensor_parallel_splits
    if name in _HOME:
        return getattr(importlib.import_module(f"fusiontree.parallel.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
