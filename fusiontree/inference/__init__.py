"""Inference: autoregressive generation with the KV + Mamba caches (`generate`, `complete`),
decode steps replayed from a CUDA graph (`GraphedDecoder`) and streamed text (`TextStream`)."""

from fusiontree.inference.generate import check_sampling, complete, generate, left_pad, sample_next
from fusiontree.inference.stream import TextStream

__all__ = ["TextStream", "check_sampling", "complete", "generate", "left_pad", "sample_next"]
