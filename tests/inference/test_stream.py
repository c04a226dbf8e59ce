"""TextStream: streamed text comes out in whole characters and adds up to the full decode."""

from fusiontree.inference import TextStream

TEXT = "x = 'é€😀' + ü\n"  # 2-, 3- and 4-byte characters, spelled in byte tokens by byte fallback


def piece_id(tok, piece: str) -> int:
    return next(i for i in range(tok.vocab_size()) if tok.id_to_token(i) == piece)


def test_stream_pieces_are_whole_characters_and_add_up_to_the_decode(sp):
    tokens = sp.encode(TEXT)
    assert sp.decode(tokens) == TEXT
    assert any(sp.id_to_token(t).startswith("<0x") for t in tokens), "the text must need byte tokens"
    stream = TextStream(sp.decode)
    pieces = [stream.push(t) for t in tokens] + [stream.flush()]
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    # the emoji's four byte tokens: three held back, then the whole character at once
    emoji = [piece_id(sp, f"<0x{b:02X}>") for b in "😀".encode()]
    stream = TextStream(sp.decode)
    assert [stream.push(t) for t in emoji] == ["", "", "", "😀"]


def test_stream_gives_up_on_invalid_bytes_as_the_decode_does(sp):
    lead = piece_id(sp, "<0xE2>")  # starts a 3-byte character that never completes
    tokens = [lead, lead, lead, lead, *sp.encode("ab")]
    stream = TextStream(sp.decode)
    pieces = [stream.push(t) for t in tokens] + [stream.flush()]
    assert pieces[:3] == ["", "", ""] and pieces[3]  # held until the longest character could have ended
    assert "".join(pieces) == sp.decode(tokens)
    stream = TextStream(sp.decode)
    assert stream.push(lead) == "" and stream.flush() == sp.decode([lead])  # the end flushes what is held
