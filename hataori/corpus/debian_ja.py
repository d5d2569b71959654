"""``hataori corpus debian-ja OUT``: a Japanese corpus from Debian's Japanese documentation packages.

The packages are fetched with ``apt-get download`` into ``OUT/debs`` (kept, and reused while
apt's candidate version is the same) and read with ``dpkg-deb --fsys-tarfile``, so nothing is
installed. In each package only the files that hold its Japanese documentation are read (see
:data:`PACKAGES`; a package not listed there has every man page, HTML/XML and .jar file read),
and from them :mod:`hataori.corpus.extract` takes the paragraphs.

A paragraph is kept when it holds kana and is not an exact duplicate (after NFKC and space
collapsing) of one kept earlier; packages are read in the order given and files in path order, so
the output is the same on every run. **A document is one file**: its kept paragraphs joined by a
blank line (``"\\n\\n"``), which keeps the context a model can learn from. Files left with no
paragraph give no document.

Outputs, both written under a temporary name and renamed when complete:

- ``OUT/corpus.jsonl``: one ``{"text", "source", "path"}`` object a line; ``source`` is the
  package, ``path`` the file inside it (``archive.jar!/member.html`` for a file in an archive).
- ``OUT/manifest.json``: each package's name, version, licenses (from its copyright file) and
  counts, the totals, the corpus file's size and SHA-256, and the build time.

A rerun whose packages, versions and extractor version match the manifest, and whose corpus
file is intact, does nothing and says "up to date"; an ``OUT`` holding anything else besides
``debs`` is refused unless ``--replace``.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import unquote

from hataori.corpus.extract import markup_paragraphs, plain_paragraphs, troff_paragraphs
from hataori.corpus.output import (CORPUS_FILE, Counts, Deduplicator, corpus_entry, current_manifest, write_document,
                                   write_manifest)
from hataori.errors import HataoriError
from hataori.fsutil import atomic_path, remove_stale_temps
from hataori.outputs import Output, claim

MANIFEST_FORMAT = 1
EXTRACTOR_VERSION = 1
"""Bumped whenever extraction changes what a package yields, so that existing corpora are rebuilt."""


@dataclass(frozen=True)
class Selection:
    """Which files of a package are read: any ``include`` pattern matches and no ``exclude`` one."""

    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()

    def wants(self, path: str) -> bool:
        return (any(fnmatch.fnmatchcase(path, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(path, p) for p in self.exclude))


EVERYTHING = Selection(include=("usr/share/man/*", "*.html", "*.htm", "*.xhtml", "*.page", "*.xhp", "*.jar"))

# The Japanese documentation inside each package. Other formats of the same text (PDF, EPUB,
# plain-text renderings, single-page copies of split manuals) are left out so that each text
# is read once.
PACKAGES: dict[str, Selection] = {
    "manpages-ja": Selection(("usr/share/man/ja/*",)),
    "manpages-ja-dev": Selection(("usr/share/man/ja/*",)),
    "libreoffice-help-ja": Selection(("usr/share/libreoffice/help/ja/*.html",)),
    "lilypond-doc-html-ja": Selection(("usr/share/doc/lilypond/html/*.ja.html",), ("*-big-page.ja.html",)),
    "scilab-doc-ja": Selection(("usr/share/scilab/modules/helptools/jar/scilab_ja_JP_help.jar",)),
    "debian-reference-ja": Selection(("usr/share/debian-reference/*.ja.html",)),
    "developers-reference-ja": Selection(("usr/share/developers-reference/ja/*.html",),
                                         ("*/developers-reference.html", "*/search.html", "*/genindex.html")),
    "maint-guide-ja": Selection(("usr/share/doc/maint-guide-ja/html/*.ja.html",)),
    "debian-faq-ja": Selection(("usr/share/doc/debian/FAQ/ja/*.ja.html",)),
    "debian-policy-ja": Selection(("usr/share/doc/debian-policy/ja/policy.html/*.html",),
                                  ("*/search.html", "*/genindex.html", "*/_sources/*", "*/_static/*")),
    "aptitude-doc-ja": Selection(("usr/share/doc/aptitude/html/ja/*.html",)),
    "harden-doc": Selection(("usr/share/doc/harden-doc/html/ja-JP/*.html",)),
    "debian-history": Selection(("usr/share/doc/debian-history/docs/*.ja.html",
                                 "usr/share/doc/debian-history/dedication/*.ja.txt")),
    "tokyocabinet-doc": Selection(("usr/share/doc/tokyocabinet-doc/*-ja.html",
                                   "usr/share/doc/tokyocabinet-doc/*.ja.html")),
    # Larger packages, read when named with --packages (about 145 MB more to download).
    "gimp-help-ja": Selection(("usr/share/gimp/2.0/help/ja/*.html",)),
    "debian-handbook": Selection(("usr/share/doc/debian-handbook/html/ja-JP/*.html",)),
    "installation-guide-amd64": Selection(("usr/share/doc/installation-guide-amd64/ja/*.html",)),
    "debian-edu-doc-ja": Selection(("usr/share/doc/debian-edu-doc-ja/*.html",)),
    "gnome-user-docs": Selection(("usr/share/help/ja/*.page",)),
    "kicad-doc-ja": Selection(("usr/share/doc/kicad/help/ja/*.html",)),
}
DEFAULT_PACKAGES = ("manpages-ja", "manpages-ja-dev", "libreoffice-help-ja", "lilypond-doc-html-ja", "scilab-doc-ja",
                    "debian-reference-ja", "developers-reference-ja", "maint-guide-ja", "debian-faq-ja",
                    "debian-policy-ja", "aptitude-doc-ja", "harden-doc", "debian-history", "tokyocabinet-doc")
"""About 29 MB of downloads."""


# ----------------------------------------------------------------------------- reading a file

MARKUP_SUFFIXES = (".html", ".htm", ".xhtml", ".xhp", ".page", ".xml")
ARCHIVE_SUFFIXES = (".jar", ".zip")


def file_documents(path: str, data: bytes) -> list[tuple[str, list[str]]]:
    """``(path, paragraphs)`` of the documents in one package file; more than one for an archive.

    Unsupported kinds of file, and files whose encoding cannot be worked out, give none.
    """
    name = path
    if name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return []
        name = name[:-3]
    lower = name.lower()
    if lower.endswith(ARCHIVE_SUFFIXES):
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile:
            return []
        documents = []
        for member in sorted(archive.namelist()):
            if member.lower().endswith(MARKUP_SUFFIXES):
                text = decode(archive.read(member))
                if text is not None:
                    documents.append((f"{path}!/{member}", markup_paragraphs(text)))
        return documents
    if "/man/" in f"/{name}" and re.search(r"\.[1-9n][a-z0-9]*$", lower):
        reader = troff_paragraphs
    elif lower.endswith(MARKUP_SUFFIXES):
        reader = markup_paragraphs
    elif lower.endswith((".txt", ".text")):
        reader = plain_paragraphs
    else:
        return []
    text = decode(data)
    return [] if text is None else [(path, reader(text))]


def decode(data: bytes) -> str | None:
    """UTF-8, else the charset an HTML/XML file declares, else EUC-JP; None if none fits."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    declared = re.search(rb"""(?:charset|encoding)\s*=\s*["']?([A-Za-z0-9_.:-]+)""", data[:4096])
    for encoding in ([declared.group(1).decode("ascii")] if declared else []) + ["euc_jp"]:
        try:
            return data.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            continue
    return None


# ----------------------------------------------------------------------------- licenses

_LICENSE_PATTERNS = (
    (r"GNU (?:Library|Lesser) General Public License,? (?:as published [^.]*?)?[Vv]ersion (\d(?:\.\d)?)", "LGPL-{}"),
    (r"GNU General Public License,? (?:as published [^.]*?)?[Vv]ersion (\d(?:\.\d)?)", "GPL-{}"),
    (r"GNU Free Documentation License,? [Vv]ersion (\d\.\d)", "GFDL-{}"),
    (r"Creative Commons Attribution[- ]Share[- ]?Alike (\d\.\d)", "CC-BY-SA-{}"),
    (r"Open Publication License", "OPL"),
    (r"Mozilla Public License,? [Vv]ersion (\d\.\d)", "MPL-{}"),
    (r"/usr/share/common-licenses/(GPL-\d|LGPL-[\d.]+|GFDL-[\d.]+|Apache-2\.0|MPL-[\d.]+|Artistic|BSD)", "{}"),
    (r"Permission is hereby granted, free of charge", "MIT"),
    (r"Redistribution and use in source and binary forms", "BSD"),
    (r"[Pp]ublic [Dd]omain", "public-domain"),
    (r"Permission is granted to make and distribute verbatim copies", "verbatim-copying-permitted"),
    (r"under variet(?:y|ies) of licenses", "per-file (see each file)"),
)


def license_names(copyright_text: str) -> list[str]:
    """License short names of a Debian copyright file, in order of first appearance.

    A machine-readable file (DEP-5) names them in its ``License:`` fields; for a free-form one
    they are recognised from the usual wording. ``unknown`` when neither gives any.
    """
    names: list[str] = []
    if re.search(r"^Format:\s*\S*copyright-format", copyright_text, re.M):
        for value in re.findall(r"^License:[ \t]*(\S[^\n]*)", copyright_text, re.M):
            for name in re.split(r"\s+(?:or|and)\s+|\s*[|,]\s*", value.strip()):
                if name and name not in names:
                    names.append(name)
    if not names:
        found: list[tuple[int, str]] = []
        for pattern, template in _LICENSE_PATTERNS:
            for match in re.finditer(pattern, copyright_text):
                found.append((match.start(), template.format(*match.groups())))
        for _, name in sorted(found):
            if name not in names:
                names.append(name)
    return names or ["unknown"]


# ----------------------------------------------------------------------------- apt


def candidate_versions(names: list[str]) -> dict[str, str | None]:
    """apt's candidate version of each package; None where apt knows none."""
    try:
        result = subprocess.run(["apt-cache", "policy", *names], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return {name: None for name in names}
    versions: dict[str, str | None] = {name: None for name in names}
    current = None
    for line in result.stdout.splitlines():
        header = re.match(r"^(\S+):$", line)
        if header:
            current = header.group(1)
            continue
        candidate = re.match(r"^\s+Candidate:\s*(\S+)", line)
        if candidate and current in versions and candidate.group(1) != "(none)":
            versions[current] = candidate.group(1)
    return versions


def deb_version(deb: Path) -> tuple[str, str]:
    """(package, version) from a .deb's file name, as apt-get download names it."""
    parts = deb.name[: -len(".deb")].split("_")
    return parts[0], unquote(parts[1]) if len(parts) > 1 else ""


def local_debs(debs: Path, name: str) -> dict[str, Path]:
    """version -> file of the .debs of package ``name`` already in ``debs``."""
    found = {}
    for deb in sorted(debs.glob(f"{name}_*.deb")):
        package, version = deb_version(deb)
        if package == name:
            found[version] = deb
    return found


def resolve(names: list[str], debs: Path) -> dict[str, str]:
    """The version to use of each package: apt's candidate, else the .deb already downloaded."""
    candidates = candidate_versions(names)
    versions = {}
    for name in names:
        have = local_debs(debs, name)
        if candidates[name] is not None:
            versions[name] = candidates[name]
        elif len(have) == 1:
            versions[name] = next(iter(have))
        else:
            raise HataoriError(
                f"package {name}: apt knows no version of it{' and several are downloaded' if have else ''}. "
                f"Check the name (apt-cache search {name.split('-')[0]}), and run 'apt-get update' "
                "(as root) so that apt's package lists are current")
    return versions


def fetch(versions: dict[str, str], debs: Path) -> dict[str, Path]:
    """The .deb of each package at its version in ``debs``; those missing are downloaded with one apt-get call."""
    have = {name: local_debs(debs, name) for name in versions}
    missing = [name for name, version in versions.items() if version not in have[name]]
    if missing:
        specs = [f"{name}={versions[name]}" for name in missing]
        scratch = Path(tempfile.mkdtemp(prefix=".download.tmp-", dir=debs))  # removed by remove_stale_temps if killed
        try:
            try:
                result = subprocess.run(["apt-get", "download", "-q", *specs], cwd=scratch,
                                        capture_output=True, text=True, check=False)
            except FileNotFoundError:
                raise HataoriError(f"package {missing[0]}: apt-get is not installed; this command needs Debian's "
                                   "apt (or copy the .deb files into the debs folder yourself)") from None
            got = {deb_version(deb)[0]: deb for deb in scratch.glob("*.deb")}
            failed = [name for name in missing if name not in got]
            if result.returncode != 0 or failed:
                detail = " ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
                names = ", ".join(failed or missing)
                raise HataoriError(
                    f"package {names}: 'apt-get download' failed ({detail or 'no .deb came back'}). Check the "
                    "network connection to the Debian mirror, run 'apt-get update' (as root) so that apt knows "
                    f"the current version, and check the name with 'apt-cache policy {(failed or missing)[0]}'")
            for name, deb in got.items():
                os.replace(deb, debs / deb.name)
                for old_version, old in have[name].items():
                    if old_version != versions[name]:
                        old.unlink(missing_ok=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return {name: local_debs(debs, name)[version] for name, version in versions.items()}


# ----------------------------------------------------------------------------- reading a package


@dataclass
class PackageResult:
    """What one package gave: its documents (before deduplication) and copyright licenses."""

    name: str
    version: str
    licenses: list[str]
    files: int
    documents: list[tuple[str, list[str]]] = field(default_factory=list)


def read_package(name: str, version: str, deb: Path) -> PackageResult:
    """Read the selected files of a .deb (symlinks skipped) and extract their paragraphs."""
    selection = PACKAGES.get(name, EVERYTHING)
    copyright_path = f"usr/share/doc/{name}/copyright"
    wanted: dict[str, bytes] = {}
    copyright_text = ""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                path = member.name.removeprefix("./")
                if path == copyright_path:
                    copyright_text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                elif selection.wants(path):
                    wanted[path] = tar.extractfile(member).read()
    except tarfile.TarError as err:
        proc.kill()
        raise HataoriError(f"package {name}: {deb} is not a readable .deb ({err}); delete it and run again "
                           "to download it afresh") from None
    finally:
        stderr = proc.stderr.read().decode(errors="replace")
        proc.wait()
    if proc.returncode != 0:
        raise HataoriError(f"package {name}: dpkg-deb cannot read {deb} ({stderr.strip()}); delete it and run "
                           "again to download it afresh")
    result = PackageResult(name=name, version=version, licenses=license_names(copyright_text), files=len(wanted))
    for path in sorted(wanted):
        result.documents.extend(file_documents(path, wanted.pop(path)))
    return result


def _read_package_job(args: tuple[str, str, str]) -> PackageResult:
    name, version, deb = args
    return read_package(name, version, Path(deb))


# ----------------------------------------------------------------------------- building


def up_to_date(out: Path, versions: dict[str, str]) -> dict | None:
    """The manifest, when it describes exactly these packages and versions and the corpus is intact."""
    return current_manifest(out, lambda manifest: (
        manifest["format"] == MANIFEST_FORMAT and manifest["extractor_version"] == EXTRACTOR_VERSION
        and [(p["name"], p["version"]) for p in manifest["packages"]] == list(versions.items())))


def build(out: Path, names: list[str], jobs: int = 1, progress: bool = True,
          replace: bool = False) -> tuple[dict, bool]:
    """Build (or find up to date) the corpus in ``out``; returns (manifest, whether it was built). An
    ``out`` holding anything but an up-to-date corpus and the .debs is refused unless ``replace``."""
    with claim(out, "corpus", option="OUT") as held:
        return _build(out, names=names, jobs=jobs, progress=progress, replace=replace, held=held)


def _build(out: Path, *, names: list[str], jobs: int, progress: bool, replace: bool,
           held: Output) -> tuple[dict, bool]:
    start = time.monotonic()
    debs = out / "debs"
    remove_stale_temps(out)
    remove_stale_temps(debs)
    versions = resolve(names, debs)
    manifest = up_to_date(out, versions)
    if manifest is not None:
        return manifest, False
    held.check_replace(replace, keep=(debs.name,))
    held.mark()
    debs.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    bar = tqdm(total=len(names) + 1, desc="debian-ja", unit="step", file=sys.stderr, disable=not progress)
    bar.set_postfix_str("download")
    paths = fetch(versions, debs)
    bar.update()

    jobs_list = [(name, versions[name], str(paths[name])) for name in names]
    if jobs > 1 and len(names) > 1:
        pool = ProcessPoolExecutor(max_workers=min(jobs, len(names)))
        results = pool.map(_read_package_job, jobs_list)
    else:
        pool = None
        results = map(_read_package_job, jobs_list)

    dedup = Deduplicator()
    entries, totals = [], Counts()
    corpus_path = out / CORPUS_FILE
    try:
        with atomic_path(corpus_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for result in results:  # in the order of ``names``, whatever order the workers finish in
                counts = Counts(files=result.files)
                for path, paragraphs in result.documents:
                    kept = dedup.keep(paragraphs, counts)
                    if not kept:
                        continue
                    write_document(f, "\n\n".join(kept), result.name, path, counts)
                totals.add(counts)
                entries.append({"name": result.name, "version": result.version, "licenses": result.licenses,
                                "counts": asdict(counts)})
                bar.set_postfix_str(f"read {result.name}")
                bar.update()
            f.flush()
            os.fsync(f.fileno())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()

    manifest = {
        "format": MANIFEST_FORMAT,
        "extractor_version": EXTRACTOR_VERSION,
        "document_unit": "file: its kept paragraphs joined by a blank line",
        "packages": entries,
        "totals": asdict(totals),
        "corpus": corpus_entry(out),
        "build_seconds": round(time.monotonic() - start, 2),
    }
    write_manifest(out, manifest)
    return manifest, True


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, metavar="OUT",
                        help="folder for corpus.jsonl, manifest.json and the downloaded .debs (OUT/debs)")
    parser.add_argument("--packages", default="default",
                        help="comma-separated package names, 'default' (%(default)s: "
                             f"{len(DEFAULT_PACKAGES)} packages, ~29 MB of downloads) or 'all' "
                             f"({len(PACKAGES)} packages, ~175 MB); 'default,gimp-help-ja' adds to the default")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="packages read in parallel (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--replace", action="store_true",
                        help="replace the corpus of an OUT that holds another one or other files")


def package_list(spec: str) -> list[str]:
    """The package names a --packages value stands for, without repeats, in order."""
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        group = DEFAULT_PACKAGES if item == "default" else tuple(PACKAGES) if item == "all" else (item,)
        for name in group:
            if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", name):
                raise HataoriError(f"--packages: {name!r} is not a Debian package name; give names like "
                                   "manpages-ja separated by commas, or 'default' or 'all'")
            if name not in names:
                names.append(name)
    return names


def main(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise HataoriError(f"--jobs must be at least 1, got {args.jobs}")
    if shutil.which("dpkg-deb") is None:
        raise HataoriError("dpkg-deb is not installed; this command reads Debian packages and needs dpkg")
    names = package_list(args.packages)
    start = time.monotonic()
    manifest, built = build(args.out, names, jobs=args.jobs, progress=not args.quiet, replace=args.replace)
    totals = manifest["totals"]
    state = "built" if built else "up to date"
    print(f"{args.out / 'corpus.jsonl'}: {state}, {manifest['corpus']['bytes'] / 1e6:.1f} MB, "
          f"{totals['documents']:,} documents, {totals['paragraphs']:,} paragraphs, {totals['chars']:,} chars "
          f"from {len(manifest['packages'])} packages "
          f"(dropped {totals['dropped_no_kana']:,} without kana, {totals['dropped_duplicates']:,} duplicates) "
          f"in {time.monotonic() - start:.1f} s")
    return 0
