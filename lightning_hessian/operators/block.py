r"""Diagonal blocks of a curvature operator: :math:`H_{bb}` over a subset of the parameters.

For a partition :math:`\theta = (\theta_b, \theta_{\bar b})` the diagonal block
:math:`H_{bb} = \nabla^2_{\theta_b} L(\theta)` is the curvature of the loss in the named
parameters with all others held fixed (per-layer spectra, PyHessian issues #9/#10/#13/#14;
Zhang et al. 2024, "Why Transformers Need Adam", compare such per-block spectra).

:func:`restricted_operator` builds the block of a model-backed operator
(:class:`~lightning_hessian.HessianOperator`, :class:`~lightning_hessian.GGNOperator`) *efficiently*:
a copy of the operator differentiates with respect to the block's parameters only, so each
product pushes tangents and gradients of the block alone (the other parameters are constants of
the products), and one block product counts one HVP on the block operator.
:func:`parameter_blocks` resolves the user-facing block specifications (``"modules"``, a mapping
of names or regular expressions) into lists of parameter names.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from torch import nn

from lightning_hessian.operators._products import CompiledProducts, DoubleBackward

__all__ = ["BlockSpec", "module_blocks", "parameter_blocks", "parameter_slices", "restricted_operator"]

BlockSpec = str | Mapping[str, "Sequence[str] | str"]

_Op = TypeVar("_Op")


def _check_names(available: Sequence[str], param_names: Sequence[str] | str) -> list[str]:
    if isinstance(param_names, str):
        raise TypeError(
            "`param_names` must be a list of parameter names, got a single string; "
            f"pass [{param_names!r}] (or use parameter_blocks(...) to resolve a regular expression)."
        )
    names = list(param_names)
    if not names:
        raise ValueError("A block needs at least one parameter name.")
    if len(set(names)) != len(names):
        raise ValueError(f"Duplicate parameter names in the block: {names}.")
    known = set(available)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"Unknown or frozen parameter(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: a block takes "
            f"names of trainable parameters as in model.named_parameters(), e.g. {list(available)[:3]}."
        )
    return names


def restricted_operator(op: _Op, param_names: Sequence[str] | str) -> _Op:
    r"""The diagonal block :math:`H_{bb}` of a model-backed operator, as an operator of the same kind.

    The returned operator shares the model, data (and batch cache), loss, micro-batching,
    precision and ``all_reduce`` of ``op``, but its flat vectors cover the block's parameters only
    (in ``model.parameters()`` order, whatever the order of ``param_names``). Products
    differentiate with respect to the block alone: ``k`` block products cost about ``k``
    products of the block, not of the whole model, and count ``k`` HVPs on the block operator
    (``op``'s counter is not touched).

    Args:
        op: A :class:`~lightning_hessian.HessianOperator` or :class:`~lightning_hessian.GGNOperator`.
        param_names: Names of trainable parameters, as in ``model.named_parameters()``.

    Raises:
        ValueError: An unknown, frozen or duplicated name, or an empty block.
    """
    available = op.parameter_names()  # type: ignore[attr-defined]
    wanted = set(_check_names(available, param_names))
    keep = [i for i, name in enumerate(available) if name in wanted]
    block = copy.copy(op)
    block._names = [op._names[i] for i in keep]  # type: ignore[attr-defined]
    block._params = [op._params[i] for i in keep]  # type: ignore[attr-defined]
    block._numels = [op._numels[i] for i in keep]  # type: ignore[attr-defined]
    offsets = [0]
    for numel in block._numels:  # type: ignore[attr-defined]
        offsets.append(offsets[-1] + numel)
    block._offsets = offsets  # type: ignore[attr-defined]
    block._num_hvps = 0  # type: ignore[attr-defined]
    space = getattr(op, "vector_space", None)
    if space is not None:  # per-parameter probes: the block's own parameters' streams
        block.vector_space = space.restricted(keep) if hasattr(space, "restricted") else None  # type: ignore[attr-defined]
    # The parameters outside the block enter every product as detached constants (no autograd
    # graph through them, no gradient computed for them), on the same path as compute_dtype's
    # cast copies of buffers and frozen parameters.
    kept = set(block._names)  # type: ignore[attr-defined]
    frozen = [(name, p) for name, p in zip(op._names, op._params, strict=True) if name not in kept]  # type: ignore[attr-defined]
    cast_constants = block._constants  # type: ignore[attr-defined]

    def constants_with_fixed_parameters() -> dict[str, Any]:
        constants = cast_constants()
        fixed = {name: p.detach().to(block.dtype) for name, p in frozen if name not in constants}  # type: ignore[attr-defined]
        return {**fixed, **constants}

    block._constants = constants_with_fixed_parameters  # type: ignore[attr-defined]
    # per-operator state that depends on the parameter list: not shared with the parent
    block._session = None  # type: ignore[attr-defined]
    block._double_backward = DoubleBackward()  # type: ignore[attr-defined]
    if getattr(op, "_compiler", None) is not None:
        block._compiler = CompiledProducts(block._wrapper, block._names, block.max_batched_vectors)  # type: ignore[attr-defined]
    return block


def parameter_slices(op: Any) -> dict[str, slice]:
    """Where each parameter's entries sit in ``op``'s flat vectors (by name)."""
    out: dict[str, slice] = {}
    offset = 0
    for name, p in zip(op.parameter_names(), op.parameters(), strict=True):
        out[name] = slice(offset, offset + p.numel())
        offset += p.numel()
    return out


def module_blocks(model: nn.Module) -> dict[str, list[str]]:
    """One block per child module holding trainable parameters.

    Wrappers are looked through: while a module has no trainable parameters of its own and
    exactly one child with trainable parameters (a ``LightningModule`` holding ``self.model``,
    an ``nn.Sequential`` inside it), the child's children are used instead. Trainable parameters
    held directly by the level reached form one more block, named after the parameter.

    Returns:
        ``{child's dotted name: [parameter names]}`` in module order; the blocks partition the
        trainable parameters.
    """
    prefix, module = "", model
    while True:
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        children = [(n, c) for n, c in module.named_children() if any(p.requires_grad for p in c.parameters())]
        if own or len(children) != 1:
            break
        name, module = children[0]
        prefix = f"{prefix}{name}."
    blocks: dict[str, list[str]] = {}
    for name, p in module.named_parameters(recurse=False):
        if p.requires_grad:
            blocks[f"{prefix}{name}"] = [f"{prefix}{name}"]
    for name, child in children:
        names = [f"{prefix}{name}.{n}" for n, p in child.named_parameters() if p.requires_grad]
        blocks[f"{prefix}{name}"] = names
    return blocks


def parameter_blocks(model: nn.Module, spec: BlockSpec) -> dict[str, list[str]]:
    """Resolve a block specification into ``{block name: [trainable parameter names]}``.

    Args:
        model: The model whose trainable parameters are split.
        spec: ``"modules"`` (see :func:`module_blocks`), or a mapping ``block name -> list of
            parameter names`` or ``block name -> regular expression`` (matched with
            ``re.search`` against ``model.named_parameters()`` names; trainable ones only).

    Raises:
        ValueError: An unknown spec string, an unknown/frozen name, an empty block (a regex that
            matches no trainable parameter), or a bad block name.
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(spec, str):
        if spec != "modules":
            raise ValueError(f"`blocks` must be None, 'modules' or a mapping name -> names/regex, got {spec!r}.")
        return module_blocks(model)
    if not isinstance(spec, Mapping):
        raise TypeError(f"`blocks` must be None, 'modules' or a mapping, got {type(spec).__name__}.")
    if not spec:
        raise ValueError("`blocks` mapping is empty.")
    out: dict[str, list[str]] = {}
    for block_name, selector in spec.items():
        if not isinstance(block_name, str) or not block_name or any(c.isspace() for c in block_name):
            raise ValueError(f"Block names must be non-empty strings without spaces, got {block_name!r}.")
        if isinstance(selector, str):
            try:
                pattern = re.compile(selector)
            except re.error as err:
                raise ValueError(f"`blocks[{block_name!r}]` is not a valid regular expression: {err}.") from None
            names = [n for n in trainable if pattern.search(n)]
            if not names:
                raise ValueError(
                    f"`blocks[{block_name!r}]` = {selector!r} matches no trainable parameter; names look like "
                    f"{trainable[:3]}."
                )
        else:
            names = _check_names(trainable, list(selector))
        order = {n: i for i, n in enumerate(trainable)}
        out[block_name] = sorted(names, key=order.__getitem__)
    return out
