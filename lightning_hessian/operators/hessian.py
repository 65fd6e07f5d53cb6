"""Hessian-vector products of a model's mean loss: :class:`HessianOperator`."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_hessian.errors import HessianComputationError, NonFiniteHVPError, NonFiniteLossError
from lightning_hessian.operators._backend import Backend, BackendSelector, check_backend
from lightning_hessian.operators._batches import (
    BatchLossFn,
    LossFn,
    _cast_floats,
    _default_batch_size,
    _LossModule,
    _move,
    _nbytes,
)
from lightning_hessian.operators._products import CompiledProducts, DoubleBackward, func_products
from lightning_hessian.operators._session import ProductSession
from lightning_hessian.operators._state import _analysis_mode, preserved_model_state
from lightning_hessian.operators.base import _check_matrix, _matvec_via_matmat
from lightning_hessian.operators.finite_difference import (
    FiniteDifferenceState,
    central_difference_products,
    fd_relative_error,
    unit_columns,
)

__all__ = ["Backend", "HessianOperator"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
# Finite differences: a measured relative error above this warns once per operator.
_FD_WARN_ERROR = 1e-2


class HessianOperator:
    r"""Hessian of a model's size-weighted mean loss over a data set, as a linear operator.

    Represents :math:`H = \nabla^2_\theta L(\theta)` with
    :math:`L(\theta) = \sum_b \frac{|b|}{N} \ell_b(\theta)`, where :math:`\ell_b` is the mean
    loss of micro-batch :math:`b` of ``data`` and :math:`\theta` are the trainable parameters
    (``requires_grad=True``) in ``model.parameters()`` order (METHODS.md §0). Products are
    accumulated over micro-batches, so memory is bounded by one batch.

    HVPs are computed by forward-over-reverse differentiation (``torch.func.jvp`` of
    ``torch.func.grad`` through ``functional_call``), several vectors at once with
    ``torch.func.vmap``, or by double backward (``torch.autograd.grad(create_graph=True)``).
    ``backend="auto"`` times both paths on the first micro-batch of the first product of each
    width (number of vectors) it meets and keeps the faster for that width (the timed products
    are used as that batch's products; the choice is logged once at INFO level on the
    ``lightning_hessian`` logger and exposed by :meth:`backend_for` / :attr:`backend_choices`);
    where forward-mode AD is unsupported it falls back to double backward once and warns. HVPs run outside
    autocast in the parameters' own dtype; sums over micro-batches are accumulated in float64.

    The model is evaluated in eval mode (dropout off, BatchNorm on running statistics) unless
    ``train_mode_batchnorm=True``, where BatchNorm layers use each micro-batch's statistics
    without touching their running statistics. After every product the model is exactly as
    found: parameters, buffers, train/eval flags, ``.grad``, ``requires_grad`` and torch's global
    RNG state.

    Args:
        model: Any ``nn.Module``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar mean loss`` for ``(inputs, targets)``
            batches, e.g. ``torch.nn.functional.cross_entropy``.
        data: A re-iterable of batches (a list or a ``DataLoader``), iterated once per product.
        batch_loss: Alternative to ``loss_fn``: ``batch_loss(model, batch) -> scalar mean loss``
            for any batch structure (dicts, sequence models, masks).
        batch_size_fn: ``batch_size_fn(batch) -> number`` giving a batch's weight ``|b|``: the
            number of terms its mean loss averages. Defaults to the leading dimension of the first
            tensor in the batch (examples). For a token-mean loss over padded sequences pass the
            number of valid tokens, e.g. ``lambda b: (b[1] != -100).sum()``, so that ``H`` is the
            Hessian of the token mean over the whole data set. A batch of weight 0 is skipped.
        backend: ``"auto"`` (the faster path per width, by measurement; fallback to double
            backward, and to finite differences with a warning where both AD paths fail),
            ``"func"`` (forward-over-reverse), ``"autograd"`` (double backward) or
            ``"finite_difference"``: central differences of first-order gradients through the
            model's own forward and backward, :math:`Hv \approx (\nabla L(\theta + \varepsilon u)
            - \nabla L(\theta - \varepsilon u)) \|v\| / (2\varepsilon)` with :math:`u = v/\|v\|`,
            2 gradients per vector, for models the AD paths cannot differentiate twice (fused
            attention kernels are then kept, checkpointed and compiled modules work); see
            :mod:`~lightning_hessian.operators.finite_difference` for the step, the error and
            :attr:`fd_error_estimate`.
        fd_step: With ``backend="finite_difference"``, the perturbation length
            :math:`\varepsilon` (default: :math:`2\epsilon^{1/3}\max(1, \mathrm{rms}(\theta))`
            for the products' machine epsilon :math:`\epsilon`, from the parameters at the first
            product).
        fd_richardson: With ``backend="finite_difference"``, Richardson-extrapolated products
            :math:`(4D_\varepsilon - D_{2\varepsilon})/3` (error :math:`O(\varepsilon^4)`,
            4 gradients per vector instead of 2).
        train_mode_batchnorm: Use batch statistics in BatchNorm layers (running stats untouched).
        func_min_vectors: With ``backend="auto"``, a fixed rule instead of the measurement:
            products of fewer vectors than this use double backward, wider ones the vmapped
            forward-over-reverse path. ``None`` (default): measure.
        backend_choices: Choices measured earlier (``{width: "func" | "autograd"}``, e.g.
            ``previous_op.backend_choices``), reused without timing; new widths are measured.
        compute_dtype: Compute the products in this dtype (e.g. ``torch.float64`` for a float32
            model) on cast copies of parameters, buffers and float inputs; the model itself is not
            touched. Removes the float32 rounding floor (~1e-7 relative) of the products, e.g. to
            resolve eigenvalues to 1e-6 and better on small models. Default: the parameters' dtype,
            except float32 for float16/bfloat16 models (``Trainer(precision="bf16-true")``: half
            precision HVPs lose ~3 digits and overflow). Floating inputs follow the model: they are
            rounded to the parameters' dtype (as a ``"bf16-true"``/``"64-true"`` Trainer feeds
            them in training), then cast to the products' dtype.
        max_batched_vectors: At most this many vectors are pushed through one vmapped product
            (bounds activation memory, ``k`` times one batch's); ``None`` means all at once.
        device: Where batches are moved; defaults to the device of the first trainable parameter.
        cache_batches: Keep the moved batches in memory after the first pass (fast: the loader and
            the host-to-device copies run once; deterministic even for a loader with random
            transforms). Abandoned automatically if the batches exceed ``max_cache_bytes``.
        max_cache_bytes: Memory budget of the batch cache (default 1 GiB).
        all_reduce: For distributed use: a function that sums a float64 tensor across processes
            in place-or-return style (``t -> summed t``). Each process then passes its own shard
            of the analysis data, and every product is the product of the global Hessian.
            One collective of ``num_params * k + 3`` float64 numbers per product of ``k`` vectors
            (the sums, the total weight, the loss, a failure flag).
        compile: ``torch.compile`` the per-batch product of each path (``fullgraph=True``):
            forward-over-reverse as above, and double backward in its ``torch.func`` form
            (``grad`` of :math:`\langle \nabla \ell, v \rangle`, one graph). The first product of each
            shape and width pays the compilation (seconds to minutes); where compilation fails
            (a graph break, no C++ compiler for inductor, ...) the path runs eagerly with one
            ``RuntimeWarning``: never an error. See ``benchmarks/bench_compile.py`` for the gain.

    Products of one evaluation can share their preparation: inside ``with op.session():`` the
    state snapshot, the analysis mode and contexts, and the casts of parameters and constants are
    done once instead of once per product (results are identical; parameters and buffers are
    watched through their version counters, and buffers a product writes are restored after it).

    Raises:
        ValueError: ``data`` is empty, or the model has no trainable parameters.
        TypeError: Neither or both of ``loss_fn`` / ``batch_loss``, or ``data`` is a one-shot
            iterator.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_hessian import HessianOperator
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> op = HessianOperator(model, nn.functional.cross_entropy, data)
        >>> op.num_params
        67
        >>> op.matvec(torch.ones(op.num_params)).shape
        torch.Size([67])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        data: Iterable[Any] | None = None,
        *,
        batch_loss: BatchLossFn | None = None,
        batch_size_fn: Callable[[Any], float] | None = None,
        backend: Backend = "auto",
        train_mode_batchnorm: bool = False,
        max_batched_vectors: int | None = None,
        func_min_vectors: int | None = None,
        backend_choices: Mapping[int, str] | None = None,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        cache_batches: bool = True,
        max_cache_bytes: int = 1 << 30,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        fd_step: float | None = None,
        fd_richardson: bool = False,
        compile: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        if (loss_fn is None) == (batch_loss is None):
            raise TypeError(
                "Pass exactly one of `loss_fn` (for (inputs, targets) batches) and `batch_loss` "
                "(for any other batch structure)."
            )
        if data is None:
            raise ValueError("`data` is required: a list of batches or a DataLoader over the analysis set.")
        if isinstance(data, Iterator):
            raise TypeError(
                "`data` must be re-iterable (a list or a DataLoader); a one-shot iterator or "
                "generator would be exhausted after the first product. Wrap it in list(...)."
            )
        if hasattr(data, "__len__") and len(data) == 0 and all_reduce is None:  # type: ignore[arg-type]
            raise ValueError("`data` is empty: the analysis set needs at least one batch.")
        if max_batched_vectors is not None and max_batched_vectors < 1:
            raise ValueError(f"`max_batched_vectors` must be >= 1 or None, got {max_batched_vectors}.")

        self.model = model
        self.data = data
        self.batch_size_fn = batch_size_fn or _default_batch_size
        self.train_mode_batchnorm = bool(train_mode_batchnorm)
        self.max_batched_vectors = max_batched_vectors
        self.func_min_vectors = func_min_vectors
        if compute_dtype is not None and not (
            isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
        ):
            raise ValueError(f"`compute_dtype` must be a floating torch.dtype or None, got {compute_dtype!r}.")
        self.compute_dtype = compute_dtype
        self.cache_batches = bool(cache_batches)
        self.max_cache_bytes = int(max_cache_bytes)
        self.all_reduce = all_reduce
        self._requested: Backend = backend
        self._cached: list[tuple[Any, float]] | None = None
        self._num_hvps = 0
        self._session: ProductSession | None = None
        self._double_backward = DoubleBackward()
        self.compile = bool(compile)

        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                "The model has no trainable parameters (requires_grad=True); there is no Hessian "
                "to analyse. Unfreeze at least one parameter."
            )
        self._names = [f"model.{name}" for name, _ in named]
        self._params = [p for _, p in named]
        self._numels = [p.numel() for p in self._params]
        self._offsets = [0]
        for numel in self._numels:
            self._offsets.append(self._offsets[-1] + numel)
        self._device = torch.device(device) if device is not None else self._params[0].device
        check_backend(backend)
        self._fd = FiniteDifferenceState(fd_step, fd_richardson) if backend == "finite_difference" else None
        if backend != "finite_difference" and (fd_step is not None or fd_richardson):
            raise ValueError("`fd_step` / `fd_richardson` need backend='finite_difference'.")
        self._fd_fallback = FiniteDifferenceState() if backend == "auto" else None  # where both AD paths fail
        self._selector = BackendSelector(
            "auto" if self._fd is not None else backend, func_min_vectors, backend_choices, device=self._device
        )
        self._wrapper = _LossModule(model, loss_fn, batch_loss)
        self._compiler = CompiledProducts(self._wrapper, self._names, max_batched_vectors) if compile else None
        if self.compute_dtype is None and self._params[0].dtype in _HALF_DTYPES:
            # float16/bfloat16 products lose ~3 significant digits per HVP and overflow easily:
            # compute on float32 copies (the model itself is untouched).
            self.compute_dtype = torch.float32

    # ------------------------------------------------------------------ properties

    @property
    def num_params(self) -> int:
        """Number of trainable parameters ``n`` (the operator is ``n x n``)."""
        return self._offsets[-1]

    @property
    def device(self) -> torch.device:
        """Device of the parameters (and of the operator's outputs)."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype in which products are computed: ``compute_dtype`` or the parameters' own."""
        return self.compute_dtype if self.compute_dtype is not None else self._params[0].dtype

    def _constants(self) -> dict[str, Tensor]:
        """With ``compute_dtype``: cast copies of buffers and frozen parameters (``{}`` otherwise)."""
        if self.compute_dtype is None:
            return {}
        dtype = self.compute_dtype
        trainable = set(self._names)
        return {
            f"model.{name}": t.detach().to(dtype)
            for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]
            if f"model.{name}" not in trainable and t is not None and torch.is_floating_point(t)
        }

    def _prepared(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()``, once per session while the parameters and buffers are unchanged."""
        return build() if self._session is None else self._session.cached(key, build)

    def _compute_dtype_inputs(self, batch: Any) -> tuple[dict[str, Tensor], Any]:
        """The constants of ``functional_call`` and the batch, in the products' dtype."""
        constants = self._prepared("constants", self._constants)
        return constants, batch if self.compute_dtype is None else _cast_floats(batch, self.compute_dtype)

    def _primals(self) -> tuple[Tensor, ...]:
        """The trainable parameters, detached, in the products' dtype."""
        return cast(
            "tuple[Tensor, ...]",
            self._prepared("primals", lambda: tuple(p.detach().to(self.dtype) for p in self._params)),
        )

    @contextlib.contextmanager
    def session(self) -> Iterator[HessianOperator]:
        """Products inside share one preparation (state snapshot, contexts, casts): an evaluation.

        Re-entrant (an inner ``session()`` is part of the outer one). The model is as found
        when the outermost block exits; buffers written by a product are restored after it.
        Parameters must not be modified in place inside a session by anything but the
        operator itself (they are checked and the preparation is redone if they are).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from lightning_hessian import HessianOperator, top_eigenvalues
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
            >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
            >>> op = HessianOperator(model, nn.functional.cross_entropy, data)
            >>> with op.session():
            ...     values = top_eigenvalues(op, k=1).values
        """
        if self._session is not None:
            yield self
            return
        with ProductSession(self) as session:
            self._session = session
            try:
                yield self
            finally:
                self._session = None

    def _product_guard(self) -> contextlib.AbstractContextManager[Any]:
        """The full guard outside a session; inside, only the per-product buffer check."""
        return self._guarded() if self._session is None else self._session.product()

    def _loss_of_batch(self, batch: Any) -> Tensor:
        """The mean loss of one batch in the products' dtype (cast copies with ``compute_dtype``)."""
        if self.compute_dtype is None or self.compute_dtype == self._params[0].dtype:
            return self._wrapper(batch)
        constants, batch = self._compute_dtype_inputs(batch)
        params = {name: p.detach().to(self.compute_dtype) for name, p in zip(self._names, self._params, strict=True)}
        return torch.func.functional_call(self._wrapper, {**constants, **params}, (batch,))

    @property
    def num_hvps(self) -> int:
        """Running count of Hessian-vector products (columns multiplied over the whole data)."""
        return self._num_hvps

    @property
    def backend(self) -> str:
        """The HVP path of the latest product: "func", "autograd", "finite_difference"; "auto" before any."""
        if self._fd is not None:
            return "finite_difference"
        if self._selector.last is None:
            return self._requested
        return self._selector.last

    def backend_for(self, width: int) -> str | None:
        """The HVP path of products of ``width`` vectors (``None``: not measured yet)."""
        return self._selector.path_for(width)

    @property
    def backend_choices(self) -> dict[int, str]:
        """Measured choices ``{width: "func" | "autograd"}`` so far (``backend="auto"``)."""
        return dict(self._selector.choices)

    @property
    def backend_timings(self) -> dict[int, dict[str, float]]:
        """Seconds each path took on the first micro-batch of each measured width."""
        return {k: dict(v) for k, v in self._selector.timings.items()}

    @property
    def fd_step(self) -> float | None:
        """Finite differences: the perturbation length :math:`\varepsilon` in use (``None``: not yet set, or AD)."""
        return None if self._fd is None else self._fd.step

    @property
    def fd_error_estimate(self) -> float:
        r"""Finite differences: measured relative error of the products (NaN before the first, or AD).

        :math:`\|S_\varepsilon v - S_{2\varepsilon} v\| / \|S_\varepsilon v\|` for the first
        nonzero vector of the first product (two extra gradients, once): a conservative estimate
        of the products' relative error (see :mod:`~lightning_hessian.operators.finite_difference`).
        """
        return math.nan if self._fd is None else self._fd.error_estimate

    @property
    def num_gradients(self) -> int:
        """Finite differences: gradient evaluations so far, over all micro-batches (0 for AD)."""
        return 0 if self._fd is None else self._fd.num_gradients

    def reset_num_hvps(self) -> None:
        """Set :attr:`num_hvps` back to zero."""
        self._num_hvps = 0

    # ------------------------------------------------------------------ flat <-> params

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (in parameter order) into one flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split a flat vector into views shaped like the trainable parameters."""
        return [vector[self._offsets[i] : self._offsets[i + 1]].view_as(p) for i, p in enumerate(self._params)]

    def parameters(self) -> list[Tensor]:
        """The trainable parameters, in the order of the flat vectors."""
        return list(self._params)

    def parameter_names(self) -> list[str]:
        """Names of the trainable parameters (as in ``model.named_parameters()``)."""
        return [name[len("model.") :] for name in self._names]

    def block(self, param_names: Sequence[str]) -> HessianOperator:
        r"""The diagonal block :math:`H_{bb}` over the named parameters, all others held fixed.

        Same model, data, loss and machinery; products differentiate with respect to the block's
        parameters only (see :func:`~lightning_hessian.operators.block.restricted_operator`).
        Usable by every estimator, e.g. ``top_eigenvalues(op.block(["0.weight", "0.bias"]))``.
        """
        from lightning_hessian.operators.block import restricted_operator

        block = restricted_operator(self, param_names)
        if self._fd is not None:  # its own step, error estimate and gradient count
            block._fd = FiniteDifferenceState(self._fd.override, self._fd.richardson)
        return block

    # ------------------------------------------------------------------ data

    def _batches(self) -> Iterator[tuple[Any, float]]:
        if self._cached is not None:
            yield from self._cached
            return
        collected: list[tuple[Any, float]] = []
        caching = self.cache_batches
        cached_bytes = 0
        count = 0
        for batch in self.data:
            # floating inputs follow the dtype of the products (e.g. float32 data, bf16-true model)
            moved = _cast_floats(_cast_floats(_move(batch, self.device), self._params[0].dtype), self.dtype)
            weight = float(self.batch_size_fn(moved))
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(
                    f"Batch weight must be non-negative and finite, got {weight}: check `batch_size_fn` "
                    "(it returns the number of averaged terms of a batch, e.g. its valid tokens)."
                )
            count += 1
            if weight == 0:  # e.g. a micro-batch of padding only: it contributes nothing
                continue
            if caching:
                cached_bytes += _nbytes(moved)
                if cached_bytes > self.max_cache_bytes:
                    caching, collected = False, []
                else:
                    collected.append((moved, weight))
            yield moved, weight
        if count == 0 and self.all_reduce is None:
            raise ValueError("`data` yielded no batches: the analysis set is empty.")
        if caching:
            self._cached = collected

    # ------------------------------------------------------------------ per-batch HVPs

    def _func_hvp(self, batch: Any, tangents: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Forward-over-reverse HVP of one batch; tangents have a leading probe dimension."""
        primals = self._primals()
        constants, batch = self._compute_dtype_inputs(batch)
        if self._compiler is not None:
            compiled = self._compiler.run("func", primals, constants, batch, tuple(tangents))
            if compiled is not None:
                return compiled
        return func_products(
            self._wrapper, self._names, primals, constants, batch, tuple(tangents), self.max_batched_vectors
        )

    def _autograd_hvp(self, batch: Any, tangents: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Double-backward HVP of one batch; tangents have a leading probe dimension."""
        if self._compiler is not None:  # reverse-over-reverse in torch.func form: one compiled graph
            constants, cast_batch = self._compute_dtype_inputs(batch)
            compiled = self._compiler.run("autograd", self._primals(), constants, cast_batch, tuple(tangents))
            if compiled is not None:
                return compiled
        if self.compute_dtype is None or self.compute_dtype == self._params[0].dtype:
            params: Sequence[Tensor] = self._params
            loss = self._wrapper(batch)
        else:  # a cast copy of the parameters, differentiated through functional_call
            params = self._prepared(
                "leaves", lambda: [p.detach().to(self.compute_dtype).requires_grad_(True) for p in self._params]
            )
            constants, batch = self._compute_dtype_inputs(batch)
            loss = torch.func.functional_call(
                self._wrapper, {**constants, **dict(zip(self._names, params, strict=True))}, (batch,)
            )
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        k = tangents[0].shape[0]
        if not used:
            return [torch.zeros((k, *p.shape), dtype=self.dtype, device=p.device) for p in params], loss.detach()
        columns = self._double_backward.products(
            [grads[i] for i in used], params, [tangents[i] for i in used], k, self.max_batched_vectors
        )
        out = [
            torch.zeros((k, *p.shape), dtype=self.dtype, device=p.device) if c is None else c
            for c, p in zip(columns, params, strict=True)
        ]
        return out, loss.detach()

    def _fd_hvp(self, batch: Any, tangents: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Finite-difference HVP of one batch (the last column at step 2ε while checking)."""
        fd = self._fd
        assert fd is not None
        if self.compute_dtype is None or self.compute_dtype == self._params[0].dtype:
            params: list[Tensor] = list(self._params)  # the model's own parameters, perturbed in place
            loss_of: Callable[[Any], Tensor] = self._wrapper  # a block perturbs its own parameters only
        else:  # cast copies (compute_dtype), through functional_call; the model is not touched
            constants, batch = self._compute_dtype_inputs(batch)
            params = [p.detach().to(self.compute_dtype).requires_grad_(True) for p in self._params]
            loss_of = self._functional_loss(constants, params)

        compiled_grad = self._compiled_gradient(batch, params)

        def grad_fn() -> tuple[Sequence[Tensor | None], Tensor]:
            if compiled_grad is not None and not fd.use_backward:
                result = compiled_grad()
                if result is not None:
                    return result
            # torch.autograd.grad: writes no .grad, fires no gradient-accumulation hooks
            loss = loss_of(batch)
            if not fd.use_backward:
                try:
                    return torch.autograd.grad(loss, params, allow_unused=True), loss.detach()
                except RuntimeError as err:
                    if not _needs_backward(err):
                        raise
                fd.use_backward = True
                loss = loss_of(batch)
            return _backward_gradients(self.model, loss, params), loss.detach()

        units, norms = unit_columns(tangents)
        step = fd.resolve_step(self._params, self.dtype)
        k = len(norms) - int(fd.checking)
        result = central_difference_products(params, [u[:k] for u in units], grad_fn, step, richardson=fd.richardson)
        products, spent = result.products, result.num_gradients
        if fd.checking:
            wide = central_difference_products(
                params, [u[k:] for u in units], grad_fn, 2 * step, richardson=fd.richardson
            )
            products = [torch.cat([p, w]) for p, w in zip(products, wide.products, strict=True)]
            spent += wide.num_gradients
        fd.num_gradients += spent
        scale = norms.to(products[0].device)
        return [p * scale.view(-1, *([1] * (p.ndim - 1))) for p in products], result.loss

    def _compiled_gradient(
        self, batch: Any, params: Sequence[Tensor]
    ) -> Callable[[], tuple[list[Tensor], Tensor] | None] | None:
        """With ``compile=True``: the compiled gradient at the current (perturbed) ``params``, else ``None``."""
        compiler = self._compiler
        if compiler is None or "gradient" in compiler.failed:
            return None
        primals = tuple(p.detach() for p in params)  # share storage: they follow the in-place perturbations
        constants, cast_batch = self._compute_dtype_inputs(batch)
        return lambda: compiler.run("gradient", primals, constants, cast_batch, ())

    def _functional_loss(self, constants: dict[str, Tensor], params: list[Tensor]) -> Callable[[Any], Tensor]:
        names = self._names
        return lambda batch: torch.func.functional_call(
            self._wrapper, {**constants, **dict(zip(names, params, strict=True))}, (batch,)
        )

    def _batch_hvp(self, batch: Any, tangents: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        if self._fd is not None:
            return self._fd_hvp(batch, tangents)
        try:
            return self._selector.run(
                tangents[0].shape[0],
                lambda: self._func_hvp(batch, tangents),
                lambda: self._autograd_hvp(batch, tangents),
            )
        except (RuntimeError, NotImplementedError) as err:
            if self._fd_fallback is None or isinstance(err, HessianComputationError):
                raise
            return self._fall_back_to_fd(err, batch, tangents)

    def _fall_back_to_fd(self, err: BaseException, batch: Any, tangents: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """``backend="auto"`` where both AD paths failed: finite differences from now on, with a warning."""
        self._fd, self._fd_fallback = self._fd_fallback, None
        try:
            result = self._fd_hvp(batch, tangents)
        except Exception:  # noqa: BLE001 - the AD error is the one to report
            self._fd_fallback, self._fd = self._fd, None
            raise err from None
        warnings.warn(
            "Neither forward-over-reverse nor double backward can differentiate this model twice "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); falling back to "
            "finite differences of gradients (2 gradients per product, ~1e-4 relative error in float32; "
            "see HessianOperator.fd_error_estimate). Pass backend='finite_difference' to silence this warning.",
            RuntimeWarning,
            stacklevel=5,
        )
        return result

    # ------------------------------------------------------------------ products

    def _local_products(self, matrix: Tensor) -> tuple[Tensor, float, float]:
        """Unnormalised sum over local batches of ``|b| * H_b V`` (float64), total weight, loss sum."""
        k = matrix.shape[1]
        acc = torch.zeros((self.num_params, k), dtype=torch.float64, device=self.device)
        tangents = []
        for i, p in enumerate(self._params):
            block = matrix[self._offsets[i] : self._offsets[i + 1]]
            tangents.append(block.t().to(dtype=self.dtype, device=p.device).reshape(k, *p.shape).contiguous())
        total_weight = 0.0
        loss_sum = 0.0
        for batch, weight in self._batches():
            hvps, loss = self._batch_hvp(batch, tangents)
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"The loss is {loss_value} on an analysis batch; the Hessian is undefined there."
                )
            for i, h in enumerate(hvps):
                acc[self._offsets[i] : self._offsets[i + 1]].add_(h.reshape(k, -1).t().to(torch.float64), alpha=weight)
            total_weight += weight
            loss_sum += weight * loss_value
        return acc, total_weight, loss_sum

    def _guarded(self) -> contextlib.ExitStack[bool | None]:
        stack = contextlib.ExitStack()
        stack.enter_context(preserved_model_state(self.model))
        # finite differences run the model's own (fused) attention kernels; AD needs the math kernel
        math_attention = self._fd is None
        stack.enter_context(_analysis_mode(self.model, self.train_mode_batchnorm, math_attention=math_attention))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device_type=self.device.type, enabled=False))
        return stack

    def _products(self, matrix: Tensor) -> tuple[Tensor, float]:
        with self._product_guard():
            if self.all_reduce is None:
                acc, weight, loss_sum = self._local_products(matrix)
            else:
                acc, weight, loss_sum = self._distributed_products(matrix)
        if weight <= 0:
            raise ValueError("`data` yielded no batches: the analysis set is empty.")
        return acc / weight, loss_sum / weight

    def _distributed_products(self, matrix: Tensor) -> tuple[Tensor, float, float]:
        # Every process joins the collective even when its own shard failed; the failure is
        # shared through a flag so that no process hangs and all raise the same error.
        assert self.all_reduce is not None
        k = matrix.shape[1]
        failure: BaseException | None = None
        try:
            acc, weight, loss_sum = self._local_products(matrix)
        except Exception as err:  # noqa: BLE001 - re-raised after the collective
            failure = err
            acc = torch.zeros((self.num_params, k), dtype=torch.float64, device=self.device)
            weight, loss_sum = 0.0, 0.0
        flags = torch.tensor(
            [weight, loss_sum if math.isfinite(loss_sum) else 0.0, 1.0 if failure is not None else 0.0],
            dtype=torch.float64,
            device=self.device,
        )
        packed = torch.cat([acc.reshape(-1), flags])
        packed = self.all_reduce(packed)
        if failure is not None:
            raise failure
        if packed[-1].item() > 0:
            raise NonFiniteHVPError("Another process failed while computing its share of a Hessian-vector product.")
        acc = packed[: acc.numel()].reshape(self.num_params, k)
        return acc, float(packed[-3]), float(packed[-2])

    def matmat(self, matrix: Tensor) -> Tensor:
        """Products ``H @ V`` for ``V`` of shape ``[num_params, k]``.

        Returns a tensor of ``V``'s dtype on :attr:`device`. Counts ``k`` HVPs.

        Raises:
            NonFiniteLossError: The loss is NaN/Inf on some batch.
            NonFiniteHVPError: The product contains NaN/Inf.
        """
        _check_matrix(matrix, self.num_params)
        if matrix.shape[1] == 0:
            return matrix.new_zeros((self.num_params, 0), device=self.device)
        if self._fd is not None and self._fd.checking is False and math.isnan(self._fd.error_estimate):
            result = self._fd_checked_products(matrix)
        else:
            result, _ = self._products(matrix)
        self._num_hvps += matrix.shape[1]
        if not torch.isfinite(result).all():
            raise NonFiniteHVPError(
                "A Hessian-vector product contains NaN or Inf although the loss is finite "
                "(overflow in the model's dtype?)."
            )
        return result.to(matrix.dtype if torch.is_floating_point(matrix) else torch.float64)

    def _fd_checked_products(self, matrix: Tensor) -> Tensor:
        """The first finite-difference product, with the error estimate on its first nonzero column."""
        assert self._fd is not None
        nonzero = (matrix != 0).any(dim=0).nonzero()
        if nonzero.numel() == 0:
            return self._products(matrix)[0]
        j = int(nonzero[0, 0])
        self._fd.checking = True
        try:
            extended, _ = self._products(torch.cat([matrix, matrix[:, j : j + 1]], dim=1))
        finally:
            self._fd.checking = False
        self._fd.error_estimate = fd_relative_error(extended[:, j], extended[:, -1])
        if not self._fd.error_estimate <= _FD_WARN_ERROR:
            warnings.warn(
                f"Finite-difference HVPs: measured relative error {self._fd.error_estimate:.2g} at step "
                f"{self._fd.step:.3g} (products in {self.dtype}); results built on them are that inaccurate. "
                "Pass compute_dtype=torch.float64 (HessianMonitor: hvp_precision='float64') or a smaller fd_step, "
                "or use an AD backend.",
                RuntimeWarning,
                stacklevel=3,
            )
        return extended[:, :-1]

    def matvec(self, vector: Tensor) -> Tensor:
        """Product ``H @ v`` for a flat vector ``v`` of length :attr:`num_params`."""
        return _matvec_via_matmat(self, vector)

    def loss(self) -> float:
        """The size-weighted mean loss over ``data`` (one forward pass per batch, no HVP)."""
        total, weight = 0.0, 0.0
        with self._product_guard(), torch.no_grad():
            for batch, w in self._batches():
                total += w * float(self._loss_of_batch(batch))
                weight += w
        if self.all_reduce is not None:
            packed = self.all_reduce(torch.tensor([total, weight], dtype=torch.float64, device=self.device))
            total, weight = float(packed[0]), float(packed[1])
        if weight <= 0:
            raise ValueError("`data` yielded no batches: the analysis set is empty.")
        return total / weight

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_params={self.num_params}, device={self.device}, "
            f"dtype={self.dtype}, backend={self.backend!r}, train_mode_batchnorm={self.train_mode_batchnorm})"
        )


def _backward_gradients(model: nn.Module, loss: Tensor, params: Sequence[Tensor]) -> list[Tensor | None]:
    """``d loss / d params`` read from ``.grad`` after ``loss.backward()``; every ``.grad`` as found.

    For reentrant activation checkpointing (``use_reentrant=True``, e.g. Hugging Face's default),
    which supports only ``.backward()``: every parameter's ``.grad`` object is swapped out before
    and put back after (gradient-accumulation hooks registered on the parameters do fire).
    """
    seen = {id(p) for p in model.parameters()}
    saved = [(p, p.grad) for p in [*model.parameters(), *(q for q in params if id(q) not in seen)]]
    for p, _ in saved:
        p.grad = None
    try:
        loss.backward()
        return [p.grad for p in params]
    finally:
        for p, grad in saved:
            p.grad = grad


def _needs_backward(err: RuntimeError) -> bool:
    """The error of ``torch.autograd.grad`` through reentrant checkpointing (only ``.backward()`` works)."""
    return "checkpoint" in str(err).lower() and "backward" in str(err).lower()
