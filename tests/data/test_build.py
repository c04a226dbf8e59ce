"""Shard builder: bad-input counts, determinism, split by document, tokenizer, tar format, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fusiontree.data.build import build_shards, format_summary
from fusiontree.data.corpus import split_of
from fusiontree.data.shards import ShardWriter, bucket_shards, read_shard_range, tar_bytes
from fusiontree.data.tokenizer import load_sentencepiece, load_tokenizer_file

from .conftest import EXPECTED_INPUT, N_DOCS, SEQ_LENGTHS, VOCAB, build_args

ROOT = Path(__file__).resolve().parents[2]


def all_samples(root: Path, manifest: dict, split: str):
    for L in SEQ_LENGTHS:
        for shard in bucket_shards(root, manifest, split, L):
            got, err = read_shard_range(shard, 0, shard.samples, L, manifest["token_dtype"], manifest["vocab_size"])
            assert err is None, err
            yield from ((L, *s) for s in got)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_input_is_counted_in_manifest_and_summary(built):
    root, summary = built
    manifest = json.loads((root / "manifest.json").read_text())
    for key, want in EXPECTED_INPUT.items():
        assert manifest["input"][key] == want, key
    # 60 generated + colorsys.py + bad_utf8.txt + 5 jsonl + 3 jsonl.gz
    assert manifest["input"]["documents"] == N_DOCS + 10
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == N_DOCS + 10
    text = format_summary(summary, str(root))
    for key, want in EXPECTED_INPUT.items():
        assert f"{key}={want}" in text
    train = manifest["splits"]["train"]["packing"]
    assert train["long_documents_split"] > 0 and train["long_document_pieces"] > train["long_documents_split"]
    assert f"long documents split={train['long_documents_split']}" in text


def test_manifest_matches_the_files(built):
    root, _ = built
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["vocab_size"] == VOCAB and manifest["token_dtype"] == "uint16"
    assert manifest["seq_lengths"] == SEQ_LENGTHS and manifest["tokenizer"]["path"] == "tokenizer.model"
    for split in ("train", "val"):
        total = 0
        for L in SEQ_LENGTHS:
            entry = manifest["splits"][split]["buckets"][str(L)]
            assert entry["samples"] > 0 and entry["tokens"] == entry["samples"] * L
            assert sum(s["samples"] for s in entry["shards"]) == entry["samples"]
            for s in entry["shards"]:
                assert (root / s["path"]).stat().st_size == s["bytes"]
            total += entry["tokens"]
        packing = manifest["splits"][split]["packing"]
        # packing loses only the counted tail
        assert total + packing["dropped_tail_tokens"] == manifest["splits"][split]["document_tokens"]


def test_samples_are_packed_with_eos_and_boundaries(built):
    root, _ = built
    manifest = json.loads((root / "manifest.json").read_text())
    n = 0
    for L, idx, tokens_T, starts_D in all_samples(root, manifest, "train"):
        assert len(tokens_T) == L and starts_D[0] == 0
        eos_at = np.flatnonzero(tokens_T[:-1] == 3) + 1
        # every eos inside a row is followed by a document start
        assert set(eos_at.tolist()) <= set(starts_D.tolist())
        n += 1
    assert n == manifest["splits"]["train"]["samples"]


def test_val_split_is_by_document(built, corpus_dir):
    root, _ = built
    manifest = json.loads((root / "manifest.json").read_text())
    sp = load_sentencepiece(root / "tokenizer.model")
    seen = {}
    for split in ("train", "val"):
        text = "".join(sp.decode(t.tolist()) for _, _, t, _ in all_samples(root, manifest, split))
        seen[split] = {int(m) for m in re.findall(r"D(\d{3})\|", text)}
    assert seen["val"] and seen["train"] and not seen["train"] & seen["val"]
    expected_val = {n for n in range(N_DOCS) if split_of(f"doc_{n:03d}.txt", 7, 0.2) == "val"}
    assert seen["val"] == expected_val


def test_non_utf8_bytes_become_replacement_characters(built):
    root, _ = built
    manifest = json.loads((root / "manifest.json").read_text())
    sp = load_sentencepiece(root / "tokenizer.model")
    text = "".join(sp.decode(t.tolist()) for s in ("train", "val") for _, _, t, _ in all_samples(root, manifest, s))
    assert "BADUTF| café is fine, \ufffd\ufffd are not, nor is \ufffd.\n" in text


def test_same_inputs_give_identical_bytes_and_seed_matters(built, corpus_dir, tmp_path):
    root, _ = built
    again = tmp_path / "again"
    build_shards(build_args(corpus_dir, again))
    first, second = tree_bytes(root), tree_bytes(again)
    assert first.keys() == second.keys() and len(first) > 10
    assert [k for k in first if first[k] != second[k]] == []
    other = tmp_path / "other_seed"
    build_shards(build_args(corpus_dir, other, seed=8))
    assert tree_bytes(other)["train/seq00064/shard-000000.tar"] != first["train/seq00064/shard-000000.tar"]


def test_reused_tokenizer_gives_the_same_shards(built, corpus_dir, tmp_path):
    root, _ = built
    out = tmp_path / "reuse"
    summary = build_shards(build_args(corpus_dir, out, tokenizer=str(root / "tokenizer.model")))
    assert summary["tokenizer"]["trained"] is False
    a, b = tree_bytes(root), tree_bytes(out)
    assert all(a[k] == b[k] for k in a if k.endswith(".tar") or k == "tokenizer.model")
    # rebuilding in place with the build's own tokenizer (which the rebuild replaces)
    build_shards(build_args(corpus_dir, out, tokenizer=str(out / "tokenizer.model")))
    assert tree_bytes(out)["tokenizer.model"] == a["tokenizer.model"]


def test_tokenizer_ids_and_round_trip(built):
    sp = load_sentencepiece(built[0] / "tokenizer.model")
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert sp.vocab_size() == VOCAB
    text = "def f(x):\n\tif x  >  1:  # ünïcödé, 漢字, 🙂\n        return  x\r\n\n"
    ids = sp.encode(text)
    assert sp.decode(ids) == text and sp.unk_id() not in ids


def test_a_sentencepiece_model_with_other_special_ids_keeps_them(tmp_path):
    """A Llama-style .model (unk 0, bos 1, eos 2, no pad) is used with its own ids; one
    without eos is refused (every document ends with eos)."""
    import sentencepiece as spm

    def train(**kw) -> Path:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 50 + ["abc def"] * 50),
                                       model_writer=model, vocab_size=30, model_type="bpe", minloglevel=2, **kw)
        path = tmp_path / f"m{len(kw)}.model"
        path.write_bytes(model.getvalue())
        return path

    tok = load_tokenizer_file(train())
    assert tok.special_ids == {"pad": None, "unk": 0, "bos": 1, "eos": 2} and tok.kind == "sentencepiece"
    with pytest.raises(ValueError, match="has no end-of-document \\(eos\\) token"):
        load_tokenizer_file(train(eos_id=-1))


def test_unk_tokens_are_counted(tmp_path):
    """A tokenizer without byte fallback maps unseen characters to unk: counted, not silent."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 50 + ["abc def"] * 50),
                                   model_writer=model, vocab_size=30, model_type="bpe", minloglevel=2)
    (tmp_path / "t.model").write_bytes(model.getvalue())
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("hello world \u4e2d\u6587 and \U0001f642\n" * 3)
    summary = build_shards(build_args(tmp_path / "in", tmp_path / "out", tokenizer=str(tmp_path / "t.model"),
                                      val_fraction=0.0, seq_lengths=[8]))
    assert summary["input"]["unk_tokens"] > 0
    assert f"unk_tokens={summary['input']['unk_tokens']}" in format_summary(summary, "out")


def test_tar_writer_matches_python_tarfile_and_webdataset_reads_it():
    members = [("0000000000.doc_starts", b"\0\0\0\0"), ("0000000000.tokens", bytes(range(256)) * 3),
               ("0000000001.doc_starts", b"")]
    ours = tar_bytes(members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o444, 0, "", ""
            tar.addfile(info, io.BytesIO(data))
    assert ours == buf.getvalue()
    from webdataset.tariterators import tar_file_iterator

    got = [(m["fname"], m["data"]) for m in tar_file_iterator(io.BytesIO(ours))]
    assert got == members


def test_shard_writer_streams_the_archive_tar_bytes_makes(tmp_path):
    """Shards written sample by sample hold exactly the archive of their members; the manifest
    entry gives its size and hash, and no .partial file is left."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(tmp_path, "train", 300, 2, "uint16")  # 300 tokens: members that end mid-block
    samples = [(rng.integers(0, 1000, 300).astype(np.uint16), np.array([0, 7, 150][:1 + i % 3], dtype=np.int32))
               for i in range(5)]
    for tokens_T, starts_D in samples:
        writer.write(tokens_T, starts_D)
    entry = writer.close()
    assert [s["samples"] for s in entry["shards"]] == [2, 2, 1] and entry["samples"] == 5
    for k, shard in enumerate(entry["shards"]):
        members = []
        for i in range(2 * k, min(2 * k + 2, 5)):
            members += [(f"{i:010d}.doc_starts", samples[i][1].astype("<i4").tobytes()),
                        (f"{i:010d}.tokens", samples[i][0].astype("<u2").tobytes())]
        data = (tmp_path / shard["path"]).read_bytes()
        assert data == tar_bytes(members)
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert not list(tmp_path.rglob("*.partial"))


def test_output_with_foreign_files_is_refused(corpus_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a shard build"):
        build_shards(build_args(corpus_dir, out))
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("kw, match", [
    (dict(seq_lengths=[64, 64]), "repeats a length"),
    (dict(bucket_shares=[1, 1]), "one non-negative weight per bucket"),
    (dict(val_fraction=1.0), r"must lie in \[0, 1\)"),
    (dict(vocab_size=100), "vocab size 100 is too small"),
])
def test_bad_arguments_say_how_to_fix_them(corpus_dir, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        build_shards(build_args(corpus_dir, tmp_path / "x", **kw))


def test_command_line(corpus_dir, tmp_path):
    script = ROOT / "data_pipeline" / "build_shards.py"
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, str(script), "--input", str(corpus_dir / "doc_00*.txt"),
                          str(corpus_dir / "data.jsonl"), "--output", str(out), "--vocab-size", "400",
                          "--seq-lengths", "64,128", "--bucket-shares", "2,1", "--workers", "1",
                          "--shard-size", "4", "--no-progress"], capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr
    assert "seq     64" in res.stdout and "jsonl_bad_lines=2" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build_args"]["bucket_shares"] == [2.0, 1.0] and manifest["seq_lengths"] == [64, 128]
    res = subprocess.run([sys.executable, str(script), "--input", str(tmp_path / "nothing-here"), "--output",
                          str(tmp_path / "y")], capture_output=True, text=True, timeout=1800)
    assert res.returncode == 2 and "nothing-here" in res.stderr and "no such file" in res.stderr


def test_jsonl_byte_ranges_read_every_line_once(tmp_path, monkeypatch):
    from fusiontree.data import corpus

    monkeypatch.setattr(corpus, "JSONL_RANGE_BYTES", 50)  # many ranges, cutting lines anywhere
    texts = [f"line {i} " + "x" * (i * 7 % 40) for i in range(40)]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    units = corpus.input_units([str(path)])
    assert len(units) > 20
    got = [d.text for u in units for d in corpus.read_unit(u).docs]
    assert got == texts


def test_damaged_gzip_input_is_an_error_naming_it(corpus_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    data = (corpus_dir / "more.jsonl.gz").read_bytes()
    (src / "cut.jsonl.gz").write_bytes(data[:len(data) // 2])
    (src / "doc.txt").write_text((corpus_dir / "doc_001.txt").read_text() * 20)
    with pytest.raises(ValueError, match="cut.jsonl.gz is not a readable gzip file"):
        build_shards(build_args(src, tmp_path / "out", val_fraction=0.0))


def test_a_failed_rebuild_keeps_the_previous_build(built, corpus_dir, tmp_path):
    """Rebuilding over a good build and failing (a truncated input; a vocabulary the corpus
    cannot fill) leaves the good build exactly as it was; a successful rebuild replaces it."""
    import shutil

    out = tmp_path / "shards"
    shutil.copytree(built[0], out)
    before = tree_bytes(out)
    bad = tmp_path / "bad"
    shutil.copytree(corpus_dir, bad)
    data = (bad / "more.jsonl.gz").read_bytes()
    (bad / "more.jsonl.gz").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="is not a readable gzip file"):
        build_shards(build_args(bad, out))
    assert tree_bytes(out) == before
    with pytest.raises(ValueError, match="cannot make 60000 pieces"):
        build_shards(build_args(corpus_dir, out, vocab_size=60000))
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "shards"]  # no staging left behind
    build_shards(build_args(corpus_dir, out, seed=8))
    assert json.loads((out / "manifest.json").read_text())["build_args"]["seed"] == 8
