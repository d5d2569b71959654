"""``hataori checkpoint verify``: a run's checkpoints against their manifests, without loading them.

``--adopt`` first writes manifests for complete checkpoints saved before hataori wrote them (trusting
their files as they are now), and refuses one that lacks a rank's files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hataori.checkpoint.layout import CHECKPOINTS, COMPLETE
from hataori.checkpoint.manifest import (INCOMPLETE_SUFFIX, MANIFEST, MANIFEST_FORMAT, checksum, crc_of,
                                         missing_rank_files, read_manifest, verify)
from hataori.checkpoint.states import CheckpointWeights
from hataori.errors import InputError
from hataori.fsutil import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run folder (its checkpoints/ are checked) or one step_N folder")
    parser.add_argument("--adopt", action="store_true",
                        help="write a manifest for complete checkpoints that have none (saved before checkpoints had "
                             "manifests), trusting their files as they are now")


def adopt(path: Path) -> None:
    """Write the manifest of a checkpoint saved without one, from its files as they are now."""
    world_size = CheckpointWeights(path).client_state.get("world_size")
    if world_size is None:
        raise InputError(path, "records no world size; it is not a checkpoint hataori saved")
    missing = missing_rank_files(path, world_size)
    if missing:
        raise InputError(path, f"was saved by {world_size} processes but has no {', '.join(missing[:4])}"
                         f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}: a manifest would vouch for a "
                         "checkpoint that cannot be resumed; restore the files, or move the folder away so that "
                         "resuming falls back to the checkpoint before it")
    files = {str(p.relative_to(path)): checksum(p) for p in sorted(path.rglob("*")) if p.is_file()}
    manifest = {"format": MANIFEST_FORMAT, "step": int(COMPLETE.match(path.name).group(1)), "world_size": world_size,
                "identity": {}, "files": files}
    manifest["crc32"] = crc_of(manifest)
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def main(args: argparse.Namespace) -> int:
    import time

    run = Path(args.run)
    if run.name.startswith("step_"):
        paths = [run]
    else:
        folder = run / CHECKPOINTS
        if not folder.is_dir():
            raise InputError(run, "no checkpoints/ folder here; pass a run folder or a checkpoints/step_N folder")
        # Complete and set-aside checkpoints; not a save in progress (.incomplete).
        paths = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_")
                       and not p.name.endswith(INCOMPLETE_SUFFIX))
        if not paths:
            raise InputError(folder, "holds no checkpoint")
    bad = aside = 0
    for path in paths:
        complete = bool(COMPLETE.match(path.name))
        if args.adopt and complete and not (path / MANIFEST).exists():
            adopt(path)
            print(f"{path}: had no manifest; one was written from its files as they are now")
        began = time.perf_counter()
        problems = verify(path)
        seconds = time.perf_counter() - began
        if problems:
            bad += complete
            aside += not complete
            print(f"{path}: DAMAGED" + ("" if complete else " (set aside)")
                  + "".join(f"\n  {problem}" for problem in problems))
            continue
        files = read_manifest(path)["files"]
        size = sum(entry["bytes"] for entry in files.values())
        note = "" if complete else " (set aside; rename it to step_N to use it again)"
        print(f"{path}: verified, {len(files)} files, {size / 1e6:,.1f} MB in {seconds:.2f} s{note}")
    checked = sum(bool(COMPLETE.match(p.name)) for p in paths)
    print(f"{checked - bad} of {checked} checkpoints verified" + (f"; {aside} set aside as damaged" if aside else ""))
    return 1 if bad else 0
