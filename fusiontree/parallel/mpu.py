"""megatron-core parallel state for FusionTree, and the `mpu` object DeepSpeed asks for.

Ranks are laid out as megatron-core does (tensor-parallel ranks adjacent: with k-way tensor
parallelism, ranks 0..k-1 form the first tensor-parallel group; the data-parallel groups take
one rank from each). There is no pipeline parallelism, so "model parallel" is tensor parallel.

DeepSpeed reads the model-parallel layout from `deepspeed.initialize(..., mpu=...)`: ZeRO
partitions and averages gradients over `get_data_parallel_group()`, the gradient norm is
summed over `get_model_parallel_group()`, and each tensor-parallel rank writes its own
`mp_rank_XX` model file. megatron-core's parallel_state names these differently (and has no
`get_model_parallel_rank`), hence `DeepSpeedMPU`. It deliberately has no
`get_sequence_parallel_*` methods: to DeepSpeed those mean Ulysses sequence parallelism, a
different scheme, and would shrink its data-parallel size.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state

from fusiontree.config import ParallelConfig


def init_parallel_state(cfg: ParallelConfig) -> None:
    """Create the tensor- and data-parallel groups (after torch.distributed is initialised)."""
    if not dist.is_initialized():
        raise ValueError("init_parallel_state needs torch.distributed: call "
                         "fusiontree.train.distributed.init_distributed() first")
    world, tp = dist.get_world_size(), cfg.tensor_parallel
    if tp < 1 or world % tp:
        raise ValueError(f"parallel.tensor_parallel={tp} must divide the number of processes ({world}); "
                         f"the data-parallel size is processes // tensor_parallel")
    if parallel_state.model_parallel_is_initialized():
        have = parallel_state.get_tensor_model_parallel_world_size()
        if have != tp:
            raise ValueError(f"megatron-core parallel state already exists with tensor-parallel size {have}; "
                             "call destroy_parallel_state() before re-initialising it")
        return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


def destroy_parallel_state() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


class DeepSpeedMPU:
    """The model-parallel unit DeepSpeed 0.19 queries, over megatron-core's parallel state."""

    # tensor parallel == model parallel (no pipeline stages)
    @staticmethod
    def get_model_parallel_rank() -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    @staticmethod
    def get_model_parallel_group() -> dist.ProcessGroup:
        return parallel_state.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    @staticmethod
    def get_tensor_model_parallel_src_rank() -> int:
        return parallel_state.get_tensor_model_parallel_src_rank()

    @staticmethod
    def get_data_parallel_rank() -> int:
        return parallel_state.get_data_parallel_rank()

    @staticmethod
    def get_data_parallel_world_size() -> int:
        return parallel_state.get_data_parallel_world_size()

    @staticmethod
    def get_data_parallel_group() -> dist.ProcessGroup:
        return parallel_state.get_data_parallel_group()

    @staticmethod
    def get_data_parallel_group_ranks() -> list[int]:
        return dist.get_process_group_ranks(parallel_state.get_data_parallel_group())

    @staticmethod
    def get_pipeline_model_parallel_rank() -> int:
        return 0

    @staticmethod
    def get_pipeline_model_parallel_world_size() -> int:
        return 1

    @staticmethod
    def get_pipeline_model_parallel_group() -> dist.ProcessGroup:
        return parallel_state.get_pipeline_model_parallel_group()
