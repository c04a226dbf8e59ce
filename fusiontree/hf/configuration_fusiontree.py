"""FusionTreeConfig: the transformers configuration of an exported FusionTree model.

This file is copied into every exported model directory and loaded by transformers with
`trust_remote_code=True`; it imports only transformers. Field names follow transformers'
conventions where one exists (`hidden_size`, `num_hidden_layers`, `sliding_window`, ...); the
rest keep FusionTree's names (fusiontree/config.py `ModelConfig` documents each of them).

`layer_types` tells transformers' `DynamicCache` which cache each layer needs:

| layer | layer_types entry | cache layer |
| --- | --- | --- |
| attention + Mamba, sliding window | hybrid_sliding | KV of the last window - 1 tokens + conv / SSM state |
| attention + Mamba, global | hybrid | all KV + conv / SSM state |
| attention only | sliding_attention / full_attention | KV |
| Mamba only | linear_attention | conv / SSM state |
| both branches pruned | moe | none (transformers' tag for a layer without a sequence mixer) |
"""

from __future__ import annotations

from transformers import PreTrainedConfig


def fusiontree_layer_type(has_attention: bool, has_mamba: bool, is_global: bool) -> str:
    if has_attention and has_mamba:
        return "hybrid" if is_global else "hybrid_sliding"
    if has_attention:
        return "full_attention" if is_global else "sliding_attention"
    # transformers gives a layer tagged "moe" (a block that mixes no tokens) an empty cache layer
    return "linear_attention" if has_mamba else "moe"


class FusionTreeConfig(PreTrainedConfig):
    model_type = "fusiontree"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        num_hidden_layers: int = 12,
        max_position_embeddings: int = 32768,
        mixer: str = "hybrid",
        block: str = "parallel",
        gate: str = "channel",
        gate_rank: int = 32,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        head_dim: int = 64,
        sliding_window: int = 1024,
        attn_pattern: str = "LLLG",
        rope_theta: float = 10000.0,
        ssm_expand: int = 2,
        ssm_head_dim: int = 64,
        ssm_state_size: int = 128,
        ssm_groups: int = 1,
        conv_kernel: int = 4,
        chunk_size: int = 64,
        srte_dim: int = 64,
        srte_max_period: float = 10000.0,
        intermediate_size: int = 2752,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        pruned: list[str] | None = None,
        use_cache: bool = True,
        pad_token_id: int = 0,
        bos_token_id: int = 2,
        eos_token_id: int = 3,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.max_position_embeddings = max_position_embeddings
        self.mixer = mixer
        self.block = block
        self.gate = gate
        self.gate_rank = gate_rank
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.sliding_window = sliding_window
        self.attn_pattern = attn_pattern
        self.rope_theta = rope_theta
        self.ssm_expand = ssm_expand
        self.ssm_head_dim = ssm_head_dim
        self.ssm_state_size = ssm_state_size
        self.ssm_groups = ssm_groups
        self.conv_kernel = conv_kernel
        self.chunk_size = chunk_size
        self.srte_dim = srte_dim
        self.srte_max_period = srte_max_period
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.pruned = list(pruned or [])
        self.use_cache = use_cache
        # Derived from the fields above on every load, so an edited config.json cannot disagree.
        kwargs.pop("layer_types", None)
        self.layer_types = [
            fusiontree_layer_type(self.layer_has_attention(i), self.layer_has_mamba(i), self.layer_is_global(i))
            for i in range(num_hidden_layers)]
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    # The same rules as FusionTree's ModelConfig (which layer has which branch, which is global).
    def layer_has_attention(self, layer_idx: int) -> bool:
        return self.mixer in ("hybrid", "attention") and f"{layer_idx}:attention" not in self.pruned

    def layer_has_mamba(self, layer_idx: int) -> bool:
        return self.mixer in ("hybrid", "mamba") and f"{layer_idx}:mamba" not in self.pruned

    def layer_is_global(self, layer_idx: int) -> bool:
        return self.attn_pattern[layer_idx % len(self.attn_pattern)] == "G"

    @property
    def ssm_inner_size(self) -> int:
        return self.ssm_expand * self.hidden_size

    @property
    def ssm_num_heads(self) -> int:
        return self.ssm_inner_size // self.ssm_head_dim
