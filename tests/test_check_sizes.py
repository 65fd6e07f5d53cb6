"""scripts/check_sizes.py: the size and layering rule of scripts/check.sh, on made-up files and on the tree."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_sizes", REPO / "scripts" / "check_sizes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_sizes"] = module
    spec.loader.exec_module(module)
    return module


def _function(name: str, statements: int, docstring_lines: int = 0) -> str:
    doc = ['    """Doc.', *["    more."] * docstring_lines, '    """'] if docstring_lines else []
    body = [f"    v{i} = {i}" for i in range(statements - 1)] + ["    return 0"]
    return "\n".join([f"def {name}():", *doc, *body]) + "\n"


def test_function_limit_counts_the_body_without_docstrings(checker, tmp_path: Path, capsys):
    ok = tmp_path / "ok.py"
    ok.write_text(_function("exactly_80", 80, docstring_lines=40))
    assert checker.main([str(ok), "--allowlist", str(tmp_path / "none.txt")]) == 0
    long = tmp_path / "long.py"
    long.write_text(_function("deliberately_long", 81))
    assert checker.main([str(long), "--allowlist", str(tmp_path / "none.txt")]) == 1
    assert "function deliberately_long is 81 lines (limit 80" in capsys.readouterr().out


def test_class_limit_and_methods_are_named_by_their_class(checker, tmp_path: Path, capsys):
    methods = "\n".join(
        "    " + line for i in range(30) for line in _function(f"m{i}", 9).splitlines()
    )  # 30 methods x 10 lines + the class line = 301
    path = tmp_path / "big.py"
    path.write_text('class Big:\n    """Doc."""\n' + methods + "\n")
    assert checker.main([str(path), "--allowlist", str(tmp_path / "none.txt")]) == 1
    out = capsys.readouterr().out
    assert "class Big is 301 lines (limit 300" in out
    assert "Big.m0" not in out  # its methods are short


def test_allowlist_lets_a_unit_shrink_not_grow(checker, tmp_path: Path, capsys):
    path = tmp_path / "long.py"
    path.write_text(_function("listed", 90))
    allow = tmp_path / "allow.txt"
    key = f"{checker._display(path)}::listed"
    allow.write_text(f"# comment\n{key} 95\n")
    assert checker.main([str(path), "--allowlist", str(allow)]) == 0
    allow.write_text(f"{key} 85\n")
    assert checker.main([str(path), "--allowlist", str(allow)]) == 1
    assert "more than its allowlisted 85" in capsys.readouterr().out
    path.write_text(_function("listed", 10))
    assert checker.main([str(path), "--allowlist", str(allow)]) == 0
    assert "remove it from the allowlist" in capsys.readouterr().out


def test_layers_forbid_an_operator_importing_the_callbacks(checker, tmp_path: Path, monkeypatch, capsys):
    package = tmp_path / "lightning_hessian" / "operators"
    package.mkdir(parents=True)
    bad = package / "bad.py"
    bad.write_text(
        "from lightning_hessian.callbacks import HessianMonitor\nfrom lightning_hessian._utils import stats\n"
    )
    monkeypatch.setattr(checker, "ROOT", tmp_path)
    assert checker.main([str(bad), "--allowlist", str(tmp_path / "none.txt")]) == 1
    out = capsys.readouterr().out
    assert "lightning_hessian/operators/bad.py:1: operators imports lightning_hessian.callbacks" in out
    assert ":2:" not in out  # _utils is below operators


def test_the_tree_passes(checker, capsys):
    assert checker.main([]) == 0, capsys.readouterr().out
