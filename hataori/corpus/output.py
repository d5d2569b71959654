"""What the corpus builders share: their output folder's two files, the manifest check that makes a
rerun a no-op, and paragraph filtering (kana, exact duplicates) with its counts.

- ``OUT/corpus.jsonl`` (:data:`CORPUS_FILE`): one ``{"text", "source", "path"}`` object a line.
- ``OUT/manifest.json`` (:data:`MANIFEST_FILE`): what the builder read, its counts, and the corpus
  file's size and SHA-256 (:func:`corpus_entry`), which :func:`current_manifest` checks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, TextIO

from hataori.corpus.extract import dedup_key, has_kana
from hataori.fsutil import atomic_write_text

CORPUS_FILE = "corpus.jsonl"
MANIFEST_FILE = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Counts:
    """Per-source (and total) counts written to the manifest."""

    files: int = 0
    documents: int = 0
    paragraphs: int = 0
    dropped_no_kana: int = 0
    dropped_duplicates: int = 0
    chars: int = 0
    bytes: int = 0

    def add(self, other: "Counts") -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)


class Deduplicator:
    """Keeps the first copy of each paragraph (by :func:`dedup_key`) and those with kana."""

    def __init__(self):
        self.seen: set[bytes] = set()

    def keep(self, paragraphs: list[str], counts: Counts) -> list[str]:
        kept = []
        for paragraph in paragraphs:
            if not has_kana(paragraph):
                counts.dropped_no_kana += 1
                continue
            key = dedup_key(paragraph)
            if key in self.seen:
                counts.dropped_duplicates += 1
                continue
            self.seen.add(key)
            kept.append(paragraph)
        counts.paragraphs += len(kept)
        return kept


def write_document(f: TextIO, text: str, source: str, path: str, counts: Counts) -> None:
    """One corpus line, counted as a document with its characters and UTF-8 bytes."""
    f.write(json.dumps({"text": text, "source": source, "path": path}, ensure_ascii=False) + "\n")
    counts.documents += 1
    counts.chars += len(text)
    counts.bytes += len(text.encode("utf-8"))


def current_manifest(out: Path, matches: Callable[[dict], bool]) -> dict | None:
    """The manifest in ``out`` when ``matches`` accepts it and the corpus file is the one it describes
    (size and SHA-256); None when either file is missing, unreadable or different."""
    corpus_path, manifest_path = out / CORPUS_FILE, out / MANIFEST_FILE
    if not (corpus_path.is_file() and manifest_path.is_file()):
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        same = (matches(manifest) and manifest["corpus"]["bytes"] == corpus_path.stat().st_size
                and manifest["corpus"]["sha256"] == sha256_file(corpus_path))
    except (ValueError, KeyError, TypeError):
        return None
    return manifest if same else None


def corpus_entry(out: Path) -> dict:
    """The manifest's ``corpus`` entry for the corpus file in ``out``."""
    path = out / CORPUS_FILE
    return {"path": CORPUS_FILE, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
