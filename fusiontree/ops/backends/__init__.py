"""Fast backends of the ops, each checked against the reference in `fusiontree/ops/` by tests.

`mamba_ssm`: mamba-ssm's Triton SSD kernels; `flex`: FlexAttention and SDPA for attention. They are imported only by their
loaders in `fusiontree.ops`, so a missing optional package fails only the backend that needs it.
"""
