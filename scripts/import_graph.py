"""The import graph between hataori's folders and modules; exits 1 on a cycle between either.

    python scripts/import_graph.py [--root DIR]
    python -m scripts.import_graph [--root DIR]

Every folder of hataori/ with an ``__init__.py`` is a subpackage (``hataori.NAME``, setup.py's
SUBPACKAGES) and a node of the graph. Each of its ``.py`` files is parsed with ``ast``,
and every import of a hataori module counts: ``import hataori.X...``, ``from hataori.X... import``,
``from hataori import X``, relative imports, and ``importlib.import_module("hataori.X...")`` with a
literal (or an f-string whose literal start names the folder); at module level and inside
functions alike. An edge ``train -> model (12)`` says that 12 import statements of train/ import
model/. Imports inside a folder are no edge.

The modules directly in hataori/ are two nodes:

- ``hataori``: every module of hataori/ itself but cli.py (config, errors, fsutil, locks, outputs,
  precision, sourcespec, ``__init__``), shared by all. Every folder may
  import them; they import no folder.
- ``cli``: hataori/cli.py, the command map. It names the module of each command as a string
  (``COMMANDS``) and imports only the chosen one (``importlib``), so its edges are the module paths
  written in it. It sits above every folder: it may import them all, and nothing may import it.

The check fails (exit 1) on a cycle between nodes, naming the cycle and the files and lines of
every import between its folders; on a cycle between modules (a package's ``__init__`` counts as
the package, and a ``from`` import that names a submodule reaches it), counting the imports inside
functions, which Python's own import never trips over; and on a breach of the two rules above. Otherwise it prints the
direction the graph allows: layers from the top, each importing only from the layers after it.

It also lists the imports of hataori modules made inside functions: they run when the function is
called, not when the module is imported, so Python's own import never trips over a cycle they make.
Some keep ``hataori --help`` and a command's start fast (torch, deepspeed); others only hide an edge.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hataori"
SHARED = "hataori"
"""The node of hataori/'s shared modules (hataori/*.py but cli.py)."""
CLI = "cli"
"""The node of hataori/cli.py."""
MODULE_PATH = re.compile(rf"{PACKAGE}(\.\w+)+")
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


@dataclass(frozen=True)
class Import:
    """One import statement of a hataori module, by the node it reaches."""

    source: str
    """The importing file's node."""
    target: str
    """The imported module's node."""
    module: str
    """The imported module (dotted)."""
    path: str
    """The importing file, relative to the root."""
    line: int
    lazy: bool
    """Inside a function: it runs when the function is called."""
    source_module: str = ""
    """The importing module (dotted; a package's ``__init__`` as the package)."""
    target_module: str = ""
    """The hataori module it reaches: the imported module, or the submodule a ``from`` import names."""

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def subpackages(root: Path) -> list[str]:
    """The folders of ``root``/hataori that are packages."""
    return sorted(p.name for p in (root / PACKAGE).iterdir() if p.is_dir() and (p / "__init__.py").is_file())


def node_of_file(rel: Path) -> str:
    """The node of a file of hataori/, by its path from the root (``hataori/train/zero.py``: train)."""
    if len(rel.parts) == 2:
        return CLI if rel.parts[1] == "cli.py" else SHARED
    return rel.parts[1]


def node_of_module(module: str, folders: set[str]) -> str | None:
    """The node of a dotted module name; None when it is not a hataori module."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) > 1 and parts[1] in folders:
        return parts[1]
    return CLI if parts[1:2] == ["cli"] else SHARED


def package_of(rel: Path) -> list[str]:
    """The dotted package a file's relative imports start from, as its parts."""
    return list(rel.with_suffix("").parts)[:-1]  # a module's package; for __init__.py the package itself


def imported_modules(tree: ast.AST, package: list[str]) -> Iterator[tuple[list[str], int, bool]]:
    """(modules, line, inside a function) of each import statement in ``tree``."""

    def visit(node: ast.AST, lazy: bool) -> Iterator[tuple[list[str], int, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                yield [alias.name for alias in child.names], child.lineno, lazy
            elif isinstance(child, ast.ImportFrom):
                base = package[:len(package) - child.level + 1] if child.level else []
                module = ".".join(base + ([child.module] if child.module else []))
                # from hataori import train, config; from hataori.interop import hf: each name may be a module
                yield [module, *(f"{module}.{alias.name}" for alias in child.names)], child.lineno, lazy
            else:
                if isinstance(child, ast.Call) and (module := dynamic_import(child)):
                    yield [module], child.lineno, lazy
                yield from visit(child, lazy or isinstance(child, FUNCTIONS))

    return visit(tree, False)


def dynamic_import(call: ast.Call) -> str | None:
    """The module of ``importlib.import_module("hataori.X...")`` (or of an f-string's literal start)."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name != "import_module" or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        text = str(arg.values[0].value).rsplit(".", 1)[0]  # "hataori.kernels.{name}": hataori.kernels
    elif isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        text = arg.value
    else:
        return None
    return text if MODULE_PATH.fullmatch(text) else None


def command_modules(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """The module paths written as strings in hataori/cli.py (its command map)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_PATH.fullmatch(node.value):
            yield node.value, node.lineno


def scan(root: Path) -> tuple[list[str], list[Import]]:
    """The nodes (folders, then cli and hataori) and every import of a hataori module among them."""
    folders = subpackages(root)
    known = set(folders)
    files = [p for p in sorted((root / PACKAGE).rglob("*.py")) if "__pycache__" not in p.parts]
    modules_here = {module_of(path.relative_to(root)) for path in files}
    imports = []
    for path in files:
        rel = path.relative_to(root)
        source, source_module = node_of_file(rel), module_of(rel)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
        found = list(imported_modules(tree, package_of(rel)))
        if source == CLI:
            found += [([module], line, False) for module, line in command_modules(tree)]
        for modules, line, lazy in found:
            seen = set()
            for module in [*modules[1:], modules[0]]:  # a from-import's submodules before the module itself
                if module not in modules_here and module != modules[0]:
                    continue  # a name that a from-import takes out of a module, not a submodule
                target = node_of_module(module, known)
                if target is None:
                    continue
                target_module = module
                while target_module not in modules_here and "." in target_module:
                    target_module = target_module.rpartition(".")[0]
                if (target, target_module) not in seen:  # one statement counts once per node and module
                    seen.add((target, target_module))
                    imports.append(Import(source, target, module, rel.as_posix(), line, lazy, source_module,
                                          target_module))
    return [*folders, CLI, SHARED], imports


def module_of(rel: Path) -> str:
    """The dotted module of a file of hataori/ (a package's ``__init__.py``: the package)."""
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def edges_of(imports: list[Import]) -> dict[tuple[str, str], list[Import]]:
    """Imports between folders, one list per (importer, imported) pair."""
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    seen = set()
    for imp in imports:
        if imp.source != imp.target and (imp.path, imp.line, imp.target) not in seen:
            seen.add((imp.path, imp.line, imp.target))
            edges[imp.source, imp.target].append(imp)
    return edges


def module_edges_of(imports: list[Import]) -> dict[tuple[str, str], list[Import]]:
    """Imports between modules, inside functions too, one list per (importer, imported) pair."""
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in imports:
        if imp.source_module != imp.target_module:
            edges[imp.source_module, imp.target_module].append(imp)
    return edges


def cycles(nodes: list[str], edges: dict[tuple[str, str], list[Import]]) -> list[tuple[list[str], set[str]]]:
    """Each strongly connected group of more than one node (Tarjan): (a cycle through it, its nodes)."""
    succ = defaultdict(list)
    for a, b in sorted(edges):
        succ[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in succ[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in nodes:
        if v not in index:
            strongconnect(v)
    return [(cycle_in(group, succ), group) for group in groups]


def cycle_in(group: set[str], succ: dict[str, list[str]]) -> list[str]:
    """A shortest cycle through the first node of ``group`` (breadth-first, inside the group)."""
    start = min(group)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in succ[v]:
                if w == start:
                    cycle = [v]
                    while cycle[-1] != start:
                        cycle.append(came_from[cycle[-1]])
                    return cycle[::-1]
                if w in group and w not in came_from:
                    came_from[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def layers(nodes: list[str], edges: dict[tuple[str, str], list[Import]]) -> list[list[str]]:
    """Nodes by height (an acyclic graph): a node is one above the highest node it imports; top first."""
    succ = defaultdict(set)
    for a, b in edges:
        succ[a].add(b)
    height: dict[str, int] = {}

    def h(v: str) -> int:
        if v not in height:
            height[v] = 1 + max((h(w) for w in succ[v]), default=-1)
        return height[v]

    by_height = defaultdict(list)
    for v in nodes:
        by_height[h(v)].append(v)
    return [sorted(by_height[k]) for k in sorted(by_height, reverse=True)]


def edges_of_lazy(imports: list[Import]) -> list[Import]:
    """The imports made inside functions, one per statement and folder."""
    seen, found = set(), []
    for imp in imports:
        if imp.lazy and (imp.path, imp.line, imp.target) not in seen:
            seen.add((imp.path, imp.line, imp.target))
            found.append(imp)
    return found


def breaches(edges: dict[tuple[str, str], list[Import]]) -> list[tuple[str, list[Import]]]:
    """Imports against hataori/'s rules: the shared modules import no folder, nothing imports cli."""
    found = []
    for (a, b), imps in sorted(edges.items()):
        if a == SHARED:
            found.append((f"hataori/'s shared modules (hataori/*.py but cli.py) import "
                          f"hataori/{b}/: only hataori/cli.py may import the folders; move the code that needs it "
                          "into a folder", imps))
        elif b == CLI:
            found.append((f"hataori/{a}/ imports hataori.cli: the command map sits above every folder; "
                          "import the command's own module instead", imps))
    return found


def report(root: Path, out=sys.stdout) -> int:
    """Print the graph, the allowed direction and the imports inside functions; 1 on a cycle or a breach."""
    nodes, imports = scan(root)
    edges = edges_of(imports)
    found_cycles = cycles(nodes, edges)
    module_edges = module_edges_of(imports)
    module_cycles = cycles(sorted({m for edge in module_edges for m in edge}), module_edges)
    found_breaches = breaches(edges)
    order = [v for layer in layers(nodes, edges) for v in layer] if not found_cycles else nodes
    rank = {v: i for i, v in enumerate(order)}

    print(f"folders of hataori/: {', '.join(n for n in nodes if n not in (CLI, SHARED))}; its own modules as {CLI} "
          f"(cli.py, the command map) and {SHARED} (the modules of hataori/ but cli.py, shared by all)", file=out)
    print("\nimports between folders: importer -> imported (import statements, and how many inside functions)",
          file=out)
    for (a, b) in sorted(edges, key=lambda e: (rank[e[0]], rank[e[1]])):
        imps = edges[a, b]
        lazy = sum(imp.lazy for imp in imps)
        print(f"  {a} -> {b} ({len(imps)}{f', {lazy} inside functions' if lazy else ''})", file=out)

    if not found_cycles:
        print(f"\nallowed direction: each layer imports only from the layers below it ({CLI} may import every "
              f"folder and nothing imports it; every folder may import {SHARED}, which imports none)", file=out)
        for layer in layers(nodes, edges):
            print(f"  {' | '.join(layer)}", file=out)

    print(f"\nmodules of hataori/: {len({m for edge in module_edges for m in edge})} importing one another, "
          f"{'no cycle between them' if not module_cycles else f'{len(module_cycles)} cycles'} "
          "(imports inside functions counted)", file=out)

    lazy = [imp for imp in edges_of_lazy(imports)]
    per_folder = Counter(imp.source for imp in lazy)
    print(f"\nimports of hataori modules inside functions: {len(lazy)} "
          f"({', '.join(f'{n} {per_folder[n]}' for n in nodes if per_folder[n])})", file=out)
    per_file: dict[str, list[Import]] = defaultdict(list)
    for imp in lazy:
        per_file[imp.path].append(imp)
    for path, imps in per_file.items():
        print(f"  {path} ({len(imps)}): " + ", ".join(
            f"{imp.line} {imp.module}{'' if imp.target == imp.source else f' [{imp.target}]'}" for imp in imps),
            file=out)

    print_cycles("CYCLE", found_cycles, edges, out, edge_heading=True)
    print_cycles("CYCLE between modules", module_cycles, module_edges, out, edge_heading=False)
    for message, imps in found_breaches:
        print(f"\nNOT ALLOWED: {message}", file=out)
        for imp in imps:
            print(f"    {imp.where} {imp.module}", file=out)
    return 1 if found_cycles or module_cycles or found_breaches else 0


def print_cycles(title: str, found: list[tuple[list[str], set[str]]], edges: dict[tuple[str, str], list[Import]],
                 out, *, edge_heading: bool) -> None:
    """Each cycle, then every import between its members (under an ``a -> b:`` heading per pair)."""
    for cycle, members in found:
        others = sorted(members - set(cycle))
        print(f"\n{title}: {' -> '.join([*cycle, cycle[0]])}"
              + (f" (and through {', '.join(others)})" if others else ""), file=out)
        for (a, b), imps in sorted(edges.items()):
            if a in members and b in members:
                if edge_heading:
                    print(f"  {a} -> {b}:", file=out)
                for imp in imps:
                    print(f"    {imp.where} {imp.module}{' (inside a function)' if imp.lazy else ''}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    args = parser.parse_args(argv)
    return report(args.root)


if __name__ == "__main__":
    raise SystemExit(main())
