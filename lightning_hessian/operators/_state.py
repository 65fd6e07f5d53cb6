"""Model state around an analysis pass: restore everything, and the analysis (eval) mode."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ModelSnapshot", "derivative_friendly_attention", "preserved_model_state"]


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    cuda_states = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = torch.cuda.get_rng_state_all()
    return torch.get_rng_state(), cuda_states


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    cpu_state, cuda_states = state
    torch.set_rng_state(cpu_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)


def _version(tensor: Tensor) -> int | None:
    """``tensor``'s in-place version counter (``None`` for inference tensors, which have none)."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return None


class ModelSnapshot:
    """A model's train/eval flags, ``requires_grad`` flags, buffers and torch RNG, restorable.

    Buffers are cloned once; :meth:`restore_buffers` copies back only those whose in-place
    version counter moved (or, for inference tensors without a counter, whose values differ),
    so that checking after every product of a session costs a few integer comparisons.
    """

    def __init__(self, model: nn.Module, *, buffers: bool = True) -> None:
        self.modes = [(m, m.training) for m in model.modules()]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.buffers = (
            [(b, b.detach().clone(), _version(b)) for b in model.buffers() if b is not None] if buffers else []
        )
        self.rng = _rng_state()

    def restore_buffers(self, *, trust_versions: bool = False) -> None:
        """Copy back every buffer written since the snapshot (a no-op when none was).

        With ``trust_versions``, buffers whose version counter did not move are not compared
        (a write through ``.data`` bypasses the counter: the final restore compares them all).
        """
        with torch.no_grad():
            for index, (buf, saved, version) in enumerate(self.buffers):
                if trust_versions and version is not None and _version(buf) == version:
                    continue
                if not torch.equal(buf, saved):
                    buf.copy_(saved)
                if version is not None:
                    self.buffers[index] = (buf, saved, _version(buf))

    def restore(self) -> None:
        """Everything as at the snapshot."""
        for module, training in self.modes:
            module.training = training
        for param, flag in self.flags:
            if param.requires_grad != flag:
                param.requires_grad_(flag)
        self.restore_buffers()
        _set_rng_state(self.rng)


@contextlib.contextmanager
def preserved_model_state(model: nn.Module, *, buffers: bool = True) -> Iterator[None]:
    """Restore every module's train/eval flag, ``requires_grad`` flags, buffers and torch RNG.

    Parameters and ``.grad`` are never written by the HVP code; buffers are restored anyway so
    that a user ``batch_loss`` that writes to them (or a BatchNorm in train mode) leaves no trace.
    """
    snapshot = ModelSnapshot(model, buffers=buffers)
    try:
        yield
    finally:
        snapshot.restore()


@contextlib.contextmanager
def _analysis_mode(model: nn.Module, train_mode_batchnorm: bool, math_attention: bool = True) -> Iterator[None]:
    """Eval mode everywhere, SDPA on its math kernel (if ``math_attention``); optionally BatchNorm on batch statistics.

    Buffers are untouched.
    """
    bn_flags: list[tuple[nn.modules.batchnorm._NormBase, bool]] = []
    attention = derivative_friendly_attention() if math_attention else contextlib.nullcontext()
    attention.__enter__()
    model.eval()
    if train_mode_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                bn_flags.append((module, module.track_running_stats))
                module.train()
                # With track_running_stats=False a training BatchNorm normalises with the batch
                # statistics and neither reads nor updates running_mean/var/num_batches_tracked.
                module.track_running_stats = False
    try:
        yield
    finally:
        for module, flag in bn_flags:
            module.track_running_stats = flag
        attention.__exit__(None, None, None)


_attention_lock = threading.Lock()
_attention_depth = 0
_attention_context: contextlib.AbstractContextManager[Any] | None = None


def _math_only_attention() -> contextlib.AbstractContextManager[Any]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        cuda_ctx = getattr(torch.backends.cuda, "sdp_kernel", None)
        if cuda_ctx is None:
            return contextlib.nullcontext()
        return cuda_ctx(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def derivative_friendly_attention() -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` to the math kernel inside the block.

    The fused SDPA kernels (flash on CPU; flash, memory-efficient and cuDNN on CUDA) implement
    neither forward-mode AD nor double backward, so Hessian-vector products through them raise
    ``NotImplementedError``. The math kernel supports both. Its memory is quadratic in the
    sequence length (``batch x heads x T x T`` attention weights per vmapped vector): bound it with
    the analysis micro-batch size.

    torch's backend selection is process-global (not thread-local), so blocks entered from
    several threads (e.g. simulated ranks) could restore each other's saved flags in the wrong
    order. Blocks are therefore counted: the outermost entry selects the math kernel, the last
    exit restores the selection found at that entry, whatever the interleaving. Training outside
    every block keeps its fast kernels.
    """
    global _attention_depth, _attention_context
    with _attention_lock:
        if _attention_depth == 0:
            context = _math_only_attention()
            context.__enter__()
            _attention_context = context
        _attention_depth += 1
    try:
        yield
    finally:
        with _attention_lock:
            _attention_depth -= 1
            if _attention_depth == 0 and _attention_context is not None:
                context, _attention_context = _attention_context, None
                context.__exit__(None, None, None)
