"""requirements.lock: every package the main job and the test suite install, at the versions the suite passed with.

    python scripts/requirements_lock.py python [LOCK]        exit 2 unless this Python is the lock's (M.N)
    python scripts/requirements_lock.py version NAME [LOCK]  print NAME's locked version
    python scripts/requirements_lock.py check [LOCK]         exit 1 unless this environment holds the lock exactly
    python scripts/requirements_lock.py freeze [LOCK]        write this environment's packages as the lock

scripts/setup.sh installs the lock into .venv (``pip install -r``, its build dependencies constrained by it
too) and checks it with ``check``; scripts/lock.sh makes a new one from the newest versions setup.py's ranges
allow, after the whole suite passed with them. The lock is a pip requirements file: a header of ``# key:
value`` lines (the Python and platform it was made on, the date, the command), then one ``name==version`` a
package, names normalised (PEP 503) and sorted. hataori itself is not in it. A version's local label is
dropped (``torch==2.13.0`` for ``2.13.0+cpu``), so a CUDA build of the same release satisfies it too.

Standard library only: setup.sh runs it with the system's Python before any package is installed.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = Path(os.environ.get("HATAORI_LOCK") or ROOT / "requirements.lock")
"""The lock read and written when no path is given: requirements.lock, or the file HATAORI_LOCK names
(scripts/lock.sh names its candidate so while the suite checks it)."""
SELF = "hataori"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")
HEADER = """\
# Every package that `bash scripts/setup.sh` installs for the main job and the test suite, at the versions the
# whole suite passed with; setup.py keeps ranges for installs into other environments. Made by
# `bash scripts/lock.sh` (newest versions within setup.py's ranges, suite run, then written): edit nothing by
# hand but the torch line (lock.sh keeps torch at the version written here).
"""


class LockError(Exception):
    """A lock that cannot be read, or an environment or Python that does not match it."""


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares it: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """``version`` without its local label: ``2.13.0+cpu`` is ``2.13.0``."""
    return version.split("+", 1)[0]


def read(path: Path = LOCK) -> tuple[dict[str, str], dict[str, str]]:
    """(header fields, {normalised name: version}) of the lock at ``path``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LockError(f"{path}: no such lock; make one with `bash scripts/lock.sh`") from None
    fields, pins = {}, {}
    for number, line in enumerate(lines, 1):
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if sep and key.strip().isidentifier():
                fields[key.strip()] = value.strip()
            continue
        if not line.strip():
            continue
        match = PIN.match(line.strip())
        if match is None:
            raise LockError(f"{path}:{number}: {line.strip()!r} is not a name==version pin; make the lock anew "
                            "with `bash scripts/lock.sh`")
        name = normalise(match[1])
        if name in pins:
            raise LockError(f"{path}:{number}: {name} is pinned twice")
        pins[name] = match[2]
    if "python" not in fields:
        raise LockError(f"{path}: no '# python: M.N' line; make the lock anew with `bash scripts/lock.sh`")
    return fields, pins


def installed() -> dict[str, str]:
    """{normalised name: version} of this environment's distributions, hataori aside."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and normalise(name) != SELF:
            found.setdefault(normalise(name), dist.version)
    return found


def python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def platform_tag() -> str:
    return f"{platform.python_implementation()} {platform.system()} {platform.machine()}"


def check_python(path: Path = LOCK) -> None:
    """Refuse a Python of another major.minor than the lock's: its pins may have no wheels for it."""
    fields, _ = read(path)
    if fields["python"] != python_tag():
        raise LockError(
            f"{path} was made with Python {fields['python']} ({fields.get('platform', '?')}), this is Python "
            f"{python_tag()} ({sys.executable}): run with PYTHON=python{fields['python']} (and remove a .venv made "
            f"with another Python), or install from setup.py's ranges with HATAORI_UNLOCKED=1")


def differences(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    """What ``have`` (an environment) lacks or holds at another version than ``pins`` (a lock)."""
    found = []
    for name, version in sorted(pins.items()):
        if name not in have:
            found.append(f"{name}=={version} is not installed")
        elif public(have[name]) != version:
            found.append(f"{name} is {have[name]}, the lock says {version}")
    found += [f"{name} {have[name]} is installed but not locked" for name in sorted(set(have) - set(pins))]
    return found


def render(have: dict[str, str], command: str) -> str:
    """The lock text of an environment holding ``have``."""
    fields = {"python": python_tag(), "platform": platform_tag(), "made": datetime.date.today().isoformat(),
              "command": command}
    return (HEADER + "".join(f"# {key}: {value}\n" for key, value in fields.items())
            + "".join(f"{name}=={public(version)}\n" for name, version in sorted(have.items())))


def freeze(path: Path = LOCK, command: str = "bash scripts/lock.sh") -> list[str]:
    """Write this environment as the lock at ``path`` (a temporary file renamed over it); the lines that
    changed from the lock there before, as ``name old -> new``."""
    have = installed()
    try:
        _, before = read(path)
    except LockError:
        before = {}
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as out:
        out.write(render(have, command))
    os.replace(out.name, path)
    now = {name: public(version) for name, version in have.items()}
    if not before:
        return [f"{len(now)} packages locked"]
    return [f"{name} {before.get(name, '(new)')} -> {now.get(name, '(gone)')}"
            for name in sorted(set(before) | set(now)) if before.get(name) != now.get(name)]


def main(argv: list[str]) -> int:
    usage = __doc__.split("\n\n")[1]
    if not argv or argv[0] not in ("python", "version", "check", "freeze"):
        print(f"usage:\n{usage}", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "version":
            if not rest:
                print(f"usage:\n{usage}", file=sys.stderr)
                return 2
            path = Path(rest[1]) if len(rest) > 1 else LOCK
            pins = read(path)[1]
            if normalise(rest[0]) not in pins:
                raise LockError(f"{path}: {rest[0]} is not locked")
            print(pins[normalise(rest[0])])
            return 0
        path = Path(rest[0]) if rest else LOCK
        if command == "python":
            check_python(path)
        elif command == "check":
            found = differences(read(path)[1], installed())
            if found:
                print(f"{sys.prefix} does not hold {path}'s versions:\n  " + "\n  ".join(found)
                      + "\nrun `bash scripts/setup.sh` (or make a new lock with `bash scripts/lock.sh`)",
                      file=sys.stderr)
                return 1
        else:
            changed = freeze(path)
            print(f"{path}: " + ("; ".join(changed) if changed else "no version changed"))
    except LockError as err:
        print(f"requirements_lock: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
