"""Generate the API reference pages from the package's ``__all__`` lists.

Every public module or package of :mod:`lightning_hessian` (no path component starting with ``_``)
that defines ``__all__`` contributes the objects it lists. Each object is documented once, under
its most public name: ``lightning_hessian.X`` before ``lightning_hessian.callbacks.X`` before
``lightning_hessian.estimators.trace.X``. The output is one page per namespace (``api/<namespace>.rst``, a
summary table, under ``api/modules/``) and one page per object (``api/<public name>.rst``). New modules and names (an
``operators/ggn.py``, a ``volume/`` subpackage) appear in the next build without editing a page.

:func:`resolve_reexported` lets docstrings refer to an object by any of its paths (the defining
module's, a re-export, or a bare unique name): Sphinx only knows the documented one.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from typing import Any

PACKAGE = "lightning_hessian"
_SKIP_MODULES = {f"{PACKAGE}.__main__"}

# public name -> documented full name, filled by generate(); aliases for reference resolution.
_ALIASES: dict[str, str] = {}


def _public_modules() -> list[str]:
    package = importlib.import_module(PACKAGE)
    names = [PACKAGE]
    for info in pkgutil.walk_packages(package.__path__, prefix=f"{PACKAGE}."):
        parts = info.name.split(".")
        if any(part.startswith("_") for part in parts) or info.name in _SKIP_MODULES:
            continue
        names.append(info.name)
    # Packages before their modules, shallow before deep: the most public name wins.
    return sorted(names, key=lambda name: (name.count("."), not _is_package(name), name))


def _is_package(name: str) -> bool:
    return hasattr(importlib.import_module(name), "__path__")


def _kind(obj: Any) -> str:
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.isroutine(obj):
        return "function"
    return "data"


def _summary(obj: Any, module_name: str, name: str) -> str:
    """First paragraph of the docstring; for data, of its ``#:`` comment or string after it."""
    if _kind(obj) == "data":
        # A constant has no ``__module__``: look for its documentation comment in every module
        # that binds the name (it is usually defined in a submodule and re-exported).
        doc = next((d for m in [module_name, *_modules_binding(name, obj)] if (d := _attribute_docs(m, name))), "")
    else:
        doc = inspect.getdoc(obj) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ")


def _modules_binding(name: str, obj: Any) -> list[str]:
    found = []
    for module_name in _public_modules() + _private_modules():
        module = importlib.import_module(module_name)
        if getattr(module, name, None) is obj:
            found.append(module_name)
    return found


def _private_modules() -> list[str]:
    package = importlib.import_module(PACKAGE)
    return [
        info.name
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{PACKAGE}.")
        if info.name not in _SKIP_MODULES and any(part.startswith("_") for part in info.name.split("."))
    ]


def _identity(name: str, obj: Any) -> tuple[str, int]:
    """What "the same object" means: classes and functions by identity; constants also by name
    (small ints and interned strings are shared by unrelated constants)."""
    return ("", id(obj)) if inspect.isclass(obj) or inspect.isroutine(obj) else (name, id(obj))


def _attribute_docs(module_name: str, name: str) -> str:
    try:
        from sphinx.pycode import ModuleAnalyzer  # only present where the docs are built

        docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
    except Exception:  # noqa: BLE001 (no Sphinx, no source: the summary is just left empty)
        return ""
    return "\n".join(docs.get(("", name), []))


def _write(path: Path, text: str) -> None:
    """Write only when the content changed, so incremental builds stay incremental."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _object_page(full_name: str, kind: str) -> str:
    title = full_name.rsplit(".", 1)[1]
    lines = [title, "=" * len(title), "", f".. currentmodule:: {full_name.rsplit('.', 1)[0]}", ""]
    lines.append(f".. auto{kind}:: {full_name}")
    if kind in ("class", "exception"):
        lines.append("   :members:")
    return "\n".join(lines) + "\n"


def _namespace_page(module_name: str, entries: list[tuple[str, str, Any, bool]], shadowed: bool) -> str:
    module = importlib.import_module(module_name)
    title = f"``{module_name}``"
    lines = [title, "=" * len(title), "", f".. py:module:: {module_name}"]
    if shadowed:  # ``lightning_hessian.estimators.lanczos`` is also the re-exported function of that name
        lines.append("   :no-index:")
    lines.append("")
    doc = inspect.getdoc(module)
    if doc:
        lines += [doc, ""]
    lines += [".. list-table::", "   :widths: 30 70", ""]
    for name, full_name, obj, _ in entries:
        summary = _summary(obj, module_name, name) or " "
        lines += [f"   * - :py:obj:`{name} <{full_name}>`", f"     - {summary}"]
    new = [full_name for _, full_name, _, is_new in entries if is_new]
    if new:
        lines += ["", ".. toctree::", "   :hidden:", ""]
        lines += [f"   /api/{full_name}" for full_name in new]
    return "\n".join(lines) + "\n"


def generate(out_dir: Path) -> list[str]:
    """Write the API pages into ``out_dir``; returns the namespace pages' names (for the index)."""
    (out_dir / "modules").mkdir(parents=True, exist_ok=True)
    documented: dict[tuple[str, int], str] = {}
    pages: list[str] = []
    written: set[str] = set()
    for module_name in _public_modules():
        module = importlib.import_module(module_name)
        public = getattr(module, "__all__", None)
        if not public:
            continue
        entries = []
        for name in public:
            obj = getattr(module, name)
            full_name = f"{module_name}.{name}"
            if inspect.ismodule(obj):
                continue
            key = _identity(name, obj)
            if key in documented:
                _ALIASES.setdefault(full_name, documented[key])
                entries.append((name, documented[key], obj, False))
                continue
            documented[key] = full_name
            entries.append((name, full_name, obj, True))
            _write(out_dir / f"{full_name}.rst", _object_page(full_name, _kind(obj)))
            written.add(f"{full_name}.rst")
            origin = getattr(obj, "__module__", None)
            qualname = getattr(obj, "__qualname__", None)
            if origin and qualname:
                _ALIASES.setdefault(f"{origin}.{qualname}", full_name)
            _ALIASES.setdefault(name, full_name)
        if entries:
            pages.append(module_name)
            _write(
                out_dir / "modules" / f"{module_name}.rst",
                _namespace_page(module_name, entries, module_name in documented.values()),
            )
            written.add(f"modules/{module_name}.rst")
    index = ["API reference", "=============", "", _INTRO, "", ".. toctree::", "   :maxdepth: 1", ""]
    index += [f"   modules/{page}" for page in pages]
    _write(out_dir / "index.rst", "\n".join(index) + "\n")
    written.add("index.rst")
    for stale in out_dir.rglob("*.rst"):
        if stale.relative_to(out_dir).as_posix() not in written:
            stale.unlink()
    return pages


_INTRO = """\
Generated from the docstrings of every public module's ``__all__``; each object is listed once,
under its most public import path (``from lightning_hessian import HessianOperator``). The
estimators only need a :class:`~lightning_hessian.CurvatureOperator`; the callbacks in
:mod:`lightning_hessian.callbacks` schedule them during training."""


def _alias_target(target: str) -> str | None:
    if target in _ALIASES:
        return _ALIASES[target]
    # An attribute of an aliased object: ``SpectralDensity.trace`` -> ``lightning_hessian.SpectralDensity.trace``.
    head, _, tail = target.rpartition(".")
    while head:
        if head in _ALIASES:
            return f"{_ALIASES[head]}.{target[len(head) + 1 :]}"
        head, _, _ = head.rpartition(".")
    del tail
    return None


def _import_dotted(path: str) -> Any:
    """The object at a dotted path (``pkg.module.Class.attr``), or None."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for part in parts[cut:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None


def _exists_unpublished(node: Any, target: str) -> bool:
    """Whether ``target`` names a real but undocumented object next to the referencing one.

    Docstrings may mention a private helper of their module (``:func:`log_radial_gaussian_integral```)
    or an instance attribute set in ``__init__`` (``:attr:`drop_size```). Those render as code
    without a link; a name that exists nowhere (a typo, a rename) still fails the build.
    """
    name = target.lstrip("~.").rsplit(".", 1)[-1]
    docname = str(node.get("refdoc", ""))
    context = _import_dotted(docname.split("/")[-1]) if docname.startswith("api/") else None
    if context is None:
        return False
    scopes = [context]
    if inspect.isclass(context) or inspect.isfunction(context):
        scopes.append(importlib.import_module(context.__module__))
    for scope in scopes:
        if hasattr(scope, name):
            return True
        if inspect.isclass(scope):
            try:
                source = inspect.getsource(scope)
            except (OSError, TypeError):
                continue
            if re.search(rf"self\.{re.escape(name)}\b", source):
                return True
    return False


def resolve_reexported(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """``missing-reference`` handler: retry a Python reference under the object's documented name."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    new_target = _alias_target(target)
    if new_target is not None and new_target != target:
        domain = env.get_domain("py")
        resolved = domain.resolve_xref(env, node["refdoc"], app.builder, "obj", new_target, node, contnode)
        if resolved is not None:
            return resolved
    local = target.startswith(PACKAGE) or "." not in target.lstrip("~.")
    if local and _exists_unpublished(node, target):
        return contnode
    return None


_ORIGINAL_DOCSTRINGS: dict[str, list[str]] = {}


_PROSE_KINDS = {"property", "data", "attribute"}


def remember_property_docstring(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Before napoleon: keep a property's (or constant's) docstring as written."""
    if what in _PROSE_KINDS:
        _ORIGINAL_DOCSTRINGS[name] = list(lines)


def restore_property_docstring(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """After napoleon: undo its "type: description" reading of a property's first line.

    The code's property and constant docstrings are prose ("Dtype in which products are computed:
    ...", "Default ρ: ..."); the type is the annotation, which autodoc already shows.
    """
    if what in _PROSE_KINDS and name in _ORIGINAL_DOCSTRINGS:
        lines[:] = _ORIGINAL_DOCSTRINGS.pop(name)
