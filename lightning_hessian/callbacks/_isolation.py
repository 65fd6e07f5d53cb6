"""Isolation of an analysis from the training run: everything the run could observe is restored."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import random
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lightning_hessian.operators import preserved_model_state

__all__ = [
    "HeldGenerator",
    "derived_seed",
    "find_held_generators",
    "forked_global_rngs",
    "isolated_training_state",
    "preserved_generators",
]


@contextlib.contextmanager
def isolated_training_state(pl_module: torch.nn.Module, optimizers: Sequence[Any] = ()) -> Iterator[None]:
    """Everything the training run could observe is restored on exit.

    Python ``random``, NumPy and torch (CPU and CUDA) RNG streams; every module's train/eval
    flag, ``requires_grad`` flags and buffers (:func:`~lightning_hessian.preserved_model_state`);
    parameters and ``.grad`` are checked bit for bit, and optimizer state tensors are never
    written (the estimators only read them).
    """
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 - the global legacy RNG training may draw from
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in pl_module.parameters()]
    try:
        with preserved_model_state(pl_module):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002 - the global legacy RNG training may draw from
        for param, grad in grads:
            if grad is None:
                if param.grad is not None:
                    param.grad = None
            elif param.grad is None or not torch.equal(param.grad, grad):
                param.grad = grad


# --------------------------------------------------------------------------------------------
# Random state during the analysis-set read
# --------------------------------------------------------------------------------------------

_MAX_SCAN_DEPTH = 8
_MAX_SCAN_CONTAINER = 256
_LEAF_TYPES = (
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    bool,
    type(None),
    torch.Tensor,
    np.ndarray,
    type,
    types.ModuleType,
)


_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """SplitMix64's finaliser (Steele, Lea, Flood 2014): a bijective 64-bit mix."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derived_seed(seed: int, index: int) -> int:
    """A seed in ``[0, 2**63)`` determined by ``(seed, index)`` alone: two SplitMix64 rounds (~1 us)."""
    return _splitmix64(_splitmix64(int(seed) & _MASK64) ^ (int(index) & _MASK64)) & (2**63 - 1)


class HeldGenerator:
    """A random generator held by a dataset: snapshot, reseed and restore it in place.

    Kinds: ``torch.Generator``, ``numpy.random.Generator``, ``numpy.random.RandomState`` and
    ``random.Random`` (not ``random.SystemRandom``, which has no state).
    """

    KINDS = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)

    def __init__(self, generator: Any, path: str) -> None:
        self.generator = generator
        self.path = path

    def get_state(self) -> Any:
        gen = self.generator
        if isinstance(gen, torch.Generator):
            return gen.get_state()
        if isinstance(gen, np.random.Generator):
            return copy.deepcopy(gen.bit_generator.state)
        if isinstance(gen, np.random.RandomState):
            return gen.get_state()
        return gen.getstate()

    def set_state(self, state: Any) -> None:
        gen = self.generator
        if isinstance(gen, torch.Generator):
            gen.set_state(state)
        elif isinstance(gen, np.random.Generator):
            gen.bit_generator.state = state
        elif isinstance(gen, np.random.RandomState):
            gen.set_state(state)
        else:
            gen.setstate(state)

    def reseed(self, seed: int) -> None:
        gen = self.generator
        if isinstance(gen, torch.Generator):
            gen.manual_seed(seed)
        elif isinstance(gen, np.random.Generator):
            gen.bit_generator.state = type(gen.bit_generator)(seed).state
        elif isinstance(gen, np.random.RandomState):
            gen.seed(seed % 2**32)
        else:
            gen.seed(seed)


def find_held_generators(root: Any) -> tuple[list[HeldGenerator], list[str]]:
    """Random generators reachable from ``root``, and stateful objects that cannot be snapshotted.

    Walks attributes (``__dict__``), containers (up to 256 items), ``functools.partial`` objects
    and function closures (transforms), so ``Subset``/``ConcatDataset``/wrapper datasets and their
    transforms are covered. The second list names Python generators and iterators (a stream whose
    position a read would advance and no state can restore). Returns ``(generators, opaque paths)``.
    """
    seen: set[int] = set()
    found: list[HeldGenerator] = []
    opaque: list[str] = []

    def visit(obj: Any, path: str, depth: int) -> None:
        try:
            inspect(obj, path, depth)
        except Exception:  # noqa: BLE001 - an exotic object (proxy, lazy attribute) is skipped, not fatal
            return

    def inspect(obj: Any, path: str, depth: int) -> None:
        if isinstance(obj, _LEAF_TYPES) or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, HeldGenerator.KINDS):
            if not isinstance(obj, random.SystemRandom):
                found.append(HeldGenerator(obj, path))
            return
        if isinstance(obj, types.GeneratorType) or (isinstance(obj, Iterator) and not isinstance(obj, io.IOBase)):
            opaque.append(path)
            return
        if depth >= _MAX_SCAN_DEPTH:
            return
        if isinstance(obj, Mapping):
            if len(obj) <= _MAX_SCAN_CONTAINER:
                for key, value in list(obj.items()):
                    visit(value, f"{path}[{key!r}]", depth + 1)
            return
        if isinstance(obj, (list, tuple, set, frozenset)):
            if len(obj) <= _MAX_SCAN_CONTAINER:
                for i, value in enumerate(obj):
                    visit(value, f"{path}[{i}]", depth + 1)
            return
        if isinstance(obj, functools.partial):
            visit(obj.func, f"{path}.func", depth + 1)
            visit(obj.args, f"{path}.args", depth + 1)
            visit(obj.keywords, f"{path}.keywords", depth + 1)
            return
        if isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                with contextlib.suppress(ValueError):  # empty cell
                    visit(cell.cell_contents, f"{path}.<closure>", depth + 1)
            return
        if isinstance(obj, types.MethodType):
            visit(obj.__self__, f"{path}.__self__", depth + 1)
            return
        attributes = getattr(obj, "__dict__", None)
        if isinstance(attributes, dict):
            for name, value in list(attributes.items()):
                visit(value, f"{path}.{name}", depth + 1)

    visit(root, type(root).__name__, 0)
    return found, opaque


@contextlib.contextmanager
def forked_global_rngs() -> Iterator[Callable[[int], None]]:
    """Fork Python's, NumPy's and torch's (CPU and initialised CUDA) global RNGs; restore on exit.

    Yields ``reseed(seed)``, which seeds all of them (CUDA only where already initialised, so a
    read never initialises CUDA or queues a lazy seed that training would later see).
    """
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 - the global legacy RNG training may draw from
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def reseed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 - the global legacy RNG training may draw from
        torch.default_generator.manual_seed(seed)
        if cuda_states is not None:
            torch.cuda.manual_seed_all(seed)

    try:
        yield reseed
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002 - the global legacy RNG training may draw from
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def preserved_generators(generators: Sequence[HeldGenerator]) -> Iterator[None]:
    """Snapshot the states of dataset-held generators and restore them on exit."""
    states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for gen, state in zip(generators, states, strict=True):
            gen.set_state(state)
