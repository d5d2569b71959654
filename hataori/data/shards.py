"""Token shards: documents encoded once, read back memory-mapped.

A shard is two files with the same stem:

``NAME.bin``
    The token ids of its documents back to back, little-endian ``uint16`` when the vocabulary
    fits in 16 bits, else ``uint32``. Every document ends with the tokenizer's EOS id.
``NAME.idx``
    A 64-byte header, then ``documents + 1`` little-endian int64 offsets into ``NAME.bin``
    (counted in tokens, starting at 0): document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``,
    its EOS included.

Header layout (little-endian, ``struct`` format ``<8sII32sQQ``)::

    magic        8 bytes   b"HATAORI\\x00"
    version      uint32    FORMAT_VERSION
    itemsize     uint32    2 (uint16 ids) or 4 (uint32 ids)
    fingerprint  32 bytes  the tokenizer's fingerprint, ASCII, NUL-padded
    documents    uint64
    tokens       uint64

Format version 2 adds a third file, for conversations prepared with a chat template
(:mod:`hataori.data.chat`):

``NAME.mask``
    One byte per token of ``NAME.bin``: 1 where the token is a loss target (an assistant token the
    objective counts), 0 elsewhere. The header of a version-2 index is laid out as version 1's.

The ``.idx`` file is renamed into place after the ``.bin`` (and the ``.mask``), so a shard whose index
exists is complete. A dataset folder (see :class:`Dataset`) holds the shards of each split and a manifest,
``dataset.json``, written last; it records the tokenizer (fingerprint, vocabulary size) and, for
each shard, its documents, tokens and largest token id.

Opening a shard checks, without a Python loop over documents, that its offsets rise strictly from 0
to its token count (every document holds at least its EOS) and, given a vocabulary size, that no id
falls outside it. The largest id recorded in the manifest is trusted (the ``.bin`` must have the
size its index and the manifest promise), which spares a pass over the tokens; ``verify=True``
(``hataori data inspect``) takes that pass (``np.max`` over the mapped file, about 11 GB/s from the
page cache), as does a manifest from before the largest id was recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from hataori.errors import HataoriError, InputError
from hataori.fsutil import temp_sibling
from hataori.tokenizer.model import Tokenizer

MAGIC = b"HATAORI\x00"
FORMAT_VERSION = 1
MASKED_VERSION = 2
"""The format version of shards and datasets that carry a loss mask (``NAME.mask``)."""
VERSIONS = (FORMAT_VERSION, MASKED_VERSION)
HEADER = struct.Struct("<8sII32sQQ")
HEADER_BYTES = HEADER.size  # 64
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
MANIFEST = "dataset.json"
SPLITS = ("train", "val")


class ShardError(HataoriError):
    """A shard or dataset that this version of hataori must not read, and why."""


def choose_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """The id dtype for a vocabulary: ``uint16`` when it fits, else ``uint32``.

    ``requested`` is ``auto``, ``uint16`` or ``uint32``; an explicit ``uint16`` with a vocabulary
    of more than 65536 pieces is an error rather than a silent wrap-around.
    """
    if requested == "auto":
        return DTYPES["uint16"] if vocab_size <= 1 << 16 else DTYPES["uint32"]
    if requested not in DTYPES:
        raise ShardError(f"token dtype {requested!r} is not one of auto, uint16, uint32")
    dtype = DTYPES[requested]
    if vocab_size > 1 << (8 * dtype.itemsize):
        raise ShardError(f"a vocabulary of {vocab_size} tokens does not fit in {requested} "
                         f"(ids up to {(1 << (8 * dtype.itemsize)) - 1}); use dtype=uint32 or dtype=auto")
    return dtype


def shard_paths(stem: str | Path) -> tuple[Path, Path]:
    """The ``.bin`` and ``.idx`` paths of the shard named by ``stem`` (with or without suffix)."""
    stem = Path(stem)
    if stem.suffix in (".bin", ".idx", ".mask"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".bin"), stem.with_name(stem.name + ".idx")


def mask_path(stem: str | Path) -> Path:
    """The ``.mask`` path of the shard named by ``stem``."""
    return shard_paths(stem)[0].with_suffix(".mask")


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Write one shard: documents are appended to temporary files, renamed by :meth:`close`.

    ``masked``: the shard carries a loss mask (format version 2), and every :meth:`add` gives one.
    Use as a context manager; leaving it by an exception removes the temporary files.
    """

    def __init__(self, stem: str | Path, dtype: np.dtype, fingerprint: str, masked: bool = False):
        self.bin_path, self.idx_path = shard_paths(stem)
        self.mask_path = mask_path(stem) if masked else None
        self.loss_tokens = 0
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPES.values():
            raise ShardError(f"shard ids must be uint16 or uint32, not {self.dtype}")
        self.fingerprint = fingerprint
        self.limit = 1 << (8 * self.dtype.itemsize)
        self.max_id = -1
        self._offsets = [0]
        self._bin_tmp = temp_sibling(self.bin_path)
        self._idx_tmp = temp_sibling(self.idx_path)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._bin_tmp, "wb")
        self._mask_tmp = temp_sibling(self.mask_path) if masked else None
        self._mask = open(self._mask_tmp, "wb") if masked else None

    @property
    def documents(self) -> int:
        return len(self._offsets) - 1

    @property
    def tokens(self) -> int:
        return self._offsets[-1]

    def add(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append documents given as their concatenated ids (EOS included) and their lengths, and for a
        masked shard the loss mask of every token."""
        if (mask is None) != (self._mask is None):
            raise ValueError("a masked shard takes a mask with every add, and only a masked shard takes one")
        if mask is not None and len(mask) != len(tokens):
            raise ValueError(f"{len(mask)} mask values for {len(tokens)} ids")
        if int(np.sum(lengths)) != len(tokens):
            raise ValueError(f"document lengths sum to {int(np.sum(lengths))}, but {len(tokens)} ids were given")
        if len(lengths) and int(np.min(lengths)) < 1:
            raise ValueError("every document holds at least its EOS, but an empty one was given")
        largest = int(tokens.max()) if len(tokens) else -1
        if largest >= self.limit:
            raise ShardError(f"token id {largest} does not fit in {self.dtype.name}")
        self.max_id = max(self.max_id, largest)
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        if mask is not None:
            self._mask.write(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
            self.loss_tokens += int(np.count_nonzero(mask))
        ends = self._offsets[-1] + np.cumsum(lengths, dtype=np.int64)
        self._offsets.extend(ends.tolist())

    def close(self) -> None:
        """Flush, then rename the ``.bin`` and, last, the ``.idx`` into place."""
        for f in (self._bin, self._mask):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        version = FORMAT_VERSION if self._mask is None else MASKED_VERSION
        header = HEADER.pack(MAGIC, version, self.dtype.itemsize, self.fingerprint.encode("ascii"),
                             self.documents, self.tokens)
        with open(self._idx_tmp, "wb") as f:
            f.write(header)
            f.write(np.asarray(self._offsets, dtype="<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, self.bin_path)
        if self._mask is not None:
            os.replace(self._mask_tmp, self.mask_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        """Remove the temporary files."""
        for f, tmp in ((self._bin, self._bin_tmp), (self._mask, self._mask_tmp)):
            if f is not None:
                with contextlib.suppress(OSError):  # on a full disk, closing fails to flush, and closes all the same
                    f.close()
                tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ----------------------------------------------------------------------------- reading


def read_header(idx_path: Path) -> dict:
    """The header fields of a ``.idx`` file, checked for magic, version and dtype."""
    try:
        with open(idx_path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise InputError(idx_path, "no such shard index; the shard is missing or was never completed "
                         "(rerun `hataori data prepare` with the same arguments to finish it)") from None
    if len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
        raise ShardError(f"{idx_path}: not a hataori shard index (magic {MAGIC!r} expected, found "
                         f"{raw[:8]!r}); point at a folder written by `hataori data prepare`")
    magic, version, itemsize, fingerprint, documents, tokens = HEADER.unpack(raw)
    if version not in VERSIONS:
        raise ShardError(f"{idx_path}: shard format version {version}, but this hataori reads versions "
                         f"{', '.join(map(str, VERSIONS))}; re-encode the corpus with `hataori data prepare` from "
                         "this version")
    if itemsize not in (2, 4):
        raise ShardError(f"{idx_path}: token size {itemsize} bytes in the header (2 or 4 expected); "
                         "the file is damaged, re-encode it")
    return {"version": version, "dtype": DTYPES["uint16" if itemsize == 2 else "uint32"],
            "fingerprint": fingerprint.rstrip(b"\x00").decode("ascii"), "documents": documents, "tokens": tokens}


class Shard:
    """A memory-mapped shard: ``len(shard)`` documents, ``shard[i]`` (or ``doc(i)``) the ids of
    document ``i`` with its EOS, ``shard.tokens`` all ids; a version-2 shard also ``shard.mask`` (one
    byte a token, 1 for a loss target) and ``doc_mask(i)``. Nothing is copied: documents and slices
    of ``tokens`` are read-only views of the mapped file.

    ``fingerprint``, when given, must match the tokenizer fingerprint the shard was written with;
    ``vocab_size``, when given, must exceed every id (see :meth:`check_ids`, which trusts ``max_id``).
    """

    def __init__(self, stem: str | Path, fingerprint: str | None = None, vocab_size: int | None = None,
                 max_id: int | None = None):
        self.bin_path, self.idx_path = shard_paths(stem)
        header = read_header(self.idx_path)
        self.version = header["version"]
        self.dtype: np.dtype = header["dtype"]
        self.fingerprint: str = header["fingerprint"]
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise ShardError(f"{self.idx_path}: encoded with tokenizer fingerprint {self.fingerprint}, but the "
                             f"tokenizer in use has fingerprint {fingerprint}; use the tokenizer the shards were "
                             "made with, or re-encode them with `hataori data prepare --tokenizer ...`")
        self.num_docs: int = header["documents"]
        self.num_tokens: int = header["tokens"]
        expected_idx = HEADER_BYTES + 8 * (self.num_docs + 1)
        if self.idx_path.stat().st_size != expected_idx:
            raise ShardError(f"{self.idx_path}: {self.idx_path.stat().st_size} bytes, but its header promises "
                             f"{self.num_docs} documents ({expected_idx} bytes); the file is damaged, re-encode it")
        if not self.bin_path.is_file():
            raise ShardError(f"{self.bin_path}: missing beside its index; re-encode the shard")
        expected_bin = self.num_tokens * self.dtype.itemsize
        if self.bin_path.stat().st_size != expected_bin:
            raise ShardError(f"{self.bin_path}: {self.bin_path.stat().st_size} bytes, but its index promises "
                             f"{self.num_tokens} tokens of {self.dtype.name} ({expected_bin} bytes); re-encode it")
        self.offsets = np.memmap(self.idx_path, dtype="<i8", mode="r", offset=HEADER_BYTES,
                                 shape=(self.num_docs + 1,))
        if self.num_tokens:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        else:  # numpy cannot map an empty file
            self.tokens = np.empty(0, dtype=self.dtype)
        self.mask: np.ndarray | None = None
        if self.version == MASKED_VERSION:
            path = mask_path(stem)
            if not path.is_file() or path.stat().st_size != self.num_tokens:
                size = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
                raise ShardError(f"{path}: {size}, but its index promises a loss mask of {self.num_tokens} bytes "
                                 "(one a token); the shard is damaged, re-encode it")
            self.mask = (np.memmap(path, dtype=np.uint8, mode="r", shape=(self.num_tokens,)) if self.num_tokens
                         else np.empty(0, dtype=np.uint8))
        falling = np.flatnonzero(self.offsets[1:] <= self.offsets[:-1])
        if self.offsets[0] != 0 or self.offsets[-1] != self.num_tokens or len(falling):
            i = 0 if self.offsets[0] != 0 else int(falling[0]) if len(falling) else max(self.num_docs - 1, 0)
            raise ShardError(f"{self.idx_path}: document {i} has offsets {self.offsets[i:i + 2].tolist()}, but offsets "
                             f"must rise from 0 to {self.num_tokens}, every document holding at least its EOS; the "
                             "file is damaged, re-encode it")
        if vocab_size is not None:
            self.check_ids(vocab_size, max_id)

    def largest_id(self) -> int:
        """The largest token id (one vectorised pass over the mapped tokens); -1 for an empty shard."""
        return int(self.tokens.max()) if self.num_tokens else -1

    def check_ids(self, vocab_size: int, max_id: int | None = None) -> None:
        """Refuse an id outside a vocabulary of ``vocab_size``. ``max_id``, the largest id recorded when the
        shard was written, is trusted when it is in range; otherwise the tokens are read."""
        if max_id is None or max_id >= vocab_size:
            max_id = self.largest_id()
        if max_id < vocab_size:
            return
        position = int(np.argmax(self.tokens >= vocab_size))
        document = int(np.searchsorted(self.offsets, position, side="right")) - 1
        raise ShardError(f"{self.bin_path}: document {document} holds token id {int(self.tokens[position])}, but the "
                         f"tokenizer has {vocab_size} pieces (ids 0 to {vocab_size - 1}); the shard is damaged or was "
                         "encoded with another tokenizer, re-encode it with `hataori data prepare`")

    def __len__(self) -> int:
        return self.num_docs

    def doc(self, i: int) -> np.ndarray:
        """The ids of document ``i``, its EOS last (a view, not a copy)."""
        if not -self.num_docs <= i < self.num_docs:
            raise IndexError(f"document {i} out of range for a shard of {self.num_docs}")
        i %= self.num_docs
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    __getitem__ = doc

    def doc_mask(self, i: int) -> np.ndarray:
        """The loss mask of document ``i`` (a view; a version-2 shard only)."""
        if self.mask is None:
            raise ShardError(f"{self.idx_path}: a shard without loss masks (format version {self.version})")
        i %= self.num_docs
        return self.mask[self.offsets[i]:self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self.num_docs):
            yield self.doc(i)

    def lengths(self) -> np.ndarray:
        """The length of every document in tokens (EOS included)."""
        return np.diff(np.asarray(self.offsets))

    def __repr__(self) -> str:
        return (f"Shard({str(self.bin_path.with_suffix(''))!r}, documents={self.num_docs}, "
                f"tokens={self.num_tokens}, dtype={self.dtype.name}, fingerprint={self.fingerprint})")


# ----------------------------------------------------------------------------- datasets


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


class Dataset:
    """A prepared dataset folder: ``dataset.json`` and the shards of one split, read as one
    sequence of documents (shard by shard, in the order they were written).

    ``fingerprint`` (the tokenizer's), when given, must match the manifest's and every shard's. Every id
    must be below the manifest's vocabulary size: the largest id the manifest records for a shard is
    trusted unless ``verify``, which reads every shard's tokens.
    """

    def __init__(self, path: str | Path, split: str = "train", fingerprint: str | None = None,
                 verify: bool = False):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(manifest_path, "no dataset manifest; prepare the dataset with `hataori data prepare "
                             "--output DIR` (an unfinished prepare writes no manifest: rerun it)") from None
        except json.JSONDecodeError as err:
            raise InputError(manifest_path, f"not valid JSON: {err}") from None
        version = self.manifest.get("format_version")
        if version not in VERSIONS:
            raise ShardError(f"{manifest_path}: dataset format version {version}, but this hataori reads versions "
                             f"{', '.join(map(str, VERSIONS))}; re-encode the corpus with `hataori data prepare`")
        self.masked = version == MASKED_VERSION  # conversations with loss masks (prepared with a chat template)
        self.tokenizer_fingerprint: str = self.manifest["tokenizer"]["fingerprint"]
        if fingerprint is not None and fingerprint != self.tokenizer_fingerprint:
            raise ShardError(f"{self.path}: encoded with tokenizer fingerprint {self.tokenizer_fingerprint}, but "
                             f"{fingerprint} was expected; use the tokenizer the dataset was made with, or "
                             "re-encode it with `hataori data prepare --tokenizer ...`")
        if split not in self.manifest["splits"]:
            raise InputError(manifest_path, f"no split {split!r}; it has {', '.join(self.manifest['splits'])}")
        self.split = split
        self.eos_id: int = self.manifest["tokenizer"]["eos_id"]
        info = self.manifest["splits"][split]
        vocab_size = self.manifest["tokenizer"]["vocab_size"]
        self.shards = [Shard(self.path / entry["name"], self.tokenizer_fingerprint, vocab_size,
                             None if verify else entry.get("max_id")) for entry in info["shards"]]
        for shard, entry in zip(self.shards, info["shards"]):
            if (shard.mask is not None) != self.masked:
                raise ShardError(f"{shard.idx_path}: format version {shard.version} in a dataset of version {version}; "
                                 "the folder mixes two prepares, re-encode it")
            if (shard.num_docs, shard.num_tokens) != (entry["documents"], entry["tokens"]):
                raise ShardError(f"{shard.idx_path}: holds {shard.num_docs} documents and {shard.num_tokens} "
                                 f"tokens, the manifest says {entry['documents']} and {entry['tokens']}; "
                                 "the folder mixes two prepares, re-encode it")
        counts = [len(s) for s in self.shards]
        self._first_doc = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.num_docs = int(self._first_doc[-1])
        self.num_tokens = sum(s.num_tokens for s in self.shards)

    @property
    def fingerprint(self) -> str:
        """A hash of what this split holds: the tokenizer and every shard's counts."""
        shards = [{key: entry[key] for key in ("name", "documents", "tokens")}
                  for entry in self.manifest["splits"][self.split]["shards"]]
        info = {"tokenizer": self.tokenizer_fingerprint, "split": self.split, "shards": shards}
        return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return self.num_docs

    def locate(self, i: int) -> tuple[Shard, int]:
        """The shard holding document ``i`` and the document's index in it."""
        s = int(np.searchsorted(self._first_doc, i, side="right")) - 1
        return self.shards[s], i - int(self._first_doc[s])

    def doc(self, i: int) -> np.ndarray:
        """The ids of document ``i`` of the split, EOS last (a view into the mapped shard)."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range for {self.num_docs} documents")
        shard, j = self.locate(i)
        return shard.doc(j)

    __getitem__ = doc

    def doc_mask(self, i: int) -> np.ndarray:
        """The loss mask of document ``i`` of the split (a view; a masked dataset only)."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range for {self.num_docs} documents")
        shard, j = self.locate(i)
        return shard.doc_mask(j)

    def lookup(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For many documents at once: the shard holding each, its start in that shard's tokens
        and its length (EOS included)."""
        docs = np.asarray(docs, dtype=np.int64)
        shard = np.searchsorted(self._first_doc, docs, side="right") - 1
        local = docs - self._first_doc[shard]
        start = np.empty_like(docs)
        length = np.empty_like(docs)
        for s in np.unique(shard):
            mine = shard == s
            offsets = self.shards[s].offsets
            start[mine] = offsets[local[mine]]
            length[mine] = offsets[local[mine] + 1] - start[mine]
        return shard, start, length

    def lengths(self) -> np.ndarray:
        return np.concatenate([s.lengths() for s in self.shards]) if self.shards else np.empty(0, np.int64)

    def __repr__(self) -> str:
        return (f"Dataset({str(self.path)!r}, split={self.split!r}, documents={self.num_docs}, "
                f"tokens={self.num_tokens}, tokenizer={self.tokenizer_fingerprint})")


# ----------------------------------------------------------------------------- `hataori data inspect`


def add_arguments(parser) -> None:
    parser.add_argument("path", help="a dataset folder (with dataset.json) or one shard (.bin or .idx)")
    parser.add_argument("--tokenizer", help="the tokenizer the data was prepared with (folder or .model): checked "
                        "against the data's fingerprint, and used to decode the documents --show prints")
    parser.add_argument("--show", type=int, default=0, help="print the first N documents of the train split")


def main(args) -> int:
    """Describe a dataset or shard after checking all of it: offsets, every token id, fingerprints."""
    path = Path(args.path)
    tokenizer = None
    if args.tokenizer:
        tokenizer = Tokenizer(args.tokenizer)
    fingerprint = tokenizer.fingerprint if tokenizer else None
    if (path / MANIFEST).is_file():
        docs = Dataset(path, "train", fingerprint, verify=True)
        manifest = docs.manifest
        tok = manifest["tokenizer"]
        print(f"{path}: format version {manifest['format_version']}, ids {manifest['dtype']}, "
              f"tokenizer {tok['fingerprint']} ({tok['path']}, vocab {tok['vocab_size']})")
        for split in manifest["splits"]:
            data = docs if split == "train" else Dataset(path, split, fingerprint, verify=True)
            mean = data.num_tokens / max(1, data.num_docs)
            loss = ""
            if data.masked:
                counted = sum(int(np.count_nonzero(s.mask)) for s in data.shards)
                loss = f", {counted} loss tokens ({counted / max(1, data.num_tokens):.1%})"
            print(f"  {split}: {data.num_docs} documents, {data.num_tokens} tokens "
                  f"({mean:.1f} per document){loss} in {len(data.shards)} shards, fingerprint {data.fingerprint}")
    else:
        docs = Shard(path, fingerprint, tokenizer.vocab_size if tokenizer else None)
        print(repr(docs))
    if args.show:
        for i in range(min(args.show, len(docs))):
            ids = docs.doc(i)
            text = tokenizer.decode(ids[:-1].tolist()) if tokenizer else " ".join(map(str, ids[:64].tolist()))
            print(f"--- document {i} ({len(ids)} tokens)\n{text}")
            if tokenizer and (docs.masked if isinstance(docs, Dataset) else docs.mask is not None):
                mask = docs.doc_mask(i)
                spans = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))  # starts and ends of loss runs
                pieces = [tokenizer.decode(ids[a:b].tolist()) for a, b in zip(spans[::2], spans[1::2])]
                print("--- its loss tokens, run by run: " + " | ".join(repr(p) for p in pieces))
    return 0


def dataset_kind(data: Dataset) -> str:
    """``text``, ``conversations`` (prepared with a chat template, with loss masks) or ``preference`` (pairs
    of conversations, chosen then rejected)."""
    return data.manifest.get("chat", {}).get("kind", "conversations") if data.masked else "text"
