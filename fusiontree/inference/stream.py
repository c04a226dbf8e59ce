"""Streaming text out of generated tokens: each piece is whole characters.

A SentencePiece tokenizer with byte fallback (FusionTree's) spells a character it has no piece
for as its UTF-8 bytes, one token per byte. Decoding a prefix that stops inside such a
character yields U+FFFD in place of the incomplete bytes, so printing the decoded prefix at
every token would print a replacement character and then, one token later, the real one.
`TextStream` holds such tokens back until the character is complete.
"""

from __future__ import annotations

from typing import Callable

# The longest UTF-8 character: after this many held tokens that still decode to an incomplete
# character, the bytes are invalid and are printed as the full decode prints them (U+FFFD).
_MAX_HELD = 4
_REPLACEMENT = "\ufffd"


class TextStream:
    """The text of a growing token sequence, handed out in pieces of whole characters.

    decode: tokens -> text (e.g. `SentencePieceProcessor.decode`). It must decode a sequence
    as the concatenation of its parts split at character boundaries, which holds for
    FusionTree's tokenizer (identity normalisation, no dummy prefix). `push` returns the text
    the new token completes ("" while a character is incomplete); `flush` returns whatever is
    still held. The pieces concatenate to `decode(all tokens)`."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.held: list[int] = []

    def push(self, token: int) -> str:
        self.held.append(token)
        text = self.decode(self.held)
        if text.endswith(_REPLACEMENT) and len(self.held) < _MAX_HELD:
            return ""
        self.held = []
        return text

    def flush(self) -> str:
        text = self.decode(self.held) if self.held else ""
        self.held = []
        return text
