"""Autoregressive generation with the KV + Mamba caches (or by recomputation, for reference).

Legend: B batch, T prompt length, V vocabulary.

Prompts of different lengths come left-padded with an `attention_mask` (1 = real token;
`left_pad` makes the batch). Every row continues at its own positions, so a row's tokens do
not depend on the other rows. `complete` returns each row's continuation, for evaluation
tasks that stop at a token or a string.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fusiontree.config import check_sampling


def sample_next(logits_BV: Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Greedy when temperature == 0; otherwise temperature, then top-k, then top-p (nucleus)."""
    check_sampling(temperature, top_k, top_p)
    logits = logits_BV.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# Graphed compiled decoding compiles the step's blocks for each cache length (static shapes):
# caches are rounded up to a multiple of this many slots, so that prompts of similar lengths
# share one compiled step. The slots past the fill are masked (filled_blocks never reads them).
GRAPH_CACHE_BUCKET = 1024


def graph_cache_length(needed: int, max_seq_len: int) -> int:
    """`needed` slots rounded up to a multiple of GRAPH_CACHE_BUCKET, but not past max_seq_len
    (nor below `needed`)."""
    bucketed = -(-needed // GRAPH_CACHE_BUCKET) * GRAPH_CACHE_BUCKET
    return max(needed, min(bucketed, max_seq_len))


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: int, use_cache: bool = True,
             attention_mask: Tensor | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_token_id: int | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, cuda_graph: bool = False,
             compile_decode: bool = True, stop: Callable[[list[int]], bool] | None = None,
             stop_every: int = 8, on_token: Callable[[Tensor], None] | None = None) -> Tensor:
    """Returns [B, T + n] token ids, n <= max_new_tokens (fewer when every row finished).
    A row finishes when it emits EOS, or when `stop(its new tokens)` is true (checked every
    `stop_every` tokens: a host sync); a finished row continues with `pad_token_id` (default:
    the EOS id).
    on_token: called with each step's tokens [B] (finished rows: the pad id) as soon as they
    are sampled, before the next step runs (streaming; reading them is a host sync).
    cuda_graph: after the prefill, replay each decode step from one captured CUDA graph
    (`fusiontree.inference.cuda_graph.GraphedDecoder`; needs use_cache and a CUDA model).
    compile_decode: with cuda_graph, compile the blocks of the step before capturing it (the
    graph then replays fewer, fused kernels, tuned by Inductor's coordinate descent and launched
    as combo kernels: `GraphedDecoder.TUNED`; `1b` at 32K on an H200: 1.78 ms per token, against
    2.39 with Inductor's default options in an earlier run, BENCHMARKS.md). False saves the
    compile time of the first call."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if cuda_graph and not use_cache:
        raise ValueError("cuda_graph=True replays cached decode steps; it needs use_cache=True")
    pad = eos_token_id if pad_token_id is None else pad_token_id
    if stop is not None and (pad is None or stop_every < 1):
        raise ValueError("stop needs eos_token_id or pad_token_id (the token a stopped row continues with) "
                         f"and stop_every >= 1, got stop_every={stop_every}")
    B, T = input_ids.shape
    kv = ms = None
    if use_cache:
        needed = T + max_new_tokens
        kv, ms = model.allocate_inference_cache(
            B, graph_cache_length(needed, model.cfg.max_seq_len) if cuda_graph and compile_decode else needed)
    mask = attention_mask
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    tokens = input_ids
    decoder = None
    for i in range(max_new_tokens):
        if decoder is None:
            inputs = model.prepare_inputs_for_generation(tokens, kv, ms, mask)
            logits = model(**inputs).logits[:, -1]
        else:
            logits = decoder.step(tokens[:, -1])
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if pad is not None:
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        if eos_token_id is not None:
            finished |= nxt == eos_token_id
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if on_token is not None:
            on_token(nxt)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if stop is not None and i % stop_every == stop_every - 1:
            finished |= _stopped(tokens[:, T:], finished, stop)
        if (eos_token_id is not None or stop is not None) and bool(finished.all()):  # host sync: every row ended
            break
        if cuda_graph and decoder is None and i + 1 < max_new_tokens:
            from fusiontree.inference.cuda_graph import GraphedDecoder

            # the position of the token just sampled: the count of real tokens before it
            next_pos = (mask.long().sum(1) - 1 if mask is not None
                        else torch.full((B,), tokens.shape[1] - 1, device=tokens.device))
            decoder = GraphedDecoder(model, kv, ms, next_pos, compile=compile_decode)
    return tokens


def _stopped(new_BN: Tensor, finished_B: Tensor, stop: Callable[[list[int]], bool]) -> Tensor:
    """Rows not yet finished whose new tokens `stop` ends (host sync: `stop` reads tokens)."""
    done = finished_B.tolist()
    return torch.tensor([not d and stop(row) for d, row in zip(done, new_BN.tolist())], device=finished_B.device)


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths as one left-padded batch: (input_ids [B, T], attention_mask [B, T])."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("give at least one prompt, each with at least one token")
    B, T = len(prompts), max(len(p) for p in prompts)
    ids_BT = torch.full((B, T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids_BT[b, T - len(p):] = torch.tensor(p)
        mask_BT[b, T - len(p):] = 1
    return ids_BT, mask_BT


@torch.no_grad()
def complete(model, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None = None,
             stop: Callable[[list[int]], bool] | None = None, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each prompt (one left-padded batch) with `generate`; returns each row's new
    tokens, up to its EOS (excluded) or the check at which `stop` ended it."""
    device = next(model.parameters()).device
    ids_BT, mask_BT = left_pad(prompts)
    out = generate(model, ids_BT.to(device), max_new_tokens, attention_mask=mask_BT.to(device),
                   temperature=temperature, top_p=top_p, eos_token_id=eos_token_id, generator=generator, stop=stop)
    rows = out[:, ids_BT.shape[1]:].tolist()  # host sync: the tokens go back to the caller
    return [row[:row.index(eos_token_id)] if eos_token_id is not None and eos_token_id in row else row
            for row in rows]
