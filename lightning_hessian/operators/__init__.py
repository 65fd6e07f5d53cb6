"""Curvature operators: linear maps on the flat parameter space that every estimator consumes.

One concept per module: :mod:`~lightning_hessian.operators.base` (the interface and an explicit
matrix), :mod:`~lightning_hessian.operators.hessian` (the loss Hessian of a model over a data set),
and the shared machinery (micro-batches, the loss wrapper, model-state preservation).
"""

from lightning_hessian.operators._state import derivative_friendly_attention, preserved_model_state
from lightning_hessian.operators.base import CurvatureOperator, MatrixOperator
from lightning_hessian.operators.hessian import HessianOperator

__all__ = [
    "derivative_friendly_attention",
    "CurvatureOperator", "HessianOperator", "MatrixOperator", "preserved_model_state"]
