"""Passkey documents, trials and teacher-forced scoring."""

import json
import random
from types import SimpleNamespace

import pytest
import torch

from fusiontree.eval.passkey import (filler_for_length, make_trial, passkey_grid, passkey_parts, random_key,
                                     score_trials, write_training_jsonl)
from tests.eval.conftest import tiny_model_config


class Oracle(torch.nn.Module):
    """Predicts each row's true next token (it peeks at the input), except that it gets the
    answer's `wrong_digit`-th token wrong when asked to: a model whose retrieval we know."""

    def __init__(self, vocab: int, wrong_at: dict[int, int] | None = None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.cfg = tiny_model_config()
        self.vocab, self.wrong_at = vocab, wrong_at or {}

    def forward(self, ids_BT):
        logits = torch.zeros(*ids_BT.shape, self.vocab)
        nxt = torch.roll(ids_BT, -1, dims=1)
        logits.scatter_(2, nxt[..., None], 1.0)
        for row, pos in ((r, p) for r, p in self.wrong_at.items() if r < ids_BT.shape[0]):
            logits[row, pos] = 0
            logits[row, pos, (int(ids_BT[row, pos + 1]) + 1) % self.vocab] = 2.0
        return SimpleNamespace(logits=logits)


def test_trial_tokens_and_distance(sp):
    t = make_trial(sp, "40213", 6, 0.5)
    assert sp.decode(t.tokens[t.answer_start:t.answer_start + t.answer_len]) == "40213"
    assert sp.decode(t.tokens[t.key_end - 5:t.key_end]) == "40213"
    assert sp.decode(t.tokens[:t.answer_start]).endswith("What is the pass key? The pass key is ")
    deep, shallow = make_trial(sp, "11111", 10, 0.0), make_trial(sp, "11111", 10, 1.0)
    assert deep.distance > shallow.distance > 0
    assert len(deep.tokens) == len(shallow.tokens)


def test_filler_for_length_fits_and_is_maximal(sp):
    for L in (80, 100, 140):
        n = filler_for_length(sp, L, 5)
        assert len(make_trial(sp, "12345", n, 0.5).tokens) <= L < len(make_trial(sp, "12345", n + 1, 0.5).tokens)
    with pytest.raises(ValueError, match="shorter than a passkey document"):
        filler_for_length(sp, 20, 5)


def test_score_trials_counts_a_trial_only_when_every_digit_is_right(sp):
    rng = random.Random(0)
    trials = [make_trial(sp, random_key(rng, 5), n, 0.3) for n in (2, 5, 9)]  # different lengths: padding
    assert score_trials(Oracle(sp.vocab_size()), trials, batch_size=2) == [True, True, True]
    last_digit = trials[1].answer_start + trials[1].answer_len - 2  # predicts the last answer digit
    # rows are batched two at a time: trial 1 is row 1 of the first batch
    assert score_trials(Oracle(sp.vocab_size(), {1: last_digit}), trials, batch_size=2) == [True, False, True]


def test_passkey_grid_shape_and_beyond_window(sp):
    torch.manual_seed(0)
    res = passkey_grid(Oracle(sp.vocab_size()), sp, [96, 128], [0.0, 1.0], trials=3, window=16)
    assert res["accuracy"] == [[1.0, 1.0], [1.0, 1.0]]
    assert res["beyond_window"]["128"]["trials"] >= 3  # depth 0 puts the key far back
    assert all(c["tokens"] <= c["context"] for c in res["cells"])


def test_training_jsonl_is_padded_to_exact_token_counts(tmp_path, sp):
    path = write_training_jsonl(tmp_path / "pk.jsonl", 20, seed=1, max_filler=8, sp=sp, pad_to_tokens=127)
    docs = [json.loads(x)["text"] for x in path.read_text().splitlines()]
    assert len(docs) == 20
    assert all(len(sp.encode(d)) == 127 for d in docs)
    assert all("What is the pass key? The pass key is" in d for d in docs)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        write_training_jsonl(tmp_path / "x.jsonl", 2, pad_to_tokens=127)


def test_passkey_parts_rejects_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        passkey_parts("123", 3, 1.5)
    prompt, answer = passkey_parts("123", 0, 0.0)
    assert answer == " 123." and prompt.endswith("The pass key is")


def test_padding_shorter_than_any_document_is_an_error(tmp_path, sp):
    with pytest.raises(ValueError, match="shorter than a passkey document with min_filler=3"):
        write_training_jsonl(tmp_path / "pk.jsonl", 2, min_filler=3, max_filler=5, sp=sp, pad_to_tokens=40)
