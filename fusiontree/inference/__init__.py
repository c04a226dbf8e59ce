"""Inference: autoregressive generation with the KV + Mamba caches (`generate`, `complete`)
and decode steps replayed from a CUDA graph (`GraphedDecoder`)."""

from fusiontree.inference.generate import complete, generate, left_pad, sample_next

__all__ = ["complete", "generate", "left_pad", "sample_next"]
