"""``hataori corpus ja-news OUT``: news-style Japanese sentences, for evaluating out of domain.

The Debian corpus is documentation; a tokenizer trained on it is also to be judged on Japanese
of another kind. The PyPI package ``hironsancorpus`` ships 500 encyclopedia/news-style sentences
(world heritage listings, politicians' careers, incidents abroad) as a named-entity corpus, one
morpheme a line with its surface form first. This command fetches its source distribution with
``pip download`` into ``OUT/downloads`` (kept and reused), joins each sentence's surface forms
back into text, keeps sentences with kana, drops exact duplicates, and writes

- ``OUT/corpus.jsonl``: one ``{"text", "source", "path"}`` object a sentence, in corpus order;
- ``OUT/manifest.json``: package, version, license (from its PKG-INFO), counts, SHA-256.

Both are written atomically; a rerun that finds them matching returns at once ("up to date"); an
``OUT`` holding anything else besides ``downloads`` is refused unless ``--replace``.
The text is small (about 26,000 characters, 75 KB): enough to compare tokenizers' characters
per token and unknown rates, not to train on.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from hataori.corpus.output import (CORPUS_FILE, Counts, Deduplicator, corpus_entry, current_manifest, write_document,
                                   write_manifest)
from hataori.errors import HataoriError, InputError
from hataori.fsutil import atomic_path, remove_stale_temps
from hataori.outputs import Output, claim

PACKAGE = "hironsancorpus"
VERSION = "0.1.2"
MEMBER = f"{PACKAGE}-{VERSION}/hironsan/corpus/iob_sents.txt"
MANIFEST_FORMAT = 1


def fetch(downloads: Path) -> Path:
    """The package's source archive in ``downloads``, fetched with pip unless it is there."""
    archive = downloads / f"{PACKAGE}-{VERSION}.tar.gz"
    if archive.is_file():
        return archive
    downloads.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(downloads)
    scratch = Path(tempfile.mkdtemp(prefix=f".{PACKAGE}.tmp-", dir=downloads))
    try:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                 "--no-build-isolation", "-q", "-d", str(scratch), f"{PACKAGE}=={VERSION}"],
                                capture_output=True, text=True, check=False)
        got = scratch / archive.name
        if result.returncode != 0 or not got.is_file():
            detail = " ".join(result.stderr.strip().splitlines()[-2:])
            raise HataoriError(f"package {PACKAGE}=={VERSION}: 'pip download' failed ({detail or 'no archive'}); "
                               "check the network connection to PyPI or pip's index settings")
        os.replace(got, archive)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return archive


def sentences(archive: Path) -> tuple[list[str], str]:
    """The corpus's sentences (surface forms joined) and the license its PKG-INFO declares."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            lines = tar.extractfile(MEMBER).read().decode("utf-8").splitlines()
            info = tar.extractfile(f"{PACKAGE}-{VERSION}/PKG-INFO").read().decode("utf-8")
    except (tarfile.TarError, KeyError, OSError, UnicodeDecodeError) as err:
        raise InputError(archive, f"not the expected {PACKAGE} source archive ({err}); "
                                  "delete it and run again") from None
    found = re.search(r"^License:\s*(.+)$", info, re.M)
    result, words = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            if words:
                result.append("".join(words))
                words = []
            continue
        columns = line.split("\t")
        if len(columns) < 2:
            raise InputError(f"{archive}!/{MEMBER}", "expected tab-separated morpheme columns", line=number)
        words.append(columns[0])
    if words:
        result.append("".join(words))
    return result, found.group(1).strip() if found else "unknown"


def build(out: Path, replace: bool = False) -> tuple[dict, bool]:
    """Build (or find up to date) the corpus in ``out``; returns (manifest, whether it was built). An
    ``out`` holding anything but an up-to-date corpus and the download is refused unless ``replace``."""
    with claim(out, "corpus", option="OUT") as held:
        return _build(out, replace=replace, held=held)


def _build(out: Path, *, replace: bool, held: Output) -> tuple[dict, bool]:
    start = time.monotonic()
    remove_stale_temps(out)
    manifest = current_manifest(out, lambda manifest: (manifest["format"] == MANIFEST_FORMAT
                                                       and manifest["package"]["version"] == VERSION))
    if manifest is not None:
        return manifest, False
    held.check_replace(replace, keep=("downloads",))
    held.mark()
    archive = fetch(out / "downloads")
    texts, license_name = sentences(archive)
    counts = Counts(files=1)
    kept = Deduplicator().keep(texts, counts)
    with atomic_path(out / CORPUS_FILE) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for text in kept:
            write_document(f, text, PACKAGE, MEMBER, counts)
    manifest = {
        "format": MANIFEST_FORMAT,
        "document_unit": "sentence",
        "package": {"name": PACKAGE, "version": VERSION, "registry": "PyPI", "licenses": [license_name],
                    "counts": asdict(counts)},
        "corpus": corpus_entry(out),
        "build_seconds": round(time.monotonic() - start, 2),
    }
    write_manifest(out, manifest)
    return manifest, True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, metavar="OUT",
                        help="folder for corpus.jsonl, manifest.json and the downloaded archive (OUT/downloads)")
    parser.add_argument("--replace", action="store_true",
                        help="replace the corpus of an OUT that holds another one or other files")


def main(args: argparse.Namespace) -> int:
    start = time.monotonic()
    manifest, built = build(args.out, replace=args.replace)
    counts = manifest["package"]["counts"]
    print(f"{args.out / 'corpus.jsonl'}: {'built' if built else 'up to date'}, {counts['bytes'] / 1e3:.0f} KB, "
          f"{counts['documents']:,} sentences, {counts['chars']:,} chars "
          f"(dropped {counts['dropped_no_kana']} without kana, {counts['dropped_duplicates']} duplicates) "
          f"in {time.monotonic() - start:.1f} s")
    return 0
