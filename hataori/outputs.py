"""One contract for every command that writes an output: a folder, or one file.

    with claim(args.output, "tokenizer", inputs=[model_file], replace=args.replace) as out:
        ...                               # the work, with the output held
        with out.folder() as tmp:         # (or out.file(), or out.mark() for a folder written in place)
            ...                           # write into tmp: renamed over the output when complete

1. **One writer.** :func:`claim` takes the lock ``.NAME.lock`` beside the output (:mod:`hataori.locks`)
   before any work; a second writer is refused with the holder's PID, host and command. A lock whose
   holder died is taken over.
2. **A killed writer leaves nothing.** Its temporary ``.NAME.tmp-*`` beside the output is removed by the
   next claim: under the lock, no live writer owns one.
3. **``--replace`` replaces only what the same kind of command wrote**, recognised by the marker
   ``.hataori-output.json`` that every folder output holds (its kind, the command, hataori's version, the
   time), by the signature of an output written before there was a marker (:data:`LEGACY`), or, for a
   file, by its own contents (an eval results file says its task, scores and model). Never an input of
   the same command or a folder that holds one, never a run folder, a model, another kind's output or a
   user's files: each is refused, naming what is there. An empty folder, or nothing, is written into
   without ``--replace``.
4. **Written whole or not at all** (:func:`hataori.fsutil.atomic_path`): the new output is renamed into
   place when complete, and a replaced one stays until then. A full disk is an error naming the output,
   with nothing half-written left.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from hataori import __version__
from hataori.errors import HataoriError, InputError
from hataori.fsutil import atomic_path, atomic_write_text, disk_full, disk_full_message, fsync_dir
from hataori.locks import Lock, describe
from hataori.locks import claim as claim_lock

MARKER = ".hataori-output.json"
KINDS = {
    "tokenizer": "a tokenizer folder (hataori tokenizer train or extend)",
    "hf-model": "a model folder (hataori export hf)",
    "peft-adapter": "a PEFT adapter folder (hataori export hf --adapter)",
    "dataset": "a dataset folder (hataori data prepare)",
    "corpus": "a corpus folder (hataori corpus)",
    "eval-results": "an eval results file (hataori eval --output)",
    "gpu-check": "a GPU check's results folder (scripts/gpu_check.sh)",
}
"""Each kind of output, as messages name it."""


class OutputBusy(HataoriError):
    """Another live process writes the output."""


def _only(names: Iterable[str], patterns: tuple[str, ...]) -> bool:
    return all(any(fnmatch.fnmatchcase(name, p) for p in patterns) for name in names)


def _legacy_tokenizer(path: Path, names: list[str]) -> bool:
    return "tokenizer.model" in names and _only(names, ("tokenizer.model", "tokenizer.vocab", "config.yaml",
                                                        "summary.json"))


def _legacy_hf_model(path: Path, names: list[str]) -> bool:
    files = ("config.json", "generation_config.json", "model.safetensors.index.json", "model-*-of-*.safetensors",
             "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "README.md")
    return (_only(names, files) and "README.md" in names
            and "trained with hataori" in (path / "README.md").read_text(encoding="utf-8", errors="replace"))


def _legacy_dataset(path: Path, names: list[str]) -> bool:
    return ("dataset.json" in names or ".prepare-plan.json" in names) and _only(
        names, ("dataset.json", ".prepare-plan.json", "*.bin", "*.idx", "*.tmp"))


def _legacy_corpus(path: Path, names: list[str]) -> bool:
    return "manifest.json" in names and _only(names, ("corpus.jsonl", "manifest.json", "debs", "downloads"))


def _legacy_gpu_check(path: Path, names: list[str]) -> bool:
    return "gpu-check.json" in names and _only(names, ("gpu-check.json", "gpu-check.md", "gpu-check.log"))


LEGACY: dict[str, Callable[[Path, list[str]], bool]] = {
    "tokenizer": _legacy_tokenizer, "hf-model": _legacy_hf_model, "dataset": _legacy_dataset,
    "corpus": _legacy_corpus, "gpu-check": _legacy_gpu_check,
}
"""Outputs written before the marker, recognised by their files (a PEFT adapter has no signature of ours)."""


def _eval_results(path: Path) -> bool:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and {"task", "scores", "model"} <= set(found)


FILE_KINDS: dict[str, Callable[[Path], bool]] = {"eval-results": _eval_results}
"""The kinds written as one file, each recognised by its contents."""


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of an output folder, or None."""
    try:
        found = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def what_is(path: Path) -> str:
    """What ``path`` holds, for a refusal: the kind of a hataori output, a run folder, a model, or files."""
    if path.is_file():
        kind = next((k for k, recognise in FILE_KINDS.items() if recognise(path)), None)
        return KINDS[kind] if kind else "a file that no hataori command wrote"
    marker = read_marker(path)
    if marker is not None and marker.get("kind") in KINDS:
        return KINDS[marker["kind"]]
    names = sorted(p.name for p in path.iterdir())
    kind = next((k for k, recognise in LEGACY.items() if recognise(path, names)), None)
    if kind is not None:
        return KINDS[kind]
    if (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file()):
        return "a run folder (config.yaml, checkpoints/)"
    if (path / "config.json").is_file():
        return "a model folder that hataori export hf did not write"
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"files that no hataori command wrote ({shown})"


@dataclass
class Output:
    """A claimed output (see the module docstring): ``path`` held by this process for a ``kind`` command."""

    path: Path
    kind: str
    option: str
    lock: Lock
    is_dir: bool = True
    made: list[Path] = field(default_factory=list)
    """Folders the claim created (the output's parents), removed on release if the command wrote nothing."""

    @property
    def occupied(self) -> bool:
        """Whether the output exists and holds anything (an empty folder does not count)."""
        if self.path.is_dir():
            return any(self.path.iterdir())
        return self.path.exists()

    def ours(self) -> bool:
        """Whether what ``path`` holds was written by a command of this kind."""
        if not self.is_dir:
            return self.path.is_file() and FILE_KINDS[self.kind](self.path)
        if not self.path.is_dir():
            return False
        marker = read_marker(self.path)
        if marker is not None:
            return marker.get("kind") == self.kind
        return LEGACY.get(self.kind, lambda *_: False)(self.path, sorted(p.name for p in self.path.iterdir()))

    def check_replace(self, replace: bool, *, keep: tuple[str, ...] = ()) -> None:
        """Refuse an occupied output unless ``replace`` and it is this kind's (``keep``: entries the command
        keeps in its folder, such as a download cache, which do not make it occupied)."""
        if self.is_dir and self.path.exists() and not self.path.is_dir():
            raise InputError(self.path, f"exists and is not a folder; choose another output folder ({self.option})")
        if not self.is_dir and self.path.is_dir():
            raise InputError(self.path, f"is a folder; {self.option} names a file to write")
        if self.is_dir and self.path.is_dir():
            if all(p.name in (*keep, MARKER) for p in self.path.iterdir()):
                return
        elif not self.occupied:
            return
        there = what_is(self.path)
        if not self.ours():
            why = ("--replace replaces only an earlier output of this kind" if replace
                   else f"--replace would not replace it either: it replaces only {KINDS[self.kind]}")
            raise InputError(self.path, f"holds {there}, not {KINDS[self.kind]}; {why}; choose another {self.option}")
        if not replace:
            raise InputError(self.path, f"holds {there}; pass --replace to replace it (the old output stays until "
                             f"the new one is complete), or choose another {self.option}")

    def marker(self) -> dict[str, Any]:
        return {"kind": self.kind, "command": self.lock.holder.get("command"), "hataori": __version__,
                "written": datetime.datetime.now().isoformat(timespec="seconds")}

    @contextlib.contextmanager
    def folder(self) -> Iterator[Path]:
        """A temporary folder to write the whole output into, marked, and renamed over ``path`` when complete."""
        with atomic_path(self.path, is_dir=True) as tmp:
            yield tmp
            atomic_write_text(tmp / MARKER, json.dumps(self.marker(), indent=1) + "\n")
        self.made.clear()

    @contextlib.contextmanager
    def file(self) -> Iterator[Path]:
        """A temporary file to write the output into, renamed over ``path`` when complete."""
        with atomic_path(self.path) as tmp:
            yield tmp
        self.made.clear()

    def mark(self) -> None:
        """Create the output folder if needed and mark it (for a folder written in place, file by file)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / MARKER, json.dumps(self.marker(), indent=1) + "\n")
        self.made.clear()

    def release(self) -> None:
        self.lock.release()
        for folder in self.made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()

    def __enter__(self) -> Output:
        return self

    def __exit__(self, kind, err, traceback) -> None:
        self.release()
        if err is not None and (why := disk_full(err)) is not None:  # the temporary output is gone already
            raise HataoriError(disk_full_message(self.path, why, self.option)) from None


def claim(path: str | os.PathLike, kind: str, *, option: str = "--output", inputs: Iterable[str | os.PathLike] = (),
          is_dir: bool = True) -> Output:
    """Hold the output ``path`` of a ``kind`` command (see the module docstring): refuse an output that is or
    holds one of the command's ``inputs``, take the writer's lock (or raise :class:`OutputBusy`) and remove
    what killed writers left. What the output holds is checked by :meth:`Output.check_replace`."""
    if kind not in KINDS or (not is_dir and kind not in FILE_KINDS):
        raise ValueError(f"unknown output kind {kind!r}")
    path = Path(path)
    if path.name in ("", ".", ".."):  # "." or "..": the folder's own name, for the lock and temporaries beside it
        path = path.resolve()
    target = path.resolve()
    for item in inputs:
        source = Path(item).resolve()
        if source == target or source.is_relative_to(target):
            raise InputError(path, f"{'is' if source == target else 'holds'} {item}, an input of this command; "
                             f"choose another {option}")
    made = [p for p in (path.resolve().parent, *path.resolve().parent.parents) if not p.exists()]
    lock_path = path.with_name(f".{path.name}.lock")
    lock = claim_lock(lock_path, lambda where, found: OutputBusy(_busy(path, where, found)), what="the output")
    for stale in path.parent.glob(f".{glob_escape(path.name)}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return Output(path, kind, option, lock, is_dir=is_dir, made=made)


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters taken literally."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _busy(path: Path, lock_path: Path, found: dict[str, Any] | None) -> str:
    if found is None:
        return (f"{path} is being written: {lock_path} exists but names no writer yet; if no command writes "
                f"{path}, remove {lock_path} and run again")
    who, stop = describe(found)
    return (f"{path} is being written by {who}\nwait for it to finish or stop it ({stop}); if it is gone (its "
            f"machine crashed), remove {lock_path} and run again")
