"""What checksumming a checkpoint costs: seconds per GB when a save completes (read back, fsync and
CRC-32 of files just written) and when a resume verifies (read and CRC-32 of files on disk).

    python benchmarks/checkpoint_checksum.py [--dir DIR] [--gb 2] [--files 4]

Writes ``--files`` files of random bytes, ``--gb`` GB in all, into ``DIR`` (default: a temporary
folder on the same disk as /tmp), then times :func:`hataori.checkpoint.checkpointer.checksum` over them
three ways: just after writing (what :meth:`Checkpointer.save` does: the fsync flushes the dirty
pages to the disk, so this includes the disk's write speed); again with the files in the page cache
(a resume soon after a save); and after dropping the page cache where that is allowed (root on
Linux: a resume on a fresh node, limited by the disk's read speed). One process; a save or resume
on N processes shares the files among them. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

from hataori.checkpoint.manifest import checksum


def timed(paths: list[Path], *, sync: bool) -> float:
    began = time.perf_counter()
    for path in paths:
        checksum(path, sync=sync)
    return time.perf_counter() - began


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="where to write the files (default: a temporary folder)")
    parser.add_argument("--gb", type=float, default=2.0, help="total size in GB (10^9 bytes)")
    parser.add_argument("--files", type=int, default=4)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="checksum-", dir=args.dir))
    try:
        size = int(args.gb * 1e9 / args.files)
        block = os.urandom(64 << 20)
        paths = []
        for i in range(args.files):
            path = folder / f"part{i}.bin"
            with open(path, "wb") as f:
                for start in range(0, size, len(block)):
                    f.write(block[:min(len(block), size - start)])
            paths.append(path)
        total = size * args.files / 1e9
        rows = [("save: just written (fsync + read + CRC-32)", timed(paths, sync=True)),
                ("resume: in the page cache (read + CRC-32)", timed(paths, sync=False))]
        if drop_page_cache():
            rows.append(("resume: from the disk (page cache dropped)", timed(paths, sync=False)))
        best = float("inf")
        for _ in range(5):  # the best of 5 passes over one block
            began = time.perf_counter()
            zlib.crc32(block)
            best = min(best, time.perf_counter() - began)
        rows.append(("CRC-32 alone, in memory", best * total * 1e9 / len(block)))
        print(f"{total:.2f} GB in {args.files} files under {folder.parent}")
        print(f"{'':45s} {'s per GB':>9s} {'GB/s':>7s}")
        for name, seconds in rows:
            print(f"{name:45s} {seconds / total:9.3f} {total / seconds:7.2f}")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
