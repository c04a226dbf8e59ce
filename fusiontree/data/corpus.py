"""Raw text sources for the shard builder: input files, the default corpus, bad-input counts.

Inputs and how they are read (a *unit* is one entry of the input listing; a *task* is what
one worker process reads and tokenizes: a unit itself, or a block the builder streamed
out of one):

| input | unit | task |
| --- | --- | --- |
| `.txt`, `.md`, `.py` | the file (one document) | the unit |
| `.jsonl` | a byte range of about 8 MB, cut at line ends | the unit |
| `.jsonl.gz`, `.jsonl.zst`, `.jsonl.xz` | the file | blocks of whole lines (about 4 MB), decompressed as a stream by the builder |
| `.parquet` | the file | blocks of rows of the `--text-field` column, read in record batches with pyarrow |
| a `datasets.save_to_disk` directory, `.arrow` | each `.arrow` file | blocks of rows, as for parquet |

A compressed file, parquet file or arrow file is never held whole: the builder reads it
in blocks and keeps a bounded number of blocks in flight, so memory does not grow with its
size. Each jsonl line and each table row is a document (its own split group).

Bad input is never dropped silently; `ReadStats` counts it:
- bytes that are not UTF-8 are replaced by U+FFFD (each bad byte counted once);
- documents that are empty or only whitespace are skipped;
- jsonl lines that are not JSON objects, or lack a string text field, are skipped;
- table rows whose text is null are skipped.
A damaged file (a truncated or corrupt archive, an unreadable parquet or arrow file) is an
error naming the file and the line or row reached: what follows the damage is unknowable.
A text field that no line of a jsonl file has, or a column a table lacks, is an error
listing the keys or columns it does have.

The default corpus (no --input) exists on every machine without network: the .py files of
the running interpreter's standard library (code; each also gives its module docstring as a
separate prose document in the same split group) plus pydoc's topic texts.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = (".txt", ".md", ".py")
COMPRESSED_JSONL = {".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst", ".jsonl.xz": "jsonl.xz"}
TABLE_SUFFIXES = (".parquet", ".arrow")
SUFFIXES = TEXT_SUFFIXES + (".jsonl",) + tuple(COMPRESSED_JSONL) + TABLE_SUFFIXES
# jsonl files are read in byte ranges of about this size, one per worker task.
JSONL_RANGE_BYTES = 8 << 20
# Streamed inputs (compressed jsonl, parquet, arrow) become tasks of about this much text.
STREAM_BLOCK_BYTES = 4 << 20
_READ_BYTES = 1 << 20  # compressed bytes read at a time
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape turns undecodable bytes into
_DOCSTRING = re.compile(r'\A(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]*[rRuU]?("""|\'\'\')(.*?)\1', re.S)
_KEYS_SHOWN = 8


@dataclass(frozen=True)
class Unit:
    kind: str  # "text" | "jsonl" | "jsonl.gz" | "jsonl.zst" | "jsonl.xz" | "parquet" | "arrow" | "pydoc_topics"
    path: str = ""
    start: int = 0  # jsonl byte range [start, end)
    end: int = 0
    size: int = 0  # bytes, for the progress bar
    docstrings: bool = False  # also emit the module docstring (default corpus .py files)
    # The file's path relative to the inputs' common directory: document keys and split groups
    # use it, so a corpus splits the same wherever it lies.
    name: str = ""

    @property
    def streamed(self) -> bool:
        return self.kind in COMPRESSED_JSONL.values() or self.kind in ("parquet", "arrow")


@dataclass(frozen=True)
class Block:
    """A piece of a streamed unit: whole jsonl lines (bytes) or a column of table rows."""
    unit: Unit
    first: int  # index of its first line / row within the file
    lines: bytes = b""  # kind "lines"
    rows: object = None  # kind "rows": a pyarrow string or binary array
    size: int = 0  # input bytes it stands for (progress)

    @property
    def name(self) -> str:
        return self.unit.name


@dataclass
class ReadStats:
    files: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the documents kept
    documents: int = 0
    empty_documents_skipped: int = 0
    non_utf8_bytes_replaced: int = 0
    non_utf8_documents: int = 0
    jsonl_bad_lines: int = 0  # not JSON, or not an object
    jsonl_missing_text: int = 0  # no string under the text field
    null_text_rows: int = 0  # parquet / arrow rows whose text is null
    unk_tokens: int = 0  # tokens the tokenizer mapped to unk (one without byte fallback)

    def add(self, other: "ReadStats") -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(other, f))


@dataclass
class Document:
    key: str  # unique within a build
    group: str  # documents of one group always land in the same split
    text: str


@dataclass
class ReadResult:
    docs: list[Document] = field(default_factory=list)
    stats: ReadStats = field(default_factory=ReadStats)
    # jsonl files (by name) with at least one line holding the text field, and for files with
    # object lines lacking it, some of the keys those lines had: a text field that no line of
    # a file has is an error, not a file of skipped lines.
    field_found: set[str] = field(default_factory=set)
    field_missing: dict[str, set[str]] = field(default_factory=dict)

    def add(self, other: "ReadResult") -> None:
        self.stats.add(other.stats)
        self.field_found |= other.field_found
        for name, keys in other.field_missing.items():
            mine = self.field_missing.setdefault(name, set())
            if len(mine) < _KEYS_SHOWN:  # enough to show the user which keys there are
                mine.update(keys)


def decode_utf8(data: bytes, stats: ReadStats) -> str:
    """Strict UTF-8 where possible; else every undecodable byte becomes U+FFFD and is counted."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="surrogateescape")
        text, n_bad = _BAD_BYTE.subn("\ufffd", text)
        stats.non_utf8_bytes_replaced += n_bad
        stats.non_utf8_documents += 1
        return text


def _keep(docs: list[Document], stats: ReadStats, key: str, group: str, text: str) -> None:
    if not text.strip():
        stats.empty_documents_skipped += 1
        return
    stats.documents += 1
    stats.text_bytes += len(text.encode("utf-8", errors="surrogatepass"))
    docs.append(Document(key, group, text))


def _jsonl_line(raw: bytes, key: str, text_field: str, out: ReadResult, file: str) -> None:
    if not raw.strip():
        return  # blank lines separate nothing in jsonl; they are not documents
    line = decode_utf8(raw, out.stats)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        out.stats.jsonl_bad_lines += 1
        return
    if not isinstance(obj, dict):
        out.stats.jsonl_bad_lines += 1
        return
    text = obj.get(text_field)
    if text_field in obj:
        out.field_found.add(file)
    else:
        keys = out.field_missing.setdefault(file, set())
        if len(keys) < _KEYS_SHOWN:
            keys.update(list(obj)[:_KEYS_SHOWN - len(keys)])
    if not isinstance(text, str):
        out.stats.jsonl_missing_text += 1
        return
    _keep(out.docs, out.stats, key, key, text)


def check_text_field(result: ReadResult, text_field: str) -> None:
    """A jsonl file none of whose lines has the text field is a wrong --text-field, not bad lines."""
    lacking = sorted(set(result.field_missing) - result.field_found)
    if lacking:
        keys = sorted(result.field_missing[lacking[0]])
        raise ValueError(f"no line of {lacking[0]}{f' (and {len(lacking) - 1} more jsonl files)' if len(lacking) > 1 else ''} "
                         f"has the text field {text_field!r}; its lines have {keys}: pass --text-field with one of "
                         "those")


# ------------------------------------------------------------------------------ reading (workers)

def read_task(task: Unit | Block, text_field: str = "text") -> ReadResult:
    """Documents of a unit a worker reads itself, or of a block streamed out of a unit."""
    out = ReadResult()
    if isinstance(task, Block):
        if task.rows is not None:
            _table_rows(task, out)
        else:
            i = task.first
            for raw in task.lines.splitlines(keepends=True):
                _jsonl_line(raw, f"{task.name}:{i}", text_field, out, task.name)
                i += 1
        out.stats.files += task.first == 0
        return out
    unit = task
    if unit.kind == "pydoc_topics":
        from pydoc_data.topics import topics

        for name in sorted(topics):
            key = f"pydoc_data.topics:{name}"
            _keep(out.docs, out.stats, key, key, topics[name])
        return out
    if unit.kind == "text":
        out.stats.files += 1
        try:
            data = Path(unit.path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read input {unit.path}: {e}") from e
        text = decode_utf8(data, out.stats)
        _keep(out.docs, out.stats, unit.name, unit.name, text)
        if unit.docstrings:
            m = _DOCSTRING.match(text)
            if m and len(m.group(2).strip()) >= 80:  # short docstrings are a title, not prose
                _keep(out.docs, out.stats, unit.name + ":docstring", unit.name, m.group(2).strip() + "\n")
        return out
    assert unit.kind == "jsonl", unit
    out.stats.files += unit.start == 0
    with open(unit.path, "rb") as f:
        pos = unit.start
        if pos > 0:
            # The line running through `start` belongs to the previous range (it began there).
            f.seek(pos - 1)
            pos += len(f.readline()) - 1
        while pos < unit.end:
            raw = f.readline()
            if not raw:
                break
            _jsonl_line(raw, f"{unit.name}@{pos}", text_field, out, unit.name)
            pos += len(raw)
    return out


def read_unit(unit: Unit, text_field: str = "text") -> ReadResult:
    """All documents of a unit, in this process (streamed units block by block)."""
    out = ReadResult()
    for task in iter_tasks(unit, text_field):
        got = read_task(task, text_field)
        out.docs.extend(got.docs)
        out.add(got)
    return out


def _table_rows(block: Block, out: ReadResult) -> None:
    import pyarrow as pa

    binary = pa.types.is_binary(block.rows.type) or pa.types.is_large_binary(block.rows.type)
    for i, value in enumerate(block.rows.to_pylist(), block.first):
        if value is None:
            out.stats.null_text_rows += 1
            continue
        key = f"{block.name}:{i}"
        _keep(out.docs, out.stats, key, key, decode_utf8(value, out.stats) if binary else value)


# ------------------------------------------------------------------------------ streaming (builder)

def iter_tasks(unit: Unit, text_field: str) -> Iterator[Unit | Block]:
    """What the workers read for a unit: the unit itself, or the blocks of a streamed one.
    Runs in the builder's process; a damaged file raises naming the file and the position."""
    if not unit.streamed:
        yield unit
    elif unit.kind == "parquet":
        yield from _parquet_blocks(unit, text_field)
    elif unit.kind == "arrow":
        yield from _arrow_blocks(unit, text_field)
    else:
        yield from _compressed_line_blocks(unit)


def _decompressed_chunks(unit: Unit, f) -> Iterator[bytes]:
    if unit.kind == "jsonl.gz":
        with gzip.open(f, "rb") as g:
            yield from iter(lambda: g.read(_READ_BYTES), b"")
    elif unit.kind == "jsonl.xz":
        with lzma.open(f, "rb") as x:
            yield from iter(lambda: x.read(_READ_BYTES), b"")
    else:
        import zstandard

        # A stream reader returns a truncated frame's bytes without complaint, so frames are
        # decoded one by one and the last one must be complete.
        d = zstandard.ZstdDecompressor().decompressobj()
        started = False
        for raw in iter(lambda: f.read(_READ_BYTES), b""):
            while raw:
                started = True
                yield d.decompress(raw)
                if not d.eof:
                    break
                raw = d.unused_data
                d, started = zstandard.ZstdDecompressor().decompressobj(), False
        if started and not d.eof:
            raise EOFError("the file ends inside a zstd frame (truncated)")


def _compressed_line_blocks(unit: Unit) -> Iterator[Block]:
    line = 0
    credited = 0

    def credit(f, final: bool = False) -> int:
        """Progress for a block: the compressed bytes read since the last block."""
        nonlocal credited
        now = unit.size if final else min(unit.size, f.tell())
        got, credited = now - credited, now
        return got

    try:
        with open(unit.path, "rb") as f:
            buf = b""
            for chunk in _decompressed_chunks(unit, f):
                buf += chunk
                while len(buf) >= STREAM_BLOCK_BYTES:
                    cut = buf.rfind(b"\n", 0, STREAM_BLOCK_BYTES) + 1 or buf.find(b"\n", STREAM_BLOCK_BYTES) + 1
                    if cut == 0:
                        break  # one line longer than a block: keep reading until it ends
                    yield Block(unit, line, lines=buf[:cut], size=credit(f))
                    line += buf.count(b"\n", 0, cut)
                    buf = buf[cut:]
            if buf or line == 0:
                yield Block(unit, line, lines=buf, size=credit(f, final=True))
    except (OSError, EOFError, zlib.error, lzma.LZMAError, _zstd_error()) as e:
        # A damaged archive is not a bad line: what follows the damage is unknowable.
        fmt = {"jsonl.gz": "gzip", "jsonl.zst": "zstd", "jsonl.xz": "xz"}[unit.kind]
        raise ValueError(f"input {unit.path} is not a readable {fmt} file (after line {line}: "
                         f"{e}); re-create it or leave it out of --input") from e


def _zstd_error() -> type[Exception]:
    try:
        import zstandard
    except ImportError:
        return OSError  # then no .jsonl.zst unit exists (the listing refuses them)
    return zstandard.ZstdError


_TEXT_TYPES = ("string", "large_string", "string_view", "binary", "large_binary", "binary_view")


def _check_text_column(schema, text_field: str, unit: Unit) -> None:
    if text_field not in schema.names:
        raise ValueError(f"input {unit.path} has no column {text_field!r}; its columns are {schema.names}: pass "
                         "--text-field with the one holding the text")
    t = schema.field(text_field).type
    if str(t) not in _TEXT_TYPES:
        raise ValueError(f"column {text_field!r} of {unit.path} holds {t}, not text; pass --text-field with a "
                         "string column")


def _row_blocks(unit: Unit, arrays: Iterator, rows_read: list[int], bytes_per_row: float | None) -> Iterator[Block]:
    """Cut record-batch columns into blocks of about STREAM_BLOCK_BYTES (a batch larger than
    that is sliced); `rows_read[0]` counts the rows read from the file (the position an
    error reports). Progress credit: rows x `bytes_per_row` of the file, or the column's
    bytes (arrow files are not compressed)."""
    import pyarrow as pa

    pending, nbytes, first = [], 0, 0

    def block() -> Block:
        rows = pa.concat_arrays(pending) if pending else pa.array([], pa.string())
        # concat copies: a block must not pin (or pickle) the whole batch it was cut from
        return Block(unit, first, rows=rows, size=round(len(rows) * bytes_per_row) if bytes_per_row else nbytes)

    for arr in arrays:
        rows_read[0] += len(arr)
        while len(arr):
            room = STREAM_BLOCK_BYTES - nbytes
            take = len(arr) if arr.nbytes <= room else max(1, int(len(arr) * room / max(1, arr.nbytes)))
            piece, arr = arr.slice(0, take), arr.slice(take)
            pending.append(piece)
            nbytes += piece.nbytes
            if nbytes >= STREAM_BLOCK_BYTES:
                yield block()
                first += sum(len(a) for a in pending)
                pending, nbytes = [], 0
    if pending or first == 0:
        yield block()


def _parquet_blocks(unit: Unit, text_field: str) -> Iterator[Block]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows_read = [0]
    try:
        pf = pq.ParquetFile(unit.path)
        _check_text_column(pf.schema_arrow, text_field, unit)
        total = max(1, pf.metadata.num_rows)
        batches = pf.iter_batches(batch_size=1024, columns=[text_field], use_threads=False)
        yield from _row_blocks(unit, (b.column(0) for b in batches), rows_read, unit.size / total)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"input {unit.path} is not a readable parquet file (after row {rows_read[0]}: {e}); "
                         "re-create it or leave it out of --input") from e


def _arrow_blocks(unit: Unit, text_field: str) -> Iterator[Block]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    rows_read = [0]
    try:
        source = pa.memory_map(unit.path)  # batches are read in place, not copied whole
        if source.read(6) == b"ARROW1":  # the random-access file format (datasets writes streams)
            source.seek(0)
            reader = ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            source.seek(0)
            reader = ipc.open_stream(source)
            batches = iter(reader)
        _check_text_column(reader.schema, text_field, unit)
        col = reader.schema.get_field_index(text_field)
        yield from _row_blocks(unit, (b.column(col) for b in batches), rows_read, None)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"input {unit.path} is not a readable arrow file (after row {rows_read[0]}: {e}); "
                         "re-create it or leave it out of --input") from e


# ------------------------------------------------------------------------------ listing

def _file_units(path: Path, name: str) -> list[Unit]:
    size = path.stat().st_size
    for suffix, kind in COMPRESSED_JSONL.items():
        if path.name.endswith(suffix):
            _require(kind, path)
            return [Unit(kind, str(path), size=size, name=name)]
    if path.name.endswith(".jsonl"):
        return [Unit("jsonl", str(path), start, min(start + JSONL_RANGE_BYTES, size),
                     size=min(JSONL_RANGE_BYTES, size - start), name=name)
                for start in range(0, max(size, 1), JSONL_RANGE_BYTES)]
    if path.name.endswith(TABLE_SUFFIXES):
        kind = path.suffix[1:]
        _require(kind, path)
        return [Unit(kind, str(path), size=size, name=name)]
    if path.name.endswith(TEXT_SUFFIXES):
        return [Unit("text", str(path), size=size, name=name)]
    raise ValueError(f"input file {str(path)!r} has an unsupported type; use {', '.join(SUFFIXES)} or a "
                     "datasets.save_to_disk directory")


def _require(kind: str, path: Path) -> None:
    module = {"jsonl.zst": "zstandard", "parquet": "pyarrow", "arrow": "pyarrow"}.get(kind)
    if module is None:
        return
    try:
        __import__(module)
    except ImportError as e:
        raise ValueError(f"input {path} needs the `{module}` package; install the project's train extra "
                         "(pip install -e '.[train]')") from e


def _dataset_files(d: Path) -> list[Path] | None:
    """The arrow files of a `datasets.save_to_disk` directory, in its order; None if `d` is
    not one. A DatasetDict (several splits) is refused: which splits to train on is the
    user's choice."""
    if (d / "dataset_dict.json").is_file():
        try:
            splits = json.loads((d / "dataset_dict.json").read_text()).get("splits")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            splits = None
        raise ValueError(f"--input {d} is a saved DatasetDict with splits {splits}; give the directory of the "
                         f"split(s) to use, e.g. {d / (splits[0] if splits else 'train')}")
    state = d / "state.json"
    if not state.is_file():
        return None
    try:
        files = [d / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{state} is not a datasets state file ({e}); re-save the dataset with save_to_disk") from e
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"the dataset in {d} lists {missing[:3]} in state.json but they are missing; copy the "
                         "whole directory")
    return files


def input_units(inputs: list[str]) -> list[Unit]:
    """Units for `--input` values: files, directories (searched recursively for the supported
    suffixes; a `datasets.save_to_disk` directory gives the arrow files its state.json lists)
    or glob patterns. Sorted by path, each file once."""
    paths: set[Path] = set()
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            found = _dataset_files(p)
            if found is None:
                found = [q for q in p.rglob("*") if q.is_file() and q.name.endswith(SUFFIXES)]
                if not found:
                    raise ValueError(f"--input {spec}: the directory holds no {', '.join(SUFFIXES)} files and is not "
                                     "a datasets.save_to_disk directory")
        elif p.is_file():
            found = [p]
        else:
            found = [Path(q) for q in glob.glob(spec, recursive=True) if Path(q).is_file()]
            if not found:
                raise ValueError(f"--input {spec}: no such file or directory, and no file matches it as a glob")
        paths.update(q.resolve() for q in found)
    # datasets names its files data-00000-of-0000N.arrow, so path order is also its order
    ordered = sorted(paths)
    common = Path(os.path.commonpath(ordered)) if len(ordered) > 1 else ordered[0].parent if ordered else Path()
    units: list[Unit] = []
    for path in ordered:
        units.extend(_file_units(path, path.relative_to(common).as_posix()))
    return units


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def interpreter_path(spec: str) -> Path:
    """`stdlib:REL` (REL under this interpreter's standard library) or `site:REL` (under its
    site-packages: installed packages' sources), so that configs name the same kind of files on
    every machine; any other spec is a path as given."""
    for prefix, root in (("stdlib:", "stdlib"), ("site:", "purelib")):
        if spec.startswith(prefix):
            return Path(sysconfig.get_paths()[root]) / spec[len(prefix):]
    return Path(spec)


def default_units() -> list[Unit]:
    """The standard library's .py files (with their module docstrings) and pydoc's topics."""
    root = stdlib_dir()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    units = [Unit("text", p, size=os.path.getsize(p), docstrings=True, name=Path(p).relative_to(root).as_posix())
             for p in sorted(files)]
    topics_size = 0
    try:
        from pydoc_data.topics import topics
        topics_size = sum(len(t) for t in topics.values())
    except ImportError:  # some distributions strip pydoc_data; the code alone still makes a corpus
        pass
    if topics_size:
        units.append(Unit("pydoc_topics", size=topics_size))
    return units


def describe_default_corpus() -> str:
    return f"Python {sys.version.split()[0]} standard library at {stdlib_dir()} (.py files + module docstrings) " \
           f"+ pydoc topics"


def split_of(group: str, seed: int, val_fraction: float) -> str:
    """'val' or 'train', a seeded hash of the document's group (independent of input order)."""
    h = hashlib.sha256(f"{seed}\0{group}".encode("utf-8", errors="surrogatepass")).digest()
    return "val" if int.from_bytes(h[:8], "little") < val_fraction * 2.0**64 else "train"


def total_bytes(units: list[Unit]) -> int:
    return sum(u.size for u in units)

