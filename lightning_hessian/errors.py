"""Exception types raised by the functional core.

Callbacks catch :class:`HessianComputationError` (the base class) so that a numerical failure
during training becomes a warning and a NaN metric instead of a crash.
"""

from __future__ import annotations

__all__ = [
    "HessianComputationError",
    "NonFiniteHVPError",
    "NonFiniteLossError",
]


class HessianComputationError(RuntimeError):
    """Base class of every numerical failure of a curvature computation."""


class NonFiniteHVPError(HessianComputationError, FloatingPointError):
    """A Hessian-vector product produced NaN or Inf entries.

    Raised by :meth:`lightning_hessian.HessianOperator.matmat` (and everything built on it) so
    that callers can tell a numerical blow-up apart from a programming error.
    """


class NonFiniteLossError(NonFiniteHVPError):
    """The loss itself is NaN or Inf on the analysis data, so no curvature is defined there."""
