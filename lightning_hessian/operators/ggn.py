r"""The generalised Gauss-Newton matrix of a model's mean loss: :class:`GGNOperator`.

For a model :math:`f_\theta` and a loss :math:`\ell(z, y)` convex in the outputs :math:`z`,

.. math:: G = \sum_b \frac{|b|}{N} J_b^\top H_{\ell,b} J_b, \qquad
          J_b = \partial f_\theta(x_b) / \partial\theta, \quad H_{\ell,b} = \nabla^2_z \ell_b(z)

(Schraudolph 2002; Martens 2020, "New insights and perspectives on the natural gradient method",
§8). It drops the second-order term :math:`\sum_z (\partial\ell/\partial z)\nabla^2_\theta z` of
the Hessian, so it is positive semi-definite whenever :math:`H_\ell` is; for softmax
cross-entropy it equals the Fisher information of the model's predictive distribution.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hessian.operators.hessian import HessianOperator

__all__ = ["GGNOperator", "LossHessian", "loss_output_hessian_product"]

LossHessian = Literal["auto", "cross_entropy", "mse", "autograd"]


def _detect_loss_hessian(loss_fn: Any) -> tuple[str, int, int]:
    """(kind, class_dim, ignore_index) of a recognised loss; ``"autograd"`` otherwise."""
    if loss_fn is F.cross_entropy:
        return "cross_entropy", 1, -100
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is None and loss_fn.label_smoothing == 0 and loss_fn.reduction == "mean":
            return "cross_entropy", 1, loss_fn.ignore_index
        return "autograd", 1, -100
    if loss_fn is F.mse_loss or (isinstance(loss_fn, nn.MSELoss) and loss_fn.reduction == "mean"):
        return "mse", 1, -100
    return "autograd", 1, -100


def _batched_dim(dim: int) -> int:
    return dim + 1 if dim >= 0 else dim


def loss_output_hessian_product(
    kind: Literal["cross_entropy", "mse"],
    outputs: Tensor,
    targets: Tensor,
    vectors: Tensor,
    *,
    class_dim: int = 1,
    ignore_index: int = -100,
) -> Tensor:
    r"""Closed-form :math:`H_\ell u` for ``k`` output-space vectors ``vectors`` (``[k, *outputs.shape]``).

    * ``"cross_entropy"``: the mean softmax cross-entropy over the positions whose target is not
      ``ignore_index`` (PyTorch's ``reduction="mean"``); per position
      :math:`H = (\operatorname{diag} p - p p^\top) / N_\text{valid}` along ``class_dim``, so
      :math:`H u = (p \odot u - p\,(p^\top u)) / N_\text{valid}`; ignored positions contribute 0.
      Logits ``[N, C, ...]`` take ``class_dim=1`` (``F.cross_entropy``), ``[B, T, V]`` logits
      flattened inside the loss take ``class_dim=-1``.
    * ``"mse"``: the mean squared error over all ``M`` output entries, :math:`H = 2I/M`.
    """
    if kind == "mse":
        return vectors * (2.0 / outputs.numel())
    if kind != "cross_entropy":
        raise ValueError(f"No closed form for loss Hessian {kind!r}.")
    probs = torch.softmax(outputs.detach(), dim=class_dim)
    mask = (targets != ignore_index).unsqueeze(class_dim).to(probs.dtype)
    valid = float(mask.sum())
    dim = _batched_dim(class_dim)
    pu = probs * vectors
    hu = pu - probs * pu.sum(dim=dim, keepdim=True)
    return hu * (mask / valid)


class GGNOperator(HessianOperator):
    r"""Generalised Gauss-Newton matrix :math:`G = \sum_b \frac{|b|}{N} J_b^\top H_{\ell,b} J_b` as a linear operator.

    Same interface and machinery as :class:`~lightning_hessian.HessianOperator` (micro-batches
    weighted by size, batch cache, ``compute_dtype``, eval mode / ``train_mode_batchnorm``,
    DDP ``all_reduce``, :meth:`block`, HVP counting, the model left exactly as found), so every
    estimator runs on it unchanged. Products :math:`G v` take, per micro-batch, one forward-mode
    JVP :math:`u = J v` (vmapped over the vectors), the loss-output Hessian product
    :math:`H_\ell u` and one VJP :math:`J^\top (H_\ell u)`: no second derivative of the network.

    :math:`H_\ell` is applied in closed form for softmax cross-entropy
    (:math:`\operatorname{diag} p - pp^\top` per position, ``ignore_index`` honoured, sequence
    logits included) and the mean squared error (:math:`2I/M`), and by double backward through
    ``loss_fn`` otherwise (any loss). ``loss_hessian="auto"`` recognises ``F.cross_entropy``,
    ``nn.CrossEntropyLoss`` (no class weights or label smoothing), ``F.mse_loss`` and
    ``nn.MSELoss``; soft (probability) targets use the autograd path.

    Args:
        model: Any ``nn.Module`` whose forward returns a tensor.
        loss_fn: ``loss_fn(outputs, targets) -> scalar mean loss`` (required: the GGN needs the
            model's outputs separate from the loss; ``batch_loss`` is not accepted).
        data: A re-iterable of ``(inputs, targets, ...)`` batches.
        loss_hessian: ``"auto"``, ``"cross_entropy"``, ``"mse"`` or ``"autograd"``.
        class_dim: Class dimension of the logits for ``"cross_entropy"`` (``1`` for
            ``F.cross_entropy``; ``-1`` for ``[B, T, V]`` logits flattened inside ``loss_fn``).
        ignore_index: Target value excluded from the cross-entropy mean.
        **kwargs: Everything else :class:`~lightning_hessian.HessianOperator` takes
            (``batch_size_fn``, ``backend``, ``compute_dtype``, ``all_reduce``, ...). With
            ``backend="auto"`` a model without forward-mode AD falls back (with a warning) to
            the double-VJP trick :math:`Jv = \partial_w (v^\top J^\top w)`; under ``"auto"`` the faster
            of the two paths is measured per product width, as for the Hessian.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_hessian import GGNOperator, top_eigenvalues
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> ggn = GGNOperator(model, nn.functional.cross_entropy, data)
        >>> top_eigenvalues(ggn, k=1).values.shape
        torch.Size([1])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any = None,
        data: Any = None,
        *,
        loss_hessian: LossHessian = "auto",
        class_dim: int | None = None,
        ignore_index: int | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("batch_loss") is not None or loss_fn is None:
            raise TypeError(
                "GGNOperator needs `loss_fn(outputs, targets)`: the Gauss-Newton matrix separates the "
                "model's outputs from the loss, which `batch_loss` hides. Pass loss_fn (and "
                "(inputs, targets) batches), or use HessianOperator."
            )
        if kwargs.get("backend") == "finite_difference" or "fd_step" in kwargs or "fd_richardson" in kwargs:
            raise ValueError(
                "GGNOperator has no finite-difference backend: its products are Jacobian products of the "
                "model's outputs, not differences of loss gradients. Use backend='auto', 'func' or 'autograd', "
                "or HessianOperator(backend='finite_difference') for the Hessian."
            )
        if loss_hessian not in ("auto", "cross_entropy", "mse", "autograd"):
            raise ValueError(
                f"`loss_hessian` must be 'auto', 'cross_entropy', 'mse' or 'autograd', got {loss_hessian!r}."
            )
        super().__init__(model, loss_fn, data, **kwargs)
        kind, detected_dim, detected_ignore = _detect_loss_hessian(loss_fn)
        self.loss_hessian: str = kind if loss_hessian == "auto" else loss_hessian
        self.class_dim = detected_dim if class_dim is None else int(class_dim)
        self.ignore_index = detected_ignore if ignore_index is None else int(ignore_index)
        self._loss_fn = loss_fn

    # ------------------------------------------------------------------ per-batch products

    def _split(self, batch: Any) -> tuple[Any, Any]:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise TypeError(f"GGNOperator needs (inputs, targets) batches; got {type(batch).__name__}.")
        return batch[0], batch[1]

    def _output_hvp(self, outputs: Tensor, targets: Any, vectors: Tensor) -> Tensor:
        kind = self.loss_hessian
        if kind == "cross_entropy" and isinstance(targets, Tensor) and torch.is_floating_point(targets):
            kind = "autograd"  # soft targets: the closed form assumes class indices
        if kind in ("cross_entropy", "mse"):
            return loss_output_hessian_product(
                kind,  # type: ignore[arg-type]
                outputs,
                targets,
                vectors,
                class_dim=self.class_dim,
                ignore_index=self.ignore_index,
            )
        z = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self._loss_fn(z, targets)
            (grad,) = torch.autograd.grad(loss, z, create_graph=True)
            if not grad.requires_grad:  # loss linear in the outputs
                return torch.zeros_like(vectors)
            rows = [torch.autograd.grad(grad, z, grad_outputs=v, retain_graph=True)[0] for v in vectors]
        return torch.stack(rows)

    def _check_outputs(self, outputs: Any) -> Tensor:
        if not isinstance(outputs, Tensor):
            raise TypeError(
                f"GGNOperator needs a model whose forward returns one tensor; got {type(outputs).__name__}."
            )
        return outputs

    def _func_ggn(self, batch: Any, tangents: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        constants, batch = self._compute_dtype_inputs(batch)
        inputs, targets = self._split(batch)
        names = [n[len("model.") :] for n in self._names]
        consts = {k[len("model.") :]: v for k, v in constants.items()}
        primals = tuple(p.detach().to(self.dtype) for p in self._params)

        def forward(params: tuple[Tensor, ...]) -> Tensor:
            out = torch.func.functional_call(self.model, {**consts, **dict(zip(names, params, strict=True))}, (inputs,))
            return self._check_outputs(out)

        outputs, vjp_fn = torch.func.vjp(forward, primals)[:2]

        def jvp_one(tangent: tuple[Tensor, ...]) -> Tensor:
            return torch.func.jvp(forward, (primals,), (tangent,))[1]

        if tangents[0].shape[0] == 1:
            ju = jvp_one(tuple(t[0] for t in tangents)).unsqueeze(0)
        else:
            ju = torch.func.vmap(jvp_one, chunk_size=self.max_batched_vectors)(tuple(tangents))
        hju = self._output_hvp(outputs, targets, ju)
        if hju.shape[0] == 1:
            products = [g.unsqueeze(0) for g in vjp_fn(hju[0])[0]]
        else:
            products = list(torch.func.vmap(lambda c: vjp_fn(c)[0], chunk_size=self.max_batched_vectors)(hju))
        loss = self._loss_fn(outputs.detach(), targets)
        return products, loss.detach().reshape(())

    def _autograd_ggn(self, batch: Any, tangents: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        constants, batch = self._compute_dtype_inputs(batch)
        inputs, targets = self._split(batch)
        names = [n[len("model.") :] for n in self._names]
        consts = {k[len("model.") :]: v for k, v in constants.items()}
        params = [p.detach().to(self.dtype).requires_grad_(True) for p in self._params]
        outputs = self._check_outputs(
            torch.func.functional_call(self.model, {**consts, **dict(zip(names, params, strict=True))}, (inputs,))
        )
        dummy = torch.zeros_like(outputs, requires_grad=True)
        vjp = torch.autograd.grad(outputs, params, dummy, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(vjp) if g is not None]
        k = tangents[0].shape[0]
        ju = []
        for j in range(k):
            (column,) = torch.autograd.grad(
                [vjp[i] for i in used], dummy, [tangents[i][j] for i in used], retain_graph=True, allow_unused=True
            )
            ju.append(torch.zeros_like(outputs) if column is None else column)
        hju = self._output_hvp(outputs, targets, torch.stack(ju))
        out = [torch.zeros((k, *p.shape), dtype=self.dtype, device=p.device) for p in params]
        for j in range(k):
            grads = torch.autograd.grad(outputs, params, hju[j], retain_graph=True, allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    out[i][j] = g
        loss = self._loss_fn(outputs.detach(), targets)
        return out, loss.detach().reshape(())

    def _batch_hvp(self, batch: Any, tangents: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """One micro-batch's GGN products ``J^T H_l J v`` (tangents have a leading vector dimension).

        The path (vmapped forward-mode JVP + VJP, or the double-VJP trick) is chosen per product
        width like the Hessian's (``backend``: measured under ``"auto"``, with a fallback where
        forward-mode AD fails).
        """
        with torch.enable_grad():
            return self._selector.run(
                tangents[0].shape[0],
                lambda: self._func_ggn(batch, tangents),
                lambda: self._autograd_ggn(batch, tangents),
            )
