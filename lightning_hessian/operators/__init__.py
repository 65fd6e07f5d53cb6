"""Curvature operators: linear maps on the flat parameter space that every estimator consumes.

One concept per module: :mod:`~lightning_hessian.operators.base` (the interface and an explicit
matrix), :mod:`~lightning_hessian.operators.hessian` (the loss Hessian of a model over a data set),
:mod:`~lightning_hessian.operators.ggn` (the generalised Gauss-Newton matrix, on the Hessian's
micro-batch machinery), :mod:`~lightning_hessian.operators.block` (diagonal blocks over named
parameters), :mod:`~lightning_hessian.operators.preconditioned` (Adam-preconditioned
:math:`P^{-1/2} H P^{-1/2}`), and the shared machinery (micro-batches, the loss wrapper, model-state preservation).
"""

from lightning_hessian.operators._state import derivative_friendly_attention, preserved_model_state
from lightning_hessian.operators.base import CurvatureOperator, MatrixOperator
from lightning_hessian.operators.block import parameter_blocks, restricted_operator
from lightning_hessian.operators.ggn import GGNOperator
from lightning_hessian.operators.hessian import HessianOperator
from lightning_hessian.operators.preconditioned import PreconditionedOperator, preconditioned_operator

__all__ = [
    "derivative_friendly_attention",
    "CurvatureOperator",
    "GGNOperator",
    "HessianOperator",
    "MatrixOperator",
    "PreconditionedOperator",
    "parameter_blocks",
    "preconditioned_operator",
    "preserved_model_state",
    "restricted_operator",
]
