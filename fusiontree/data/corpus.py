"""Raw text sources for the shard builder: input files, the default corpus, bad-input counts.

A *unit* is a piece of input one worker reads on its own: a whole .txt/.md/.py file, a byte
range of a .jsonl file (cut at line ends, so big files spread over workers), a whole
.jsonl.gz file, or pydoc's topics. Reading a unit gives documents (key, split group, text).

Bad input is never dropped silently; `ReadStats` counts it:
- bytes that are not UTF-8 are replaced by U+FFFD (each bad byte counted once);
- documents that are empty or only whitespace are skipped;
- jsonl lines that are not JSON objects, or lack a string text field, are skipped.

The default corpus (no --input) exists on every machine without network: the .py files of
the running interpreter's standard library (code; each also gives its module docstring as a
separate prose document in the same split group) plus pydoc's topic texts.
"""

from __future__ import annotations

import glob
import hashlib
import gzip
import json
import os
import re
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".py")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
# jsonl files are read in byte ranges of about this size, one per worker task.
JSONL_RANGE_BYTES = 8 << 20
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape turns undecodable bytes into
_DOCSTRING = re.compile(r'\A(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]*[rRuU]?("""|\'\'\')(.*?)\1', re.S)


@dataclass(frozen=True)
class Unit:
    kind: str  # "text" | "jsonl" | "jsonl.gz" | "pydoc_topics"
    path: str = ""
    start: int = 0  # jsonl byte range [start, end)
    end: int = 0
    size: int = 0  # bytes, for the progress bar
    docstrings: bool = False  # also emit the module docstring (default corpus .py files)
    # The file's path relative to the inputs' common directory: document keys and split groups
    # use it, so a corpus splits the same wherever it lies.
    name: str = ""


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


def _jsonl_line(raw: bytes, key: str, text_field: str, out: ReadResult) -> None:
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
    if not isinstance(text, str):
        out.stats.jsonl_missing_text += 1
        return
    _keep(out.docs, out.stats, key, key, text)


def read_unit(unit: Unit, text_field: str = "text") -> ReadResult:
    out = ReadResult()
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
    if unit.kind == "jsonl.gz":
        out.stats.files += 1
        i = 0
        try:
            with gzip.open(unit.path, "rb") as f:
                for i, raw in enumerate(f):
                    _jsonl_line(raw, f"{unit.name}:{i}", text_field, out)
        except (OSError, EOFError, zlib.error) as e:
            # A damaged archive is not a bad line: what follows the damage is unknowable.
            raise ValueError(f"input {unit.path} is not a readable gzip file (after line {i}: {e}); "
                             "re-create it or leave it out of --input") from e
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
            _jsonl_line(raw, f"{unit.name}@{pos}", text_field, out)
            pos += len(raw)
    return out


def _file_units(path: Path, name: str) -> list[Unit]:
    size = path.stat().st_size
    if path.name.endswith(".jsonl.gz"):
        return [Unit("jsonl.gz", str(path), size=size, name=name)]
    if path.name.endswith(".jsonl"):
        return [Unit("jsonl", str(path), start, min(start + JSONL_RANGE_BYTES, size),
                     size=min(JSONL_RANGE_BYTES, size - start), name=name)
                for start in range(0, max(size, 1), JSONL_RANGE_BYTES)]
    if path.name.endswith(TEXT_SUFFIXES):
        return [Unit("text", str(path), size=size, name=name)]
    raise ValueError(f"input file {str(path)!r} has an unsupported type; use "
                     f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}")


def input_units(inputs: list[str]) -> list[Unit]:
    """Units for `--input` values: files, directories (searched recursively for the supported
    suffixes) or glob patterns. Sorted by path, each file once."""
    paths: set[Path] = set()
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            found = [q for q in p.rglob("*") if q.is_file() and q.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)]
            if not found:
                raise ValueError(f"--input {spec}: the directory holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
        elif p.is_file():
            found = [p]
        else:
            found = [Path(q) for q in glob.glob(spec, recursive=True) if Path(q).is_file()]
            if not found:
                raise ValueError(f"--input {spec}: no such file or directory, and no file matches it as a glob")
        paths.update(q.resolve() for q in found)
    ordered = sorted(paths)
    common = Path(os.path.commonpath(ordered)) if len(ordered) > 1 else ordered[0].parent if ordered else Path()
    units: list[Unit] = []
    for path in ordered:
        units.extend(_file_units(path, path.relative_to(common).as_posix()))
    return units


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


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


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
