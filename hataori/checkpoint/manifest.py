"""Checkpoint manifests: what a complete checkpoint holds, checked file by file.

A checkpoint folder ``step_<8 digits>`` is complete when it holds ``manifest.json``: every file's size
and CRC-32, the world size, the run's identity (model shape, tokenizer, LoRA base) and the manifest's
own checksum (:mod:`hataori.checkpoint.checkpointer` writes it last, then renames the folder into place).
:func:`verify` checks a folder against it; :func:`set_aside` renames a damaged one ``step_<N>.damaged``
(never deleted); :func:`remove_incomplete` clears what a killed save or deletion left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

from hataori.errors import HataoriError

INCOMPLETE_SUFFIX = ".incomplete"
DAMAGED_SUFFIX = ".damaged"
DELETING_PREFIX = ".deleting-"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
CHUNK_BYTES = 16 << 20
LORA_BASE = "lora.base"
"""The manifest identity's key of a LoRA run's base fingerprint (the base its checkpoints leave out)."""


class CheckpointDamaged(HataoriError):
    """A checkpoint whose files do not match its manifest."""


def remove_incomplete(folder: Path) -> list[Path]:
    """Delete the folders and files that saves or deletions killed part-way left in ``folder``."""
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            # .incomplete saves, .deleting- folders and temporary files all end up here.
            if not (path.name.endswith(INCOMPLETE_SUFFIX) or path.name.startswith(".")):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_identity(path: Path, manifest: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse to resume checkpoint ``path`` (its ``manifest``) in a run whose ``identity`` differs, saying how."""
    saved = manifest.get("identity", {})
    differences = [f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}"
                   for key, value in identity.items() if saved.get(key, value) != value]
    if differences:
        raise HataoriError(f"{path} was saved by a run that differs from this one:\n  " + "\n  ".join(differences)
                           + "\nresume with the run's own config, or start a new run in another run_dir")


def checksum(path: Path, *, sync: bool = True) -> dict[str, Any]:
    """Size and CRC-32 of a file as read back, after an fsync of it unless not ``sync`` (its data
    reaches the disk, or the shared filesystem, before the checkpoint is marked complete)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        while chunk := f.read(CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint folder ``path``; :class:`CheckpointDamaged` if missing or unreadable."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointDamaged(f"{path / MANIFEST}: missing (a checkpoint is complete only with its manifest; one "
                                "saved before checkpoints had manifests is adopted by `hataori checkpoint verify RUN "
                                "--adopt`)") from None
    except (OSError, ValueError) as err:
        raise CheckpointDamaged(f"{path / MANIFEST}: damaged, unreadable ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointDamaged(f"{path / MANIFEST}: damaged, or not a checkpoint manifest of format {MANIFEST_FORMAT}")
    if manifest.get("crc32") != crc_of(manifest):
        raise CheckpointDamaged(f"{path / MANIFEST}: damaged, its own checksum does not match")
    return manifest


def crc_of(manifest: dict[str, Any]) -> str:
    """The checksum a manifest carries of itself: of its canonical JSON without that field."""
    body = json.dumps({k: v for k, v in manifest.items() if k != "crc32"}, sort_keys=True)
    return f"{zlib.crc32(body.encode()):08x}"


def verify_files(path: Path, manifest: dict[str, Any], names: list[str]) -> list[str]:
    """Problems of the files ``names`` of checkpoint ``path`` against ``manifest`` (sizes first, then checksums)."""
    problems = []
    for name in names:
        expected, file = manifest["files"][name], path / name
        try:
            size = file.stat().st_size
            if size != expected["bytes"]:
                problems.append(f"{file}: {size:,} bytes, the manifest says {expected['bytes']:,}")
            elif (found := checksum(file, sync=False))["crc32"] != expected["crc32"]:
                problems.append(f"{file}: checksum {found['crc32']}, the manifest says {expected['crc32']} "
                                "(the file was changed after it was written)")
        except FileNotFoundError:
            problems.append(f"{file}: missing")
        except OSError as err:
            problems.append(f"{file}: unreadable ({err})")
    return problems


def verify(path: str | os.PathLike) -> list[str]:
    """Problems of one checkpoint folder (an empty list: every file matches its manifest). One process."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except CheckpointDamaged as err:
        return [str(err)]
    return verify_files(path, manifest, sorted(manifest["files"]))


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the complete namespace, keeping every byte; the new path."""
    aside = path.with_name(path.name + DAMAGED_SUFFIX)
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}{DAMAGED_SUFFIX}-{n}")
    os.replace(path, aside)
    return aside


# ----------------------------------------------------------------------------- files


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


RANKED_FILES = (re.compile(r"^rank_(?P<rank>\d{5})\.pt$"),
                re.compile(r"^(?P<bf16>bf16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_00_optim_states\.pt$"),
                re.compile(r"^(?P<bf16>bf16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_00_model_states\.pt$"))
"""The files a checkpoint holds one of per process: hataori's loader and RNG state, and DeepSpeed's ZeRO
optimizer and ZeRO-3 model states."""


def missing_rank_files(path: Path, world_size: int) -> list[str]:
    """The per-process files that ``path``, a checkpoint of ``world_size`` processes, lacks: each rank's of
    every kind it holds one of."""
    missing = []
    for pattern in RANKED_FILES:
        found = {int(m["rank"]): m for p in path.iterdir() if (m := pattern.match(p.name))}
        if not found:
            continue
        example = next(iter(found.values()))
        for rank in sorted(set(range(world_size)) - set(found)):
            digits = f"{rank:05d}" if len(example["rank"]) == 5 and pattern is RANKED_FILES[0] else str(rank)
            missing.append(example.string[:example.start("rank")] + digits + example.string[example.end("rank"):])
    return missing


def delete_checkpoint(path: Path) -> None:
    """Remove a checkpoint folder, renaming it out of the complete namespace first."""
    doomed = path.with_name(f"{DELETING_PREFIX}{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)
