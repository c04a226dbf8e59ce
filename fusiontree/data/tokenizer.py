"""Tokenizers: SentencePiece BPE trained here, or one the user brings.

Two kinds, one interface (`Tokenizer`: encode, encode_batch, decode, vocab_size and the
special ids):

- "sentencepiece": a `.model` file. The builder trains one when no --tokenizer is given:
  BPE with byte fallback (any text encodes, nothing maps to unk) and the special ids
  pad = 0, unk = 1, bos = 2, eos = 3. Text is kept exactly as written (identity
  normalisation, no dummy prefix, whitespace runs are pieces), so code round-trips:
  decode(encode(text)) == text. An existing `.model` (a Llama-style vocabulary) keeps its
  own ids.
- "huggingface": a `tokenizer.json` read with the `tokenizers` library (GPT- or Llama-style
  vocabularies). Its file does not say which token ends a document, so the special ids
  come from `tokenizer_config.json` or `special_tokens_map.json` beside it (Hugging Face
  writes them there), else from well-known token names (`</s>`, `<|endoftext|>`, ...).

Every tokenizer needs an end-of-document id (eos): the builder ends each document with it.
The build copies the tokenizer file into its output and records its kind, file, sha256,
vocabulary size and special ids in the manifest; training and evaluation read it back from
there (`tokenizer_from_build`), so a build's ids never depend on files outside it. Text is
encoded without the tokenizer's own added special tokens (no bos from a post-processor):
documents are their text plus eos, for both kinds.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterable

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}  # of the tokenizers trained here
SPECIAL_NAMES = ("pad", "unk", "bos", "eos")
KINDS = {"sentencepiece": "tokenizer.model", "huggingface": "tokenizer.json"}  # kind -> file name in a build
# Newline as a piece of its own: SentencePiece trains on lines, so without it every newline
# would cost a byte-fallback token.
USER_SYMBOLS = ["\n"]
# 4 special ids + 256 byte pieces + the user symbols must fit, plus room for characters.
MIN_VOCAB_SIZE = 4 + 256 + len(USER_SYMBOLS) + 64
# SentencePiece drops training lines longer than this many bytes.
MAX_SENTENCE_BYTES = 16384
# Token names that mean the same special token across the common Hugging Face vocabularies,
# used when no tokenizer_config.json / special_tokens_map.json lies beside the tokenizer.json.
_WELL_KNOWN = {
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "[BOS]"),
    "pad": ("<pad>", "<|pad|>", "[PAD]"),
    "unk": ("<unk>", "<|unk|>", "[UNK]"),
}


class Tokenizer:
    """A loaded tokenizer of either kind. `data` are the bytes of its file (what a build
    copies and hashes); `special_ids` maps pad/unk/bos/eos to an id or None."""

    def __init__(self, kind: str, data: bytes, name: str, impl, special_ids: dict[str, int | None]):
        self.kind, self.data, self.name, self._impl = kind, data, name, impl
        self.special_ids = {k: special_ids.get(k) for k in SPECIAL_NAMES}
        self.sha256 = sha256_bytes(data)
        n = self.vocab_size()
        for k, i in self.special_ids.items():
            if i is not None and not 0 <= i < n:
                raise ValueError(f"tokenizer {name}: special id {k}={i} lies outside its vocabulary of {n}")
        if self.special_ids["eos"] is None:
            raise ValueError(f"tokenizer {name} has no end-of-document (eos) token, which ends every document in "
                             "the shards; " + ("give it one (write tokenizer_config.json beside it with "
                                              '{"eos_token": "<the token>"})' if kind == "huggingface" else
                                              "train one with an eos id (build_shards.py without --tokenizer)"))

    @property
    def file_name(self) -> str:
        return KINDS[self.kind]

    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self._impl.vocab_size()
        return self._impl.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return self._impl.encode(text)
        return self._impl.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, on this thread only (the builder runs one per process)."""
        if self.kind == "sentencepiece":
            return self._impl.encode(texts, num_threads=1)
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which nothing here reads
        encode = getattr(self._impl, "encode_batch_fast", self._impl.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._impl.decode(ids)
        return self._impl.decode(ids, skip_special_tokens=False)

    def id_to_token(self, i: int) -> str:
        """The vocabulary entry of id `i` as the tokenizer writes it (e.g. `</s>`)."""
        if self.kind == "sentencepiece":
            return self._impl.id_to_piece(int(i))
        return self._impl.id_to_token(int(i))

    def eos_id(self) -> int:
        return self.special_ids["eos"]

    def bos_id(self) -> int:
        """bos, or eos where the vocabulary has none (GPT-style: one token separates documents)."""
        bos = self.special_ids["bos"]
        return self.eos_id() if bos is None else bos

    def pad_id(self) -> int:
        return -1 if self.special_ids["pad"] is None else self.special_ids["pad"]

    def unk_id(self) -> int:
        return -1 if self.special_ids["unk"] is None else self.special_ids["unk"]

    def manifest_entry(self) -> dict:
        return {"kind": self.kind, "path": self.file_name, "sha256": self.sha256, "vocab_size": self.vocab_size(),
                "special_ids": dict(self.special_ids)}

    def spec(self) -> tuple:
        """What a worker process needs to rebuild this tokenizer (picklable)."""
        return self.kind, self.data, self.name, self.special_ids


def tokenizer_from_spec(spec: tuple) -> Tokenizer:
    kind, data, name, special_ids = spec
    return tokenizer_from_bytes(kind, data, name, special_ids)


# ------------------------------------------------------------------------------ training

def train_tokenizer(sentences: Iterable[str], vocab_size: int, num_threads: int, seed: int) -> bytes:
    """Train a SentencePiece BPE model on `sentences` (lines of text) and return the
    serialised model. Deterministic for the same sentences, vocab size and seed."""
    import sentencepiece as spm

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


def train_bytelevel_bpe(texts: Iterable[str], vocab_size: int) -> bytes:
    """A GPT-style byte-level BPE `tokenizer.json` (special tokens <|endoftext|> = 0 and
    <|pad|> = 1), trained with the `tokenizers` library: what a user who brings a Hugging
    Face tokenizer has. The tests and benchmarks/data_pipeline.py make theirs with it."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok.to_str().encode()


# ------------------------------------------------------------------------------ loading

def tokenizer_from_bytes(kind: str, data: bytes, name: str = "<bytes>",
                         special_ids: dict[str, int | None] | None = None) -> Tokenizer:
    """A tokenizer of `kind` from its file's bytes. `special_ids`: the ids a manifest
    recorded; None reads them from the tokenizer (and, for a tokenizer.json, the
    configuration files beside `name`)."""
    if kind == "sentencepiece":
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError as e:
            raise ValueError(f"tokenizer {name} is not a SentencePiece model: {e}") from e
        own = {k: (i if i >= 0 else None) for k, i in
               zip(SPECIAL_NAMES, (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()))}
        if special_ids is not None and special_ids != own:
            raise ValueError(f"tokenizer {name} has special ids {own}, its manifest says {special_ids}; rebuild "
                             "the shards")
        return Tokenizer(kind, data, name, sp, own)
    if kind != "huggingface":
        raise ValueError(f"unknown tokenizer kind {kind!r}; use one of {sorted(KINDS)}")
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError as e:
        raise ValueError("reading a tokenizer.json needs the `tokenizers` package; install the project's train "
                         "extra (pip install -e '.[train]')") from e
    try:
        tok = HFTokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a plain Exception for malformed files
        raise ValueError(f"tokenizer {name} is not a Hugging Face tokenizer.json: {e}") from e
    if special_ids is None:
        special_ids = _hf_special_ids(tok, Path(name))
    return Tokenizer(kind, data, name, tok, special_ids)


def _token_name(value) -> str | None:
    if isinstance(value, dict):  # {"content": "</s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_special_ids(tok, path: Path) -> dict[str, int | None]:
    """Special ids of a tokenizer.json: from the Hugging Face configuration files beside it,
    else from well-known names of its added special tokens."""
    named: dict[str, str] = {}
    for cfg_name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg_path = path.parent / cfg_name
        if not cfg_path.is_file():
            continue
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path} (beside the tokenizer) is not valid JSON: {e}") from e
        for k in SPECIAL_NAMES:
            token = _token_name(cfg.get(f"{k}_token"))
            if token is not None and k not in named:
                named[k] = token
    out: dict[str, int | None] = {}
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for k in SPECIAL_NAMES:
        if k in named:
            i = tok.token_to_id(named[k])
            if i is None:
                raise ValueError(f"the configuration beside tokenizer {path} names {k}_token {named[k]!r}, which is "
                                 "not in its vocabulary; fix that file")
            out[k] = i
            continue
        out[k] = next((tok.token_to_id(t) for t in _WELL_KNOWN[k] if t in special), None)
    return out


def tokenizer_kind(path: Path) -> str:
    return "huggingface" if path.suffix == ".json" else "sentencepiece"


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """A `.model` (SentencePiece) or `.json` (Hugging Face tokenizer.json) file. The
    tokenizer of a build (the file its manifest names) comes with the build's special ids."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer {str(path)!r} does not exist; build shards first "
                         "(python data_pipeline/build_shards.py) or point data.tokenizer at a .model or "
                         "tokenizer.json file")
    manifest = path.parent / "manifest.json"
    if manifest.is_file():
        try:
            entry = json.loads(manifest.read_text()).get("tokenizer", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            entry = {}
        if entry.get("path") == path.name:
            return tokenizer_from_build(path.parent)
    return tokenizer_from_bytes(tokenizer_kind(path), path.read_bytes(), str(path))


def sentencepiece_tokenizer(data: bytes, name: str = "<bytes>") -> Tokenizer:
    return tokenizer_from_bytes("sentencepiece", data, name)


def load_sentencepiece(path: str | Path) -> Tokenizer:
    """A SentencePiece `.model` file (the tokenizers this project trains)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer {str(path)!r} does not exist; build shards first "
                         "(python data_pipeline/build_shards.py) or point data.tokenizer at a .model file")
    return tokenizer_from_bytes("sentencepiece", path.read_bytes(), str(path))


def tokenizer_from_build(shards_dir: str | Path, override: str | Path = "") -> Tokenizer:
    """The tokenizer a build's manifest records (kind, file, special ids), checked against
    its sha256. `override`: another copy of the same file (it must hash the same)."""
    from fusiontree.data.shards import read_manifest

    entry = read_manifest(shards_dir)["tokenizer"]
    kind = entry.get("kind", "sentencepiece")  # builds made before tokenizer.json support
    path = Path(override) if override else Path(shards_dir) / entry["path"]
    if not path.is_file():
        raise ValueError(f"tokenizer {str(path)!r} does not exist; the manifest of {shards_dir} names "
                         f"{entry['path']}: restore it or rebuild the shards")
    data = path.read_bytes()
    got = sha256_bytes(data)
    if got != entry["sha256"]:
        raise ValueError(f"tokenizer {path} (sha256 {got[:12]}) is not the one the shards in {shards_dir} were "
                         f"built with (sha256 {entry['sha256'][:12]}); set data.tokenizer='' to use theirs")
    special = entry.get("special_ids")
    return tokenizer_from_bytes(kind, data, str(path), None if kind == "sentencepiece" else special)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
