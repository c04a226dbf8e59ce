"""SentencePiece BPE tokenizer: training with FusionTree's fixed special ids, and loading.

Every FusionTree tokenizer has byte fallback (any text encodes, nothing maps to unk) and the
same special ids, which the model, the loss and the packer rely on:

    pad = 0, unk = 1, bos = 2, eos = 3

Text is kept exactly as written (identity normalisation, no dummy prefix, whitespace runs
are pieces), so code round-trips: decode(encode(text)) == text.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
# Newline as a piece of its own: SentencePiece trains on lines, so without it every newline
# would cost a byte-fallback token.
USER_SYMBOLS = ["\n"]
# 4 special ids + 256 byte pieces + the user symbols must fit, plus room for characters.
MIN_VOCAB_SIZE = 4 + 256 + len(USER_SYMBOLS) + 64
# SentencePiece drops training lines longer than this many bytes.
MAX_SENTENCE_BYTES = 16384


def train_tokenizer(sentences: Iterable[str], vocab_size: int, num_threads: int, seed: int) -> bytes:
    """Train a BPE model on `sentences` (lines of text) and return the serialised model.

    Deterministic for the same sentences, vocab size and seed.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab size {vocab_size} is too small: byte fallback alone takes "
                         f"{4 + 256 + len(USER_SYMBOLS)} ids; use --vocab-size >= {MIN_VOCAB_SIZE}")
    if vocab_size > 2**31 - 1:
        raise ValueError(f"vocab size {vocab_size} does not fit int32 token ids")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID,
            eos_id=EOS_ID, num_threads=max(1, num_threads), character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=USER_SYMBOLS,
            max_sentence_length=MAX_SENTENCE_BYTES, input_sentence_size=0, shuffle_input_sentence=False,
            minloglevel=2)
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size" in msg:
            raise ValueError(f"SentencePiece cannot make {vocab_size} pieces from this corpus ({msg.strip()}); "
                             "lower --vocab-size or give it more text") from e
        raise
    return model.getvalue()


def load_sentencepiece(path: str | Path) -> spm.SentencePieceProcessor:
    """Load a `.model` file and check that it uses FusionTree's special ids and byte fallback."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer {str(path)!r} does not exist; build shards first "
                         "(python data_pipeline/build_shards.py) or point data.tokenizer at a .model file")
    return sentencepiece_from_bytes(path.read_bytes(), str(path))


def sentencepiece_from_bytes(model: bytes, name: str = "<bytes>") -> spm.SentencePieceProcessor:
    try:
        sp = spm.SentencePieceProcessor(model_proto=model)
    except RuntimeError as e:
        raise ValueError(f"tokenizer {name} is not a SentencePiece model: {e}") from e
    got = {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
    if got != SPECIAL_IDS:
        raise ValueError(f"tokenizer {name} has special ids {got}, FusionTree needs {SPECIAL_IDS}; "
                         "train a new one (build_shards.py without --tokenizer)")
    if sp.piece_to_id("<0x00>") == sp.unk_id():
        raise ValueError(f"tokenizer {name} has no byte fallback, so unseen characters would become unk; "
                         "train a new one (build_shards.py without --tokenizer)")
    return sp


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
