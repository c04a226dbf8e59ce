"""HybridLanguageModel: embedding -> HybridBlocks -> RMSNorm -> LM head, with exact cached decoding.

Legend: B batch, T time (tokens in this call), D model width, V vocabulary.

The forward never adds a loss term: it returns logits, the updated caches, each layer's gate
(for `HybridModelLoss`'s regulariser) and, on request, per-layer gate statistics.

The model is plain single-device PyTorch. Parallelism (`fusiontree.parallel.parallelize`) and
training mechanics (`fusiontree.train.mechanics`: compiled blocks, activation checkpointing)
are applied to it from outside; generation lives in `fusiontree.inference`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch import Tensor

from fusiontree.models.config import ModelConfig
from fusiontree.models.block import HybridBlock, gate_stats
from fusiontree.models.cache import KVCache, MambaStates, SeqInfo
from fusiontree.models.layers import PackedProjections, RMSNorm
from fusiontree.ops import Kernels, compile_once, reference_kernels
from fusiontree.ops.masks import document_starts

log = logging.getLogger(__name__)


@dataclass
class HybridOutput:
    """The forward's result. Reads like a transformers output: `out.logits` and `out["logits"]`
    are the same tensor, `out["gate_stats"][layer_idx]` a layer's gate summary, and `keys()` /
    `items()` / `in` list the fields."""
    logits: Tensor  # [B, T, V]
    past_key_values: KVCache | None
    past_mamba_states: MambaStates | None
    gates: list[Tensor | None]  # per layer: [D] (per-channel) or [B, T, D] (per-token); None: no gate
    gate_stats: list[dict[str, Tensor] | None] | None  # per layer, when collect_gate_stats=True

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def items(self) -> list[tuple[str, object]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __getitem__(self, key: str):
        if not isinstance(key, str):
            raise TypeError(f"HybridOutput is indexed by field name (one of {self.keys()}), got {key!r}")
        if key not in self.keys():
            raise KeyError(f"HybridOutput has no field {key!r}; fields: {self.keys()}")
        return getattr(self, key)


def positions_from_seq_idx(seq_idx_BT: Tensor) -> Tensor:
    """Positions that restart at 0 at every document start of a packed row."""
    T = seq_idx_BT.shape[1]
    idx = torch.arange(T, device=seq_idx_BT.device).expand_as(seq_idx_BT)
    start = document_starts(seq_idx_BT, first=True)
    return idx - torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values


class HybridLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.kernels = kernels or reference_kernels()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(HybridBlock(cfg, i, self.kernels) for i in range(cfg.n_layers))
        self.norm_out = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Input validation costs a host sync (token range, positions); a training loop whose
        # data is already checked may turn it off.
        self.check_inputs = True
        # The blocks of `decode_step(compiled=True)`, made by `compile_decode`.
        self._compiled_decode: list | None = None
        self.decode_options: dict = {}
        self.init_weights()

    def init_weights(self) -> None:
        # Unit-scale embeddings: every block's input is normalised, and the fused branch
        # outputs are RMS-normalised, so the residual stream starts at a comparable scale.
        nn.init.normal_(self.embed.weight, std=1.0)
        for layer in self.layers:
            layer.init_weights()
        self.norm_out.init_weights()
        nn.init.normal_(self.lm_head.weight, std=self.cfg.init_std)

    # ------------------------------------------------------------------ caches

    def allocate_inference_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None,
                                 device: torch.device | str | None = None) -> tuple[KVCache, MambaStates]:
        """Preallocate every layer's cache for `batch_size` rows and up to `max_length` tokens
        (prompt + new tokens; only global-attention layers grow with it)."""
        if max_length > self.cfg.max_seq_len:
            raise ValueError(f"max_length={max_length} exceeds model max_seq_len={self.cfg.max_seq_len}")
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        per_layer = [layer.allocate_inference_cache(batch_size, max_length, dtype, device) for layer in self.layers]
        return (KVCache([a for a, _ in per_layer], batch_size, max_length),
                MambaStates([m for _, m in per_layer], batch_size))

    # ------------------------------------------------------------------ compiled decode step

    def pack_projections(self, on: bool = True) -> int:
        """Pack (on=False: unpack) the weights of the linears that read one input (each
        attention's q, k and v; each MLP's gate and up) for inference: one matmul each instead
        of several without gradients (`PackedProjections`). Returns how many modules are packed."""
        return sum(m.pack_projections(on) for m in self.modules() if isinstance(m, PackedProjections))

    def compile_decode(self, **compile_kwargs) -> None:
        """Compile each block of `decode_step` (static shapes, caches updated in place inside
        the graph): Inductor fuses the dozens of small elementwise kernels a block launches per
        token (norm casts, RoPE, SRTE, the conv and SSM step around the backends' calls, the
        gate mix) into a few. Only `decode_step(..., compiled=True)` uses them
        (`GraphedDecoder(compile=True)`). `compile_kwargs` go to torch.compile (a `mode`, say);
        `decode_options` says which the current blocks were compiled with. Static shapes unless
        `dynamic` is given: a second batch or cache size compiles graphs of its own instead of
        turning the blocks' shapes symbolic (generic kernels: on an H200, `1b` at 32K decoded batch
        32 in 24.5 ms per step after batch 1 in the same process, in 4.9-6.3 ms in one of its own).
        Each new batch or cache size costs a compile; `generate(cuda_graph=True)` rounds its
        caches up to multiples of `GRAPH_CACHE_BUCKET` slots so that similar prompts share one."""
        self._compiled_decode = [compile_once(type(layer).forward, **{"dynamic": False, **compile_kwargs})
                                 for layer in self.layers]
        self.decode_options = dict(compile_kwargs)

    # ------------------------------------------------------------------ forward

    def _validate(self, input_ids, position_ids, attention_mask, seq_idx, kv, ms) -> None:
        cfg = self.cfg
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an int64 or int32 tensor of token ids, got {got}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [batch, time], got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"empty input: input_ids has shape {tuple(input_ids.shape)}; "
                             "give at least one token per row")
        for name, t in (("position_ids", position_ids), ("attention_mask", attention_mask), ("seq_idx", seq_idx)):
            if t is not None and tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must have the shape of input_ids {(B, T)}, got {tuple(t.shape)}")
            if t is not None and t.is_floating_point():
                raise ValueError(f"{name} must be an integer or bool tensor, got {t.dtype}")
        for name, c in (("past_key_values", kv), ("past_mamba_states", ms)):
            if c is not None and c.batch_size != B:
                raise ValueError(f"{name} was allocated for batch size {c.batch_size} but input_ids has "
                                 f"{B} rows; allocate a cache per batch with model.allocate_inference_cache")
        if kv is not None and ms is not None and kv.seen_tokens != ms.seen_tokens:
            raise ValueError(f"past_key_values has seen {kv.seen_tokens} tokens but past_mamba_states "
                             f"{ms.seen_tokens}; pass the pair returned by the same forward")
        if seq_idx is not None and (kv is not None or ms is not None):
            raise ValueError("seq_idx (packed documents) is for training forwards; decode one document "
                             "per row with the cache instead")
        offset = (kv or ms).seen_tokens if (kv or ms) is not None else 0
        if kv is not None and offset + T > kv.max_length:
            raise ValueError(f"the KV cache was allocated for {kv.max_length} tokens and holds {offset}; "
                             f"{T} more do not fit. Allocate it with max_length >= prompt + new tokens")
        if position_ids is None and attention_mask is not None and offset > 0:
            raise ValueError("with an attention_mask and a non-empty cache, pass position_ids explicitly "
                             "(each row's positions continue from its own prompt length)")
        if position_ids is None and offset + T > cfg.max_seq_len:
            raise ValueError(f"positions up to {offset + T - 1} exceed the configured maximum "
                             f"{cfg.max_seq_len - 1} (model.max_seq_len={cfg.max_seq_len})")
        if self.check_inputs:
            # Deliberate host sync: token ids and positions are checked on the host.
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}) (model.vocab_size), "
                                 f"got ids in [{lo}, {hi}]; check the tokenizer matches the model")
            if position_ids is not None:
                pmin, pmax = int(position_ids.min()), int(position_ids.max())
                if pmin < 0 or pmax >= cfg.max_seq_len:
                    raise ValueError(f"position_ids must lie in [0, {cfg.max_seq_len}) "
                                     f"(model.max_seq_len), got [{pmin}, {pmax}]")
            if seq_idx is not None and T > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
                raise ValueError("seq_idx must be non-decreasing along each row (0, 0, 1, 1, 2, ...): a document "
                                 "index that comes back would join two separate documents in attention")
            if attention_mask is not None and T > 1:
                m = attention_mask.bool()
                if bool((m[:, :-1] & ~m[:, 1:]).any()):
                    raise ValueError("attention_mask must be left-padded (zeros, then ones): a padding "
                                     "token after a real one would shift the Mamba conv state")

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        past_key_values: KVCache | None = None,
        past_mamba_states: MambaStates | None = None,
        use_cache: bool = False,
        collect_gate_stats: bool = False,
        attention_mask: Tensor | None = None,
        seq_idx: Tensor | None = None,
    ) -> HybridOutput:
        """input_ids [B, T]; position_ids [B, T] absolute positions (default: continue from the
        cache, or restart per document of `seq_idx`, or follow a left-padded `attention_mask`);
        attention_mask [B, T] 1 = real token, 0 = left padding; seq_idx [B, T] document index
        of packed training rows. With use_cache=True and no caches, caches for `max_seq_len`
        tokens are allocated; prefer `allocate_inference_cache` with the length you need."""
        kv, ms = past_key_values, past_mamba_states
        self._validate(input_ids, position_ids, attention_mask, seq_idx, kv, ms)
        B, T = input_ids.shape
        if use_cache and kv is None and ms is None:
            kv, ms = self.allocate_inference_cache(B, self.cfg.max_seq_len)
        offset = (kv or ms).seen_tokens if (kv or ms) is not None else 0
        token_mask = None if attention_mask is None else attention_mask.bool()
        if position_ids is None:
            if token_mask is not None:
                position_ids = (token_mask.long().cumsum(1) - 1).clamp(min=0)
            elif seq_idx is not None:
                position_ids = positions_from_seq_idx(seq_idx)
            else:
                position_ids = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
        position_ids = position_ids.long()
        key_pos = position_ids if token_mask is None else position_ids.masked_fill(~token_mask, -1)
        info = SeqInfo(position_ids=position_ids, key_pos=key_pos, token_mask=token_mask,
                       seq_idx=seq_idx, cache_offset=offset, cached=kv is not None or ms is not None)

        x = self.embed(input_ids)
        if not info.cached and self.kernels.attention_masks is not None:
            # One set of attention masks for every layer of this forward. (Blocks replayed from
            # CUDA graphs rebuild theirs inside the graphs, from the graphs' static inputs.)
            windows = {layer.attn.window for layer in self.layers if layer.attn is not None}
            if windows:
                info.attn_masks = self.kernels.attention_masks(position_ids, key_pos, seq_idx, seq_idx, windows)
        gates = []
        for i, layer in enumerate(self.layers):
            x, g = layer(x, info, kv.layers[i] if kv is not None else None, ms.layers[i] if ms is not None else None)
            gates.append(g)
        stats = [None if g is None else gate_stats(g, token_mask) for g in gates] if collect_gate_stats else None
        logits = self.lm_head(self.norm_out(x))
        for c in (kv, ms):
            if c is not None:
                c.seen_tokens += T
        return HybridOutput(logits, kv, ms, gates, stats)

    @torch.no_grad()
    def decode_step(self, input_ids_B1: Tensor, position_ids_B1: Tensor, cache_step_1: Tensor,
                    past_key_values: KVCache, past_mamba_states: MambaStates, compiled: bool = False) -> Tensor:
        """One decode token per row with static shapes and no host syncs, so that it can be
        captured in a CUDA graph (`fusiontree.inference.cuda_graph`). Returns logits [B, V].

        cache_step_1: [1] int64 tensor, the tokens the caches hold (`seen_tokens`, on the
        device). Attention layers read every cache slot (a global layer all `max_length` of
        them), masked by position. Neither the tensors nor `seen_tokens` are advanced here:
        the caller does both. No input checks: the caller validates once, outside the graph.
        compiled: run the blocks compiled by `compile_decode` (compiled on first use)."""
        kv, ms = past_key_values, past_mamba_states
        info = SeqInfo(position_ids=position_ids_B1, key_pos=position_ids_B1, cache_step=cache_step_1, cached=True)
        if compiled and self._compiled_decode is None:
            self.compile_decode()
        if compiled:  # the compiled blocks take a packed buffer as it is: check it here
            for m in self.modules():
                if isinstance(m, PackedProjections):
                    m.check_packing()
        x = self.embed(input_ids_B1)
        for i, layer in enumerate(self.layers):
            if compiled:  # the class forward compiled, called with its block
                x, _ = self._compiled_decode[i](layer, x, info, kv.layers[i], ms.layers[i])
            else:
                x, _ = layer(x, info, kv.layers[i], ms.layers[i])
        return self.lm_head(self.norm_out(x))[:, -1]

    # ------------------------------------------------------------------ generation

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: KVCache | None = None,
                                      past_mamba_states: MambaStates | None = None,
                                      attention_mask: Tensor | None = None) -> dict:
        """Model inputs for the next generation step (`fusiontree.inference.generate` drives the
        loop). `input_ids` and `attention_mask` cover the whole sequence so far (prompt +
        generated). With caches that already hold the prefix, only the tokens they have not
        seen are fed, at each row's own next positions."""
        cache = past_key_values or past_mamba_states
        seen = cache.seen_tokens if cache is not None else 0
        B, T = input_ids.shape
        if attention_mask is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        new_mask = None if attention_mask is None else attention_mask[:, seen:]
        if new_mask is not None and seen > 0 and bool(new_mask.all()):  # host sync: decode fast path
            new_mask = None  # new tokens are all real: the Mamba step path applies
        return dict(input_ids=input_ids[:, seen:], position_ids=positions[:, seen:],
                    attention_mask=new_mask, past_key_values=past_key_values,
                    past_mamba_states=past_mamba_states, use_cache=cache is not None)

    # ------------------------------------------------------------------ accounting

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token at training length `seq_len` (x3 for forward + backward)."""
        return sum(layer.flops_per_token(seq_len) for layer in self.layers) + \
            2 * self.cfg.d_model * self.cfg.vocab_size
