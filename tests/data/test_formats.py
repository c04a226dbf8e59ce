"""Input formats: parquet, datasets.save_to_disk (arrow), .jsonl.zst / .jsonl.xz / .jsonl.gz;
every document exactly once whatever the format, and every damaged-input path."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import zstandard

from fusiontree.data import build, corpus
from fusiontree.data.build import BuildArgs, build_shards
from fusiontree.data.corpus import stdlib_dir
from fusiontree.data.shards import bucket_shards, read_manifest, read_shard_range
from fusiontree.data.tokenizer import load_tokenizer_file

SEQ = [64, 128]


def texts(n: int = 120) -> list[str]:
    """Documents of varied length (1 to ~40 lines), each tagged with its number."""
    lines = [x for x in (stdlib_dir() / "argparse.py").read_text().splitlines() if x.strip()]
    return [f"T{i:04d}| " + "\n".join(lines[(i * 31) % 900:(i * 31) % 900 + 1 + (i * 7) % 40]) + "\n"
            for i in range(n)]


def jsonl_bytes(docs: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(docs)).encode()


def write_dataset_dir(path: Path, docs: list[str], files: int = 2, field: str = "text") -> Path:
    """A directory laid out as datasets.save_to_disk writes it: arrow IPC streams listed in state.json."""
    path.mkdir(parents=True)
    names = []
    per = -(-len(docs) // files)
    for k in range(files):
        name = f"data-{k:05d}-of-{files:05d}.arrow"
        table = pa.table({field: docs[k * per:(k + 1) * per], "id": list(range(k * per, min(len(docs), (k + 1) * per)))})
        with ipc.new_stream(str(path / name), table.schema) as w:
            w.write_table(table, max_chunksize=7)
        names.append(name)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (path / "dataset_info.json").write_text("{}")
    return path


def write_all_formats(root: Path, docs: list[str]) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    raw = jsonl_bytes(docs)
    out = {"jsonl": root / "d.jsonl", "gz": root / "d.jsonl.gz", "zst": root / "d.jsonl.zst",
           "xz": root / "d.jsonl.xz", "parquet": root / "d.parquet", "dataset": root / "ds"}
    out["jsonl"].write_bytes(raw)
    out["gz"].write_bytes(gzip.compress(raw))
    out["zst"].write_bytes(zstandard.ZstdCompressor().compress(raw))
    out["xz"].write_bytes(lzma.compress(raw))
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), out["parquet"], row_group_size=17)
    write_dataset_dir(out["dataset"], docs)
    return out


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, Path]:
    return write_all_formats(tmp_path_factory.mktemp("formats"), texts())


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory, formats) -> Path:
    out = tmp_path_factory.mktemp("tok") / "shards"
    build_shards(BuildArgs(inputs=[str(formats["jsonl"])], output=str(out), vocab_size=400, seq_lengths=SEQ,
                           val_fraction=0.0, workers=1, seed=3, progress=False))
    return out / "tokenizer.model"


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["gz", "zst", "xz", "parquet", "dataset"])
def test_every_format_reads_every_document_once_in_order(formats, fmt, monkeypatch):
    monkeypatch.setattr(corpus, "STREAM_BLOCK_BYTES", 3000)  # many blocks, cut anywhere
    units = corpus.input_units([str(formats[fmt])])
    tasks = [t for u in units for t in corpus.iter_tasks(u, "text")]
    assert len(tasks) > 5
    got = [d.text for t in tasks for d in corpus.read_task(t, "text").docs]
    assert got == texts()


def test_builds_from_every_format_are_identical(formats, tokenizer_model, tmp_path, monkeypatch):
    """The same documents in any format give byte-identical shards (all in train: val 0),
    and the tokens in them are exactly the documents' tokens, each document once."""
    monkeypatch.setattr(corpus, "STREAM_BLOCK_BYTES", 5000)
    trees = {}
    for fmt, path in formats.items():
        out = tmp_path / fmt
        summary = build_shards(BuildArgs(inputs=[str(path)], output=str(out), tokenizer=str(tokenizer_model),
                                         seq_lengths=SEQ, val_fraction=0.0, workers=2, seed=3, shard_size=16,
                                         progress=False))
        assert summary["input"]["documents"] == len(texts()) and summary["input"]["files"] == (
            2 if fmt == "dataset" else 1)
        trees[fmt] = {k: v for k, v in tree_bytes(out).items() if k.endswith(".tar")}
    ref = trees.pop("jsonl")
    for fmt, tree in trees.items():
        assert tree == ref, fmt
    tok = load_tokenizer_file(tokenizer_model)
    m = read_manifest(tmp_path / "parquet")
    want = sum(len(tok.encode(t)) + 1 for t in texts())
    assert m["splits"]["train"]["document_tokens"] == want
    packed = m["splits"]["train"]["tokens"] + m["splits"]["train"]["packing"]["dropped_tail_tokens"]
    assert packed == want
    # every document's tag appears exactly once in the decoded samples
    text = ""
    for L in SEQ:
        for shard in bucket_shards(tmp_path / "parquet", m, "train", L):
            got, err = read_shard_range(shard, 0, shard.samples, L, m["token_dtype"], m["vocab_size"])
            assert err is None
            text += "".join(tok.decode(t.tolist()) for _, t, _ in got)
    tags = [text.count(f"T{i:04d}|") for i in range(len(texts()))]
    dropped = m["splits"]["train"]["packing"]["dropped_tail_documents"]
    assert sum(c == 1 for c in tags) >= len(tags) - dropped and max(tags) == 1


def test_null_and_binary_rows(tmp_path):
    pq.write_table(pa.table({"text": pa.array([b"caf\xc3\xa9 ok", None, b"bad \xff byte", b"   "])}),
                   tmp_path / "b.parquet")
    res = corpus.read_unit(corpus.input_units([str(tmp_path / "b.parquet")])[0])
    assert [d.text for d in res.docs] == ["café ok", "bad \ufffd byte"]
    s = res.stats
    assert (s.null_text_rows, s.non_utf8_bytes_replaced, s.empty_documents_skipped, s.files) == (1, 1, 1, 1)


def cut(path: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    dst.write_bytes(data[:int(len(data) * fraction)])
    return dst


@pytest.mark.parametrize("fmt, match", [
    ("gz", r"c\.jsonl\.gz is not a readable gzip file \(after line \d+"),
    ("zst", r"c\.jsonl\.zst is not a readable zstd file \(after line \d+: the file ends inside a zstd frame"),
    ("xz", r"c\.jsonl\.xz is not a readable xz file \(after line \d+"),
    ("parquet", r"c\.parquet is not a readable parquet file \(after row 0"),
])
def test_truncated_files_are_errors_naming_file_and_position(formats, tmp_path, fmt, match):
    src = formats[fmt]
    bad = cut(src, tmp_path / ("c" + "".join(src.suffixes)))
    with pytest.raises(ValueError, match=match):
        corpus.read_unit(corpus.input_units([str(bad)])[0])


def test_truncated_arrow_stream_names_file_and_row(formats, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(formats["dataset"], ds)
    f = ds / "data-00001-of-00002.arrow"
    cut(f, f, 0.6)
    with pytest.raises(ValueError, match=r"data-00001-of-00002\.arrow is not a readable arrow file \(after row [1-9]"):
        for u in corpus.input_units([str(ds)]):
            corpus.read_unit(u)


def test_corrupt_parquet_page_is_an_error(formats, tmp_path):
    data = bytearray(formats["parquet"].read_bytes())
    data[len(data) // 3:len(data) // 3 + 64] = b"\x07" * 64  # inside the column data, footer intact
    bad = tmp_path / "p.parquet"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"p\.parquet is not a readable parquet file \(after row \d+"):
        corpus.read_unit(corpus.input_units([str(bad)])[0])


def test_table_columns_and_dataset_layouts(formats, tmp_path):
    pq.write_table(pa.table({"content": ["a b c"], "n": [1]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"has no column 'text'; its columns are \['content', 'n'\]: pass --text-field"):
        corpus.read_unit(corpus.input_units([str(tmp_path / "t.parquet")])[0], "text")
    with pytest.raises(ValueError, match=r"column 'n' of .* holds int64, not text"):
        corpus.read_unit(corpus.input_units([str(tmp_path / "t.parquet")])[0], "n")
    assert [d.text for d in corpus.read_unit(corpus.input_units([str(tmp_path / "t.parquet")])[0], "content").docs] \
        == ["a b c"]
    dd = tmp_path / "dd"
    shutil.copytree(formats["dataset"], dd / "train")
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(ValueError, match=r"saved DatasetDict with splits \['train', 'test'\]; .*dd/train"):
        corpus.input_units([str(dd)])
    assert len(corpus.input_units([str(dd / "train")])) == 2
    (dd / "train" / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(ValueError, match=r"lists \['data-00001-of-00002.arrow'\] in state.json but they are missing"):
        corpus.input_units([str(dd / "train")])


def test_a_text_field_no_line_has_says_so(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(texts(5), field="content"))
    args = dict(output=str(tmp_path / "out"), vocab_size=400, seq_lengths=SEQ, val_fraction=0.0, workers=1,
                progress=False)
    with pytest.raises(ValueError, match=r"no line of a.jsonl has the text field 'text'; its lines have "
                                         r"\['content', 'id'\]: pass --text-field"):
        build_shards(BuildArgs(inputs=[str(tmp_path / "a.jsonl")], **args))
    # with another file giving text, the tokenizer trains, and the build still refuses the file
    (tmp_path / "b.txt").write_text("\n".join(texts(40)))
    with pytest.raises(ValueError, match="no line of a.jsonl has the text field 'text'"):
        build_shards(BuildArgs(inputs=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], **args))
    assert not (tmp_path / "out").exists()
    summary = build_shards(BuildArgs(inputs=[str(tmp_path / "a.jsonl")], text_field="content", **args))
    assert summary["input"]["documents"] == 5 and summary["input"]["jsonl_missing_text"] == 0


def test_tasks_in_flight_are_bounded(tmp_path):
    """The builder never pulls more than `window` tasks ahead of what it consumed, so a
    streamed input is never read (and held) whole."""
    pulled = []

    def tasks():
        for i in range(50):
            pulled.append(i)
            yield i

    with build._worker_pool(2, (None, 0, 0.0, "text", "uint16")) as pool:
        for k, got in enumerate(build._ordered(pool, abs, tasks(), window=4)):
            assert got == k
            assert len(pulled) <= k + 1 + 4
    assert len(pulled) == 50


def _die(task):
    os._exit(3)  # a worker killed mid-task (by the OOM killer, say)


def test_a_worker_that_dies_fails_the_build_instead_of_waiting_forever():
    with build._worker_pool(2, (None, 0, 0.0, "text", "uint16")) as pool:
        with pytest.raises(build.WorkerDied, match=r"worker process died.*--workers 1 to build in this process"):
            list(build._ordered(pool, _die, range(4), window=2))


def test_unsupported_files_are_named(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"x.csv' has an unsupported type; use .*\.parquet"):
        corpus.input_units([str(tmp_path / "x.csv")])
