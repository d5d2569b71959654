"""Reading corpora: JSONL and plain text, optionally .gz or .zst, given as files, globs or folders.

A *source* is one entry of a config's ``sources`` list: a path pattern, a sampling weight and how
to find the text. :func:`expand` turns its pattern into files; :func:`iter_documents` yields the
documents of one file. Both the tokenizer trainer and shard preparation read through here, so a
malformed line gets the same error everywhere: the file, the line number and what to do.

Plain text files hold one document per paragraph (blank-line separated) by default; ``plain_docs``
can make each line, or each whole file, a document instead.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Literal

import zstandard

from hataori.config import require
from hataori.errors import InputError

COMPRESSIONS = (".gz", ".zst")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text")


@dataclass(kw_only=True, slots=True)
class SourceConfig:
    """One corpus source."""

    path: str
    """A file, a glob (``data/**/*.jsonl.gz``) or a folder (read recursively)."""
    weight: float = 1.0
    """Relative sampling weight of this source against the others."""
    format: Literal["auto", "jsonl", "text"] = "auto"
    """``auto`` decides by suffix: .jsonl/.json/.ndjson are JSONL, anything else plain text."""
    text_key: str = "text"
    """The JSONL field holding the document text."""
    plain_docs: Literal["paragraph", "line", "file"] = "paragraph"
    """How a plain text file splits into documents."""
    name: str = ""
    """A short name for reports; defaults to the path."""

    def __post_init__(self):
        require(bool(self.path), "path", "must name a file, glob or folder")
        require(self.weight > 0, "weight", f"must be positive, got {self.weight}")
        require(bool(self.text_key), "text_key", "must name the JSONL field holding the text")
        if not self.name:
            self.name = self.path


@dataclass
class ReadStats:
    """Counts kept while reading, for summaries and counted skips."""

    documents: int = 0
    chars: int = 0
    bytes: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(reason)

    def merge(self, other: "ReadStats") -> None:
        self.documents += other.documents
        self.chars += other.chars
        self.bytes += other.bytes
        self.skipped += other.skipped
        room = 5 - len(self.skipped_examples)
        self.skipped_examples.extend(other.skipped_examples[:room])


def split_key(text: str, seed: int) -> int:
    """A 64-bit hash of a document's text keyed by ``seed``: the validation split takes documents
    whose key falls below a limit, so the split depends on the text alone, not on file order."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little")


def in_validation(text: str, val_fraction: float, seed: int) -> bool:
    """Whether a document belongs to the validation split of ``val_fraction`` with ``seed``.

    The tokenizer trainer and ``hataori data prepare`` both split by this, so with the same
    fraction and seed a tokenizer never sees the documents its shards validate on.
    """
    return split_key(text, seed) < int(val_fraction * 2**64)


def expand(source: SourceConfig) -> list[Path]:
    """The files a source names, sorted; an error if there are none."""
    pattern = source.path
    path = Path(pattern)
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and _is_corpus_file(p)]
        if not files:
            raise InputError(path, "folder holds no corpus files (.jsonl, .json, .ndjson, .txt, "
                             "optionally .gz or .zst); point the source at the files themselves")
        return files
    if path.is_file():
        return [path]
    if glob.has_magic(pattern):
        files = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
        if not files:
            raise InputError(pattern, "no files match this pattern; check the path and quote the glob "
                             "so the shell does not expand it")
        return files
    raise InputError(pattern, "no such file or folder")


def _is_corpus_file(path: Path) -> bool:
    name = path.name.lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return name.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES)


def file_format(path: Path, source: SourceConfig) -> str:
    if source.format != "auto":
        return source.format
    name = path.name.lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


class _ZstdReader(io.RawIOBase):
    """A .zst file decompressed frame after frame. A file that ends inside a frame raises EOFError, as
    gzip does; zstandard's own stream reader would end quietly there, with part of the text."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        self._new_frame = zstandard.ZstdDecompressor().decompressobj
        self._frame = self._new_frame()
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            data = self._file.read(1 << 17)
            if self._frame.eof:  # a frame ended; whatever follows starts the next one
                data = self._frame.unused_data + data
                if not data:
                    return 0
                self._frame = self._new_frame()
            elif not data:
                raise EOFError("the file ends inside a zstd frame")
            self._out = memoryview(self._frame.decompress(data))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def open_binary(path: Path) -> BinaryIO:
    """Open a possibly compressed file for reading bytes; a truncated .gz or .zst raises EOFError at its end."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path))
    return open(path, "rb")


def iter_lines(path: Path, skip_bad: bool = False, stats: ReadStats | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` of a file, decoded as strict UTF-8, newline removed."""
    try:
        with open_binary(path) as f:
            for number, raw in enumerate(f, start=1):
                if stats is not None:
                    stats.bytes += len(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    message = (f"invalid UTF-8 at byte {err.start} of the line; re-encode the file as UTF-8 "
                               "(e.g. iconv -f SHIFT_JIS -t UTF-8) or allow skipping bad lines")
                    if skip_bad and stats is not None:
                        stats.skip(f"{path}:{number}: invalid UTF-8")
                        continue
                    raise InputError(path, message, line=number) from None
                yield number, line.rstrip("\r\n")
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as err:
        raise InputError(path, f"truncated or corrupt compressed file ({err}); it was cut short or damaged in "
                         "a copy or download: fetch or compress it again") from None
    except OSError as err:
        raise InputError(path, f"cannot read: {err}") from None


def iter_documents(path: Path, source: SourceConfig, skip_bad: bool = False,
                   stats: ReadStats | None = None) -> Iterator[str]:
    """Yield the non-empty documents of one file of ``source``.

    With ``skip_bad`` a malformed line is counted in ``stats`` and skipped; otherwise it raises an
    :class:`InputError` naming the file and line.
    """
    stats = stats if stats is not None else ReadStats()
    fmt = file_format(path, source)
    docs = (_jsonl_documents(path, source, skip_bad, stats) if fmt == "jsonl"
            else _text_documents(path, source, skip_bad, stats))
    for doc in docs:
        if doc:
            stats.documents += 1
            stats.chars += len(doc)
            yield doc


def _jsonl_documents(path: Path, source: SourceConfig, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    key = source.text_key
    for number, line in iter_lines(path, skip_bad, stats):
        if not line.strip():
            continue
        problem = None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problem = f"malformed JSON ({err.msg} at column {err.colno})"
        else:
            if not isinstance(record, dict):
                problem = f"expected a JSON object with a {key!r} field, got {type(record).__name__}"
            elif key not in record:
                fields = ", ".join(repr(k) for k in list(record)[:8]) or "none"
                problem = (f"no {key!r} field (fields: {fields}); "
                           "set the source's text_key to the field holding the text")
            elif not isinstance(record[key], str):
                problem = f"field {key!r} is {type(record[key]).__name__}, not a string"
        if problem is not None:
            if skip_bad:
                stats.skip(f"{path}:{number}: {problem}")
                continue
            raise InputError(path, problem + " (or allow skipping bad lines)", line=number)
        yield record[key]


def _text_documents(path: Path, source: SourceConfig, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    lines = (line for _, line in iter_lines(path, skip_bad, stats))
    if source.plain_docs == "line":
        yield from (line for line in lines if line.strip())
        return
    if source.plain_docs == "file":
        yield "\n".join(lines).strip("\n")
        return
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def describe(sources: list[SourceConfig]) -> str:
    return ", ".join(f"{s.name} (weight {s.weight:g})" for s in sources)
