"""A FusionTree SentencePiece model as a transformers (`tokenizers`) tokenizer with the same ids.

FusionTree's tokenizers (fusiontree/data/tokenizer.py) are SentencePiece BPE models with identity
normalisation, no dummy prefix, byte fallback, "\\n" as a user-defined symbol and the special ids
pad 0, unk 1, bos 2, eos 3. SentencePiece encodes a BPE model like this: spaces become "▁", the
text starts as single characters (a user-defined symbol is one unit), then the adjacent pair
whose concatenation is the best-scored piece is merged, repeatedly; characters that are not
pieces come out as their UTF-8 bytes (<0xNN>).

The same algorithm in `tokenizers`: a BPE model over the pieces, whose merge list holds every
split (left, right) of every piece into two pieces, ranked by the piece's score; a normaliser
that replaces " " by "▁" and nothing else; no pre-tokenizer (SentencePiece does not split the
text into words when it encodes); "\\n" as an added token; byte fallback. Special-token text
in the input ("<s>") is encoded as plain text, as SentencePiece does (`split_special_tokens`).
"""

from __future__ import annotations

from pathlib import Path

from sentencepiece import sentencepiece_model_pb2

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPECIAL_TOKENS = {"pad_token": 0, "unk_token": 1, "bos_token": 2, "eos_token": 3}


def _model_proto(sp_model: bytes):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_model)
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError("only SentencePiece BPE models (FusionTree's tokenizers) can be converted; "
                         f"this one is of model type {proto.trainer_spec.model_type}")
    norm = proto.normalizer_spec
    if norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        raise ValueError("the SentencePiece model must use identity normalisation without a dummy prefix or "
                         "whitespace removal (as fusiontree/data/tokenizer.py trains it); got normaliser "
                         f"{norm.name!r}, add_dummy_prefix={norm.add_dummy_prefix}, "
                         f"remove_extra_whitespaces={norm.remove_extra_whitespaces}")
    if not proto.trainer_spec.byte_fallback:
        raise ValueError("the SentencePiece model has no byte fallback; FusionTree tokenizers always have it")
    return proto


def build_tokenizers_json(sp_model: bytes):
    """A `tokenizers.Tokenizer` that gives SentencePiece's ids for every text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = _model_proto(sp_model)
    pieces = [(p.piece, p.type, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    mergeable = {piece for piece, kind, _ in pieces if kind == NORMAL}
    merges = []
    # Best-scored piece first; SentencePiece merges a pair whenever its concatenation is a piece,
    # so every split of a piece into two pieces is a merge of that piece's rank.
    for i, (piece, kind, score) in sorted(enumerate(pieces), key=lambda e: (-e[1][2], e[0])):
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((left, right))
    unk = pieces[SPECIAL_TOKENS["unk_token"]][0]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True,
                               ignore_merges=False))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(piece, normalized=False, special=False)
                    for piece, kind, _ in pieces if kind == USER_DEFINED])
    tok.add_special_tokens([AddedToken(pieces[i][0], normalized=False, special=True)
                            for i in SPECIAL_TOKENS.values()])
    return tok


def hf_tokenizer(sp_model: bytes, model_max_length: int):
    """The transformers tokenizer (no bos/eos added by default: FusionTree trains on documents
    that end with eos and start without bos)."""
    from transformers import PreTrainedTokenizerFast

    proto = _model_proto(sp_model)
    names = {name: proto.pieces[i].piece for name, i in SPECIAL_TOKENS.items()}
    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizers_json(sp_model), **names,
                                   add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
                                   split_special_tokens=True, model_max_length=model_max_length,
                                   padding_side="left")


def save_hf_tokenizer(sp_model: bytes, out_dir: str | Path, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map, and the SentencePiece model
    itself (tokenizer.model), which the import back into FusionTree reads."""
    out = Path(out_dir)
    hf_tokenizer(sp_model, model_max_length).save_pretrained(out)
    (out / "tokenizer.model").write_bytes(sp_model)


class ExportDecoder:
    """Token ids -> text exactly as the exported tokenizer decodes them with
    skip_special_tokens=True (transformers' default, and what lm-eval's hf backend uses), so that
    text generated with FusionTree's own model can be compared with text generated by the export.

    It differs from SentencePiece's own decode only on ids that no encoding produces: special
    ids are dropped (SentencePiece writes unk as " ⁇ "), and a run of byte pieces that is not
    valid UTF-8 becomes one U+FFFD per byte (SentencePiece replaces per invalid sequence)."""

    def __init__(self, sp_model: bytes):
        proto = _model_proto(sp_model)
        self.skip = {i for i, p in enumerate(proto.pieces) if p.type in (UNKNOWN, CONTROL)}
        self.byte = {i: int(p.piece[3:5], 16) for i, p in enumerate(proto.pieces) if p.type == BYTE}
        self.text = [p.piece.replace(SPACE, " ") for p in proto.pieces]

    def __call__(self, ids: list[int]) -> str:
        out: list[str] = []
        run = bytearray()
        for i in ids:
            if i in self.skip:
                continue
            if i in self.byte:
                run.append(self.byte[i])
                continue
            out.append(self._bytes(run))
            run.clear()
            out.append(self.text[i])
        out.append(self._bytes(run))
        return "".join(out)

    @staticmethod
    def _bytes(run: bytearray) -> str:
        try:
            return run.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd" * len(run)
