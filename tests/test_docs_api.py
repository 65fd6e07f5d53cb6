"""The API reference covers the public API: every ``__all__`` name gets a page, once.

``docs/_apigen.py`` (run by Sphinx at build time) is exercised here without Sphinx: it writes the
page sources into a temporary folder, and every public name must be there under its most public
import path, with the page kind that autodoc needs.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
from pathlib import Path
from types import ModuleType

import pytest

import lightning_hessian

_DOCS = Path(__file__).resolve().parents[1] / "docs"


def _apigen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_apigen_under_test", _DOCS / "_apigen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def api_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("api")
    _apigen().generate(out)
    return out


def _public_modules() -> list[ModuleType]:
    names = [lightning_hessian.__name__]
    for info in pkgutil.walk_packages(lightning_hessian.__path__, prefix="lightning_hessian."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return [importlib.import_module(name) for name in names]


@pytest.mark.parametrize(
    "page",
    [
        "lightning_hessian.callbacks.HessianMonitor",
        "lightning_hessian.callbacks.LocalVolumeMonitor",
        "lightning_hessian.HessianOperator",
        "lightning_hessian.local_volume",
        "lightning_hessian.spectral_density",
        "lightning_hessian.top_eigenvalues",
    ],
)
def test_required_pages_exist(api_dir: Path, page: str) -> None:
    text = (api_dir / f"{page}.rst").read_text()
    obj = getattr(importlib.import_module(page.rsplit(".", 1)[0]), page.rsplit(".", 1)[1])
    kind = "class" if inspect.isclass(obj) else "function"
    assert f".. auto{kind}:: {page}" in text


def test_every_public_name_documented_exactly_once(api_dir: Path) -> None:
    pages = {path.stem: path.read_text() for path in api_dir.glob("*.rst") if path.stem != "index"}

    def identity(name: str, obj: object) -> tuple[str, int]:  # constants: same name and object
        return ("", id(obj)) if inspect.isclass(obj) or inspect.isroutine(obj) else (name, id(obj))

    documented: dict[tuple[str, int], list[str]] = {}
    for name, text in pages.items():
        module_name, attr = name.rsplit(".", 1)
        assert f":: {name}" in text
        obj = getattr(importlib.import_module(module_name), attr)
        documented.setdefault(identity(attr, obj), []).append(name)
    for module in _public_modules():
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            if inspect.ismodule(obj):
                continue
            names = documented.get(identity(attr, obj), [])
            assert len(names) == 1, f"{module.__name__}.{attr} is documented as {names}"


def test_module_pages_link_every_name_and_index_lists_them(api_dir: Path) -> None:
    index = (api_dir / "index.rst").read_text()
    for module in _public_modules():
        public = [name for name in getattr(module, "__all__", []) if not inspect.ismodule(getattr(module, name))]
        page = api_dir / "modules" / f"{module.__name__}.rst"
        if not public:
            assert not page.exists()
            continue
        assert f"modules/{module.__name__}" in index
        text = page.read_text()
        for name in public:
            assert f":py:obj:`{name} <" in text, f"{module.__name__}.{name} missing from its module page"


def test_stale_pages_are_removed(api_dir: Path) -> None:
    stale = api_dir / "lightning_hessian.removed_function.rst"
    stale.write_text("old\n")
    _apigen().generate(api_dir)
    assert not stale.exists()
