"""The docstring examples (``>>>``) of every module of ``lightning_hessian`` run and print what they say.

Each module with examples is one test; a failing example fails it with doctest's report (the
example, what it printed, what was expected). The global RNG streams are forked, so examples that
seed torch do not change what other tests draw.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
import random
from types import ModuleType

import numpy as np
import pytest
import torch

import lightning_hessian

_SKIP = {"lightning_hessian.__main__"}  # runs the CLI on import
_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Modules known to carry examples today: the discovery below must keep finding them (a rename or
# a broken import would otherwise silently drop their doctests).
_EXPECTED = {
    "lightning_hessian.trace",
    "lightning_hessian.density",
    "lightning_hessian.eigen",
    "lightning_hessian.volume",
    "lightning_hessian.sharp_drop",
    "lightning_hessian.operators.base",
    "lightning_hessian.operators.hessian",
    "lightning_hessian.callbacks.hessian_monitor",
    "lightning_hessian.callbacks.local_volume_monitor",
}


def _module_names() -> list[str]:
    names = [lightning_hessian.__name__]
    for info in pkgutil.walk_packages(lightning_hessian.__path__, prefix="lightning_hessian."):
        if info.name not in _SKIP:
            names.append(info.name)
    return sorted(names)


def _doctests(module: ModuleType) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    # Only the module's own objects: re-exports are tested where they are defined.
    return [test for test in finder.find(module) if test.examples and _defined_in(test, module)]


def _defined_in(test: doctest.DocTest, module: ModuleType) -> bool:
    return test.filename is None or test.filename == getattr(module, "__file__", None)


_WITH_EXAMPLES = [name for name in _module_names() if _doctests(importlib.import_module(name))]


def test_discovery_finds_the_known_examples() -> None:
    missing = _EXPECTED - set(_WITH_EXAMPLES)
    assert not missing, f"no doctests found any more in {sorted(missing)}"


@pytest.mark.parametrize("module_name", _WITH_EXAMPLES)
def test_docstring_examples(module_name: str) -> None:
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(optionflags=_FLAGS)
    report = io.StringIO()
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 (restoring the legacy global state)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            for test in _doctests(module):
                runner.run(test, out=report.write)
    finally:
        torch.set_num_threads(threads)
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed:\n{report.getvalue()}"
