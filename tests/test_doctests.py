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

# Public objects known to carry examples today, by their public path (robust to moving code between
# modules): discovery must keep finding and running them (a broken import or a docstring that lost
# its example would otherwise silently drop them).
_EXPECTED = [
    "lightning_hessian.HessianOperator",
    "lightning_hessian.MatrixOperator",
    "lightning_hessian.hessian_trace",
    "lightning_hessian.top_eigenvalues",
    "lightning_hessian.spectral_density",
    "lightning_hessian.local_volume",
    "lightning_hessian.init_prior_std",
    "lightning_hessian.TraceSharpDropDetector",
    "lightning_hessian.callbacks.HessianMonitor",
    "lightning_hessian.callbacks.LocalVolumeMonitor",
    "lightning_hessian.callbacks.NoisyInputAccuracy",
]


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


def _tested_names() -> set[str]:
    return {test.name for name in _WITH_EXAMPLES for test in _doctests(importlib.import_module(name))}


@pytest.mark.parametrize("public_name", _EXPECTED)
def test_discovery_runs_the_known_examples(public_name: str) -> None:
    module_name, attr = public_name.rsplit(".", 1)
    obj = getattr(importlib.import_module(module_name), attr)
    defined_as = f"{obj.__module__}.{obj.__qualname__}"
    assert defined_as in _tested_names(), f"the docstring examples of {public_name} ({defined_as}) are not run"


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
