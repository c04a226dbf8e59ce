"""Passkey retrieval: synthetic documents for training, prompts and scoring for evaluation.

Legend: B batch (trials), T tokens.

A passkey document hides a random number in repetitive filler and asks for it at the end
(after Mohtashami & Jaggi, 2023):

    The grass is green. The sky is blue. ... The pass key is 48213. 48213. 48213. Remember
    it. 48213 is the pass key. The sun is yellow. ... What is the pass key? The pass key is 48213.

`depth` places the key among the filler sentences (0: first, 1: right before the question).
The tokenizer splits digits into single pieces, so the answer is `digits` tokens. The key is
written four times: the repeats are copies a few tokens apart, which a small model learns to
make first; the same copying, stretched over the filler, answers the question. (With the key
written twice, 1.5M-parameter models trained on CPU for 500 steps learned no copying at all;
with four copies they retrieve after 300-400 steps; three copies learned more slowly.) There
is no introduction sentence, so the text around the key stays short (about 57 tokens with a
1K vocabulary) and a 64-token context still holds some filler.

Scoring is teacher-forced: a trial counts as retrieved when the model's argmax at every
answer token is that token. This is exactly "greedy decoding reproduces the key" (each
greedy step sees the same prefix as the teacher-forced forward), at the cost of one
forward instead of a prefill plus `digits` decode steps.

`write_training_jsonl` writes documents of random length and depth for the shard builder
(`data_pipeline/build_shards.py --input ... passkey.jsonl`), so that a small model can learn
the task; `passkey_grid` evaluates a grid of context lengths x depths, and the `needle` task
(`needle_in_haystack`) runs it for a model with the options of `NeedleOptions` and draws the
heatmap.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("fusiontree.eval")

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
KEY_SENTENCE = "The pass key is {key}. {key}. {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def passkey_parts(key: str, n_filler: int, depth: float) -> tuple[str, str]:
    """(prompt, answer) of one document: the prompt ends with the question, the answer is
    " KEY." (its digits are what is scored)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1] (0: key first, 1: key last)")
    if n_filler < 0:
        raise ValueError(f"n_filler={n_filler} must be >= 0")
    filler = [FILLER[i % len(FILLER)] for i in range(n_filler)]
    at = round(depth * n_filler)
    sentences = [*filler[:at], KEY_SENTENCE.format(key=key), *filler[at:], QUESTION]
    return " ".join(sentences), f" {key}."


def random_key(rng: random.Random, digits: int) -> str:
    # A leading zero is allowed: the key is a string of digits, not a number.
    return "".join(rng.choice("0123456789") for _ in range(digits))


def write_training_jsonl(path: str | Path, n_docs: int, seed: int = 0, digits: int = 5, min_filler: int = 0,
                         max_filler: int = 40, sp=None, pad_to_tokens: int = 0) -> Path:
    """`n_docs` passkey documents, one JSON object per line ({"text": ...}), with a number of
    filler sentences uniform in [min_filler, max_filler] and a uniform depth.

    With a tokenizer `sp` and `pad_to_tokens` > 0, every document is padded with newlines
    (one token each) to exactly `pad_to_tokens` tokens; documents longer than that are drawn
    again. Give `pad_to_tokens` = bucket length - 1 (the shard builder appends eos): each
    document then fills a training sample on its own, so the packer never cuts one in two
    (a cut would separate the key from its question and teach the model to guess)."""
    if n_docs < 1 or digits < 1 or not 0 <= min_filler <= max_filler:
        raise ValueError(f"need n_docs >= 1, digits >= 1 and 0 <= min_filler <= max_filler; got "
                         f"n_docs={n_docs}, digits={digits}, min_filler={min_filler}, max_filler={max_filler}")
    if pad_to_tokens and sp is None:
        raise ValueError("pad_to_tokens needs the tokenizer (sp) the shards will be built with")
    newline = sp.encode("\n") if sp is not None else None
    if newline is not None and len(newline) != 1:
        raise ValueError("the tokenizer does not encode a newline as one token; use a FusionTree tokenizer")
    if pad_to_tokens:
        shortest = len(sp.encode("".join(passkey_parts("0" * digits, min_filler, 0.0))))
        if shortest > pad_to_tokens:
            raise ValueError(f"pad_to_tokens={pad_to_tokens} is shorter than a passkey document with "
                             f"min_filler={min_filler} ({shortest} tokens); use a longer bucket or less filler")
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        written = 0
        while written < n_docs:
            prompt, answer = passkey_parts(random_key(rng, digits), rng.randint(min_filler, max_filler),
                                           rng.random())
            text = prompt + answer
            if pad_to_tokens:
                n = len(sp.encode(text))
                if n > pad_to_tokens:
                    continue
                text += "\n" * (pad_to_tokens - n)
                assert len(sp.encode(text)) == pad_to_tokens
            else:
                text += "\n"
            f.write(json.dumps({"text": text}) + "\n")
            written += 1
    return path


# ------------------------------------------------------------------------------ evaluation

@dataclass
class NeedleOptions:
    contexts: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 10
    digits: int = 5
    # Trials whose key lies more than this many tokens back are also scored on their own
    # ("beyond the window"); 0: the model's window when it has local attention layers.
    window: int = 0

    def validate(self) -> None:
        if any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"needle.depths={self.depths} must lie in [0, 1]")


@dataclass
class PasskeyTrial:
    tokens: list[int]  # prompt + answer
    answer_start: int  # index of the first answer (key digit) token
    answer_len: int
    key_end: int  # index just past the digits of the key's last copy in the hidden sentence
    key: str

    @property
    def distance(self) -> int:
        """Tokens from the hidden key's last digit (its last copy) to the first answer token."""
        return self.answer_start - (self.key_end - 1)


def _token_span(sp, ids: list[int], char_start: int, char_end: int) -> tuple[int, int]:
    """Token range [a, b) covering the characters [char_start, char_end) of the decoded ids
    (the passkey text is ASCII, so every token decodes to its own characters)."""
    ends, pos = [], 0
    for tok in ids:
        pos += len(sp.decode([tok]))
        ends.append(pos)
    a = next(i for i, e in enumerate(ends) if e > char_start)
    b = next(i for i, e in enumerate(ends) if e >= char_end) + 1
    return a, b


def make_trial(sp, key: str, n_filler: int, depth: float) -> PasskeyTrial:
    prompt, answer = passkey_parts(key, n_filler, depth)
    text = prompt + answer
    ids = sp.encode(text)
    if sp.decode(ids) != text:
        raise ValueError("the tokenizer does not round-trip the passkey text; use a FusionTree tokenizer "
                         "(identity normalisation, byte fallback)")
    ans_char = len(prompt) + 1  # after the space
    a0, a1 = _token_span(sp, ids, ans_char, ans_char + len(key))
    sentence = KEY_SENTENCE.format(key=key)
    last_copy_end = text.index(sentence) + sentence.rindex(key) + len(key)  # the copy nearest the question
    _, k1 = _token_span(sp, ids, last_copy_end - len(key), last_copy_end)
    if a1 - a0 != len(key) or any(not sp.decode([t]).strip().isdigit() for t in ids[a0:a1]):
        raise ValueError("the tokenizer does not split digits into single pieces; passkey scoring needs "
                         "a FusionTree tokenizer (trained with split_digits)")
    return PasskeyTrial(ids, a0, a1 - a0, k1, key)


def filler_for_length(sp, context_tokens: int, digits: int) -> int:
    """The number of filler sentences whose document (prompt + answer) is as long as possible
    without exceeding `context_tokens` tokens."""
    def length(n: int) -> int:
        prompt, answer = passkey_parts("0" * digits, n, 0.5)
        return len(sp.encode(prompt + answer))

    if length(0) > context_tokens:
        raise ValueError(f"context length {context_tokens} is shorter than a passkey document without "
                         f"filler ({length(0)} tokens); use longer contexts")
    lo, hi = 0, 1
    while length(hi) <= context_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # length grows with n: bisect for the last n that fits
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if length(mid) <= context_tokens else (lo, mid)
    return lo


@torch.no_grad()
def score_trials(model, trials: list[PasskeyTrial], batch_size: int = 16, pad_id: int = 0) -> list[bool]:
    """Teacher-forced exact match of each trial's answer digits (see the module docstring).
    Rows are right-padded: the causal model's logits at real positions ignore what follows."""
    device = next(model.parameters()).device
    out: list[bool] = []
    for i in range(0, len(trials), batch_size):
        chunk = trials[i:i + batch_size]
        T = max(len(t.tokens) for t in chunk)
        ids_BT = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        for b, t in enumerate(chunk):
            ids_BT[b, :len(t.tokens)] = torch.tensor(t.tokens)
        logits_BTV = model(ids_BT.to(device)).logits
        for b, t in enumerate(chunk):
            s, n = t.answer_start, t.answer_len
            pred = logits_BTV[b, s - 1:s - 1 + n].argmax(-1).cpu()
            out.append(bool(torch.equal(pred, ids_BT[b, s:s + n])))
    return out


def passkey_grid(model, sp, contexts: list[int], depths: list[float], trials: int = 10, digits: int = 5,
                 seed: int = 0, batch_size: int = 16, window: int | None = None) -> dict:
    """Accuracy per (context length, depth) cell, `trials` random keys each.

    Returns {"contexts", "depths", "accuracy": [[...per depth] per context], "cells": [...]}
    and, when `window` is given, per context the accuracy over trials whose key lies more
    than `window` tokens before the answer ("beyond_window")."""
    for L in contexts:
        if L > model.cfg.max_seq_len:
            raise ValueError(f"passkey context {L} exceeds the model's max_seq_len={model.cfg.max_seq_len}")
    if trials < 1:
        raise ValueError(f"trials={trials} must be >= 1")
    rng = random.Random(seed)
    acc, cells, beyond = [], [], {}
    for L in contexts:
        n_filler = filler_for_length(sp, L, digits)
        row, far = [], []
        for d in depths:
            ts = [make_trial(sp, random_key(rng, digits), n_filler, d) for _ in range(trials)]
            ok = score_trials(model, ts, batch_size)
            row.append(sum(ok) / len(ok))
            cells.append({"context": L, "depth": d, "tokens": len(ts[0].tokens), "accuracy": row[-1],
                          "mean_distance": sum(t.distance for t in ts) / len(ts)})
            if window is not None:
                far.extend(o for o, t in zip(ok, ts) if t.distance > window)
        acc.append(row)
        if window is not None:
            beyond[str(L)] = {"accuracy": sum(far) / len(far) if far else None, "trials": len(far)}
    out = {"contexts": contexts, "depths": depths, "trials_per_cell": trials, "digits": digits,
           "accuracy": acc, "cells": cells, "mean_accuracy": sum(map(sum, acc)) / (len(contexts) * len(depths))}
    if window is not None:
        out["window"] = window
        out["beyond_window"] = beyond
    return out


def needle_in_haystack(model, sp, contexts: list[int], depths: list[float], trials: int, digits: int,
                       heatmap_path: str | Path | None = None, batch_size: int = 16, seed: int = 0,
                       title: str = "", window: int = 0) -> dict:
    cfg = model.cfg
    usable = [L for L in contexts if L <= cfg.max_seq_len]
    if not usable:
        raise ValueError(f"every needle context {contexts} exceeds the model's max_seq_len={cfg.max_seq_len}")
    if len(usable) < len(contexts):
        log.warning("needle: contexts %s exceed max_seq_len=%d and are skipped",
                    [L for L in contexts if L not in usable], cfg.max_seq_len)
    window = window or cfg.local_window
    res = passkey_grid(model, sp, usable, depths, trials, digits, seed=seed, batch_size=batch_size, window=window)
    if heatmap_path is not None:
        plot_heatmap(res, heatmap_path, title)
        res["heatmap"] = str(heatmap_path)
    return res


def plot_heatmap(res: dict, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = torch.tensor(res["accuracy"]).T.numpy()  # [depth, context]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(res["contexts"]), 1.2 + 0.6 * len(res["depths"])))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(res["contexts"])), [str(c) for c in res["contexts"]])
    ax.set_yticks(range(len(res["depths"])), [f"{d:.0%}" for d in res["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="passkey accuracy")
    ax.set_title(title or f"passkey retrieval ({res['trials_per_cell']} trials per cell)", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
