"""One preparation for the products of one evaluation: :class:`ProductSession`.

Outside a session every :meth:`HessianOperator.matmat` snapshots the model's state (clones of all
buffers, train/eval flags, RNG), enters its contexts (SDPA math kernel, eval mode, autocast off,
grad on) and casts parameters and constants to the products' dtype, then undoes all of it. None
of that depends on the vectors or the batch, and on small models it costs as much as the
products themselves. Inside ``with op.session():`` it is done once; each product only checks
(by the tensors' in-place version counters, a few integer comparisons) that no buffer was written
and that the parameters are unchanged, restoring or re-preparing where they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Protocol

from torch import Tensor, nn

from lightning_hessian.operators._state import ModelSnapshot, _version


class _SessionOwner(Protocol):
    model: nn.Module

    @property
    def _params(self) -> Sequence[Tensor]: ...

    def _guarded(self) -> contextlib.ExitStack[bool | None]: ...


class ProductSession:
    """The state shared by the products of one evaluation of one operator.

    Enters the operator's full guard (state snapshot, analysis mode, contexts) once; keeps a
    second snapshot of the buffers to restore, after any product, those the product wrote (a
    user ``batch_loss`` that writes buffers leaves no trace on later products); caches the
    prepared inputs (parameters and constants cast to the products' dtype) while the
    parameters' and buffers' version counters are unchanged.
    """

    def __init__(self, op: _SessionOwner) -> None:
        self.op = op
        self._stack: contextlib.ExitStack[bool | None] | None = None
        self._snapshot: ModelSnapshot | None = None
        self._cache: dict[str, tuple[tuple[int | None, ...], Any]] = {}

    def __enter__(self) -> ProductSession:
        stack = self.op._guarded()
        stack.__enter__()
        self._stack = stack
        self._snapshot = ModelSnapshot(self.op.model)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._cache.clear()
        stack, self._stack = self._stack, None
        assert stack is not None
        return stack.__exit__(exc_type, exc, tb)

    def _versions(self) -> tuple[int | None, ...]:
        buffers = self._snapshot.buffers if self._snapshot is not None else []
        return (*(_version(p) for p in self.op._params), *(_version(b) for b, _, _ in buffers))

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()``, computed once while no parameter or buffer changes in place."""
        versions = self._versions()
        hit = self._cache.get(key)
        if hit is not None and hit[0] == versions:
            return hit[1]
        value = build()
        self._cache[key] = (self._versions(), value)
        return value

    @contextlib.contextmanager
    def product(self) -> Iterator[None]:
        """Around one product: restores the buffers it wrote (a no-op when none was)."""
        try:
            yield
        finally:
            if self._snapshot is not None:
                self._snapshot.restore_buffers(trust_versions=True)
