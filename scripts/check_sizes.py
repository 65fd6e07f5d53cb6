#!/usr/bin/env python3
"""Size and layering rules of the package (run by scripts/check.sh; standard library only).

Sizes (ast-based, docstrings excluded):

* a function or method body may span at most ``MAX_FUNCTION_LINES`` lines: from its first
  statement after the docstring to its last line, minus the lines of nested docstrings;
* a class may span at most ``MAX_CLASS_LINES`` lines, minus the lines of every docstring in it.

Blank lines and comments inside count (they are part of what a reader has to take in).
Exceptions are listed in ``scripts/size_allowlist.txt``, one ``path::Qualified.name  size`` per
line (``#`` comments): an allowlisted unit passes while it is no larger than its recorded size
(it may shrink, not grow); an entry whose unit is now within the limit, or gone, is reported as
stale (remove it). The allowlist is meant to be emptied, not extended.

Layers (``docs/architecture.md``): a module of package ``P`` may import from
``lightning_hessian.Q`` only if ``Q`` is in ``ALLOWED_IMPORTS[P]`` (or ``Q == P``). Imports inside
``if TYPE_CHECKING:`` blocks count too.

Prints every offender as ``path:line: message`` and exits 1 if there is one.

    python scripts/check_sizes.py                 # the package, with the allowlist
    python scripts/check_sizes.py FILE_OR_DIR ... # other paths (allowlist still applied)
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lightning_hessian"
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 300
ALLOWLIST = ROOT / "scripts" / "size_allowlist.txt"

# Which subpackages/modules each part of the package may import (besides itself). Layers, from
# the bottom: _utils, errors, optim_state <- operators <- estimators, volume, signals <- callbacks;
# analysis (offline, reads logs) stands alone. The package's top level, __main__ and cli may import
# anything (they are the public surface).
_BASE = {"_utils", "errors", "optim_state"}
ALLOWED_IMPORTS: dict[str, set[str]] = {
    "_utils": set(),
    "errors": set(),
    "optim_state": set(),
    "operators": _BASE,
    "estimators": _BASE | {"operators"},
    "volume": _BASE | {"operators"},
    "signals": _BASE | {"operators"},
    "callbacks": _BASE | {"operators", "estimators", "volume", "signals"},
    "analysis": {"_utils"},
}
_UNRESTRICTED = {"", "__main__", "cli"}


@dataclass(frozen=True)
class Unit:
    """A function or class: where it is, its qualified name, kind and size."""

    path: str
    line: int
    name: str
    kind: str  # "function" or "class"
    size: int

    @property
    def key(self) -> str:
        return f"{self.path}::{self.name}"

    @property
    def limit(self) -> int:
        return MAX_FUNCTION_LINES if self.kind == "function" else MAX_CLASS_LINES


def _docstring_lines(node: ast.AST) -> set[int]:
    body = getattr(node, "body", None)
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return set()


def _nested_docstring_lines(node: ast.AST) -> set[int]:
    lines: set[int] = set()
    for inner in ast.walk(node):
        if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            lines |= _docstring_lines(inner)
    return lines


def _function_size(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    own_doc = _docstring_lines(node)
    statements = node.body[1:] if own_doc else node.body
    if not statements:
        return 0
    start, end = statements[0].lineno, node.end_lineno or node.lineno
    # decorators of the first statement (a nested function) start before its `def`
    first = statements[0]
    if isinstance(first, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and first.decorator_list:
        start = min(start, *(d.lineno for d in first.decorator_list))
    return len(set(range(start, end + 1)) - _nested_docstring_lines(node))


def _class_size(node: ast.ClassDef) -> int:
    end = node.end_lineno or node.lineno
    return len(set(range(node.lineno, end + 1)) - _nested_docstring_lines(node))


def units(path: Path, display: str) -> Iterator[Unit]:
    """Every function, method and class of a file, with its size."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def visit(node: ast.AST, prefix: str) -> Iterator[Unit]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                yield Unit(display, child.lineno, name, "function", _function_size(child))
                yield from visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                name = prefix + child.name
                yield Unit(display, child.lineno, name, "class", _class_size(child))
                yield from visit(child, name + ".")
            else:
                yield from visit(child, prefix)

    yield from visit(tree, "")


def read_allowlist(path: Path) -> dict[str, int]:
    """``path::name -> recorded size`` (a malformed line is an error naming it)."""
    entries: dict[str, int] = {}
    if not path.is_file():
        return entries
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or "::" not in parts[0] or not parts[1].isdigit():
            raise SystemExit(f"{path}:{number}: expected 'path::Qualified.name SIZE', got {raw!r}")
        entries[parts[0]] = int(parts[1])
    return entries


def _package_part(display: str) -> str | None:
    """``lightning_hessian/<part>/...`` or ``lightning_hessian/<part>.py`` -> part ('' for the top)."""
    parts = Path(display).parts
    if len(parts) < 2 or parts[0] != PACKAGE:
        return None
    if len(parts) == 2:
        stem = Path(parts[1]).stem
        return "" if stem == "__init__" else stem
    return parts[1]


def layer_offences(path: Path, display: str) -> Iterator[str]:
    """Imports that go against :data:`ALLOWED_IMPORTS`."""
    part = _package_part(display)
    if part is None or part in _UNRESTRICTED:
        return
    allowed = ALLOWED_IMPORTS.get(part)
    if allowed is None:
        yield f"{display}:1: package part {part!r} has no entry in ALLOWED_IMPORTS (scripts/check_sizes.py)"
        return
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        modules: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        for module in modules:
            pieces = module.split(".")
            if pieces[0] != PACKAGE:
                continue
            target = pieces[1] if len(pieces) > 1 else ""
            if target != part and target not in allowed:
                can = ", ".join(sorted(allowed)) or "nothing of the package"
                yield f"{display}:{node.lineno}: {part} imports {module} ({part} may import: {can})"


def _python_files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        elif path.suffix == ".py":
            yield path


def _display(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[ROOT / PACKAGE])
    parser.add_argument("--allowlist", type=Path, default=ALLOWLIST)
    args = parser.parse_args(argv)
    allow = read_allowlist(args.allowlist)
    offences: list[str] = []
    notes: list[str] = []
    seen: set[str] = set()
    for path in _python_files(args.paths):
        display = _display(path)
        offences.extend(layer_offences(path, display))
        for unit in units(path, display):
            seen.add(unit.key)
            recorded = allow.get(unit.key)
            what = f"{unit.kind} {unit.name} is {unit.size} lines"
            if recorded is not None:
                if unit.size > recorded:
                    offences.append(f"{unit.path}:{unit.line}: {what}, more than its allowlisted {recorded}")
                elif unit.size <= unit.limit:
                    notes.append(f"{unit.path}:{unit.line}: {what}, within {unit.limit}: remove it from the allowlist")
            elif unit.size > unit.limit:
                offences.append(f"{unit.path}:{unit.line}: {what} (limit {unit.limit}, docstrings excluded)")
    checked = {_display(p) for p in _python_files(args.paths)}
    for key in sorted(allow):
        if key.split("::", 1)[0] in checked and key not in seen:
            notes.append(f"{key}: allowlisted but not found: remove it from the allowlist")
    for note in notes:
        print(f"note: {note}")
    for offence in offences:
        print(offence)
    if offences:
        print(
            f"check_sizes.py: {len(offences)} offender(s): split the unit along its named steps "
            f"(functions <= {MAX_FUNCTION_LINES} lines, classes <= {MAX_CLASS_LINES}), or fix the import",
            file=sys.stderr,
        )
        return 1
    print(f"check_sizes.py: sizes and layers ok ({len(allow)} allowlisted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
