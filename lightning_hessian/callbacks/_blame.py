"""Errors name the culprit: is a dry-run failure the data's fault or the callback's configuration?

The dry run (one analysis micro-batch, before the first training step) raises on anything but a
numerical failure. When the failure comes from the data (targets out of the model's class range,
the wrong dtypes, NaN/Inf inputs) the note says so and shows the offending batch's structure
(shapes, dtypes, ranges); otherwise it keeps pointing at the callback's arguments.
"""

from __future__ import annotations

import re
from typing import Any

import torch

__all__ = ["data_fault", "describe_batch"]

# Messages of PyTorch errors that a batch, not a callback argument, causes.
_DATA_PATTERNS = (
    (re.compile(r"out of bounds|index out of range|IndexError|device-side assert", re.I), "targets out of range"),
    (
        re.compile(
            r"expected scalar type|must have the same dtype|expected .*dtype|not implemented for '(Long|Int|Float|Half|"
            r"Double|Bool|Byte)'|Found dtype|dtype .* but got|got .*dtype|expected .* Long|expected .* Float",
            re.I,
        ),
        "wrong dtype",
    ),
    (
        re.compile(
            r"shapes? .* cannot be multiplied|size mismatch|Expected input batch_size|must match|"
            r"target tensor expected|"
            r"multi-target",
            re.I,
        ),
        "shape",
    ),
)
_MAX_LEAVES = 8


def _leaves(obj: Any, path: str, out: list[tuple[str, torch.Tensor]]) -> None:
    if len(out) >= _MAX_LEAVES:
        return
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _leaves(value, f"{path}[{key!r}]", out)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _leaves(value, f"{path}[{i}]", out)


def _summary(path: str, tensor: torch.Tensor) -> str:
    text = f"{path}: {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"
    if tensor.numel() and not tensor.is_complex():
        values = tensor.detach().to(torch.float64)
        finite = values[torch.isfinite(values)]
        if finite.numel():
            text += f" in [{float(finite.min()):.4g}, {float(finite.max()):.4g}]"
        bad = values.numel() - finite.numel()
        if bad:
            text += f", {bad} NaN/Inf"
    return text


def describe_batch(batch: Any) -> str:
    """``"batch[0]: float32 [32, 64] in [0, 16]; batch[1]: int64 [32] in [0, 12]"`` (at most 8 tensors)."""
    leaves: list[tuple[str, torch.Tensor]] = []
    _leaves(batch, "batch", leaves)
    if not leaves:
        return f"a {type(batch).__name__} holding no tensor"
    return "; ".join(_summary(path, tensor) for path, tensor in leaves)


def _non_finite(batch: Any) -> bool:
    leaves: list[tuple[str, torch.Tensor]] = []
    _leaves(batch, "batch", leaves)
    return any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for _, t in leaves)


def data_fault(error: BaseException, batch: Any) -> str | None:
    """Why the data (not the configuration) looks at fault for ``error``, or ``None``.

    NaN/Inf in a floating tensor of the batch; or an error message PyTorch raises for targets
    out of range, mismatched dtypes or shapes.
    """
    if batch is None:
        return None
    if _non_finite(batch):
        return "the analysis data holds NaN/Inf values"
    message = f"{type(error).__name__}: {error}"
    for pattern, what in _DATA_PATTERNS:
        if pattern.search(message):
            if what == "targets out of range":
                return "the targets look out of the model's range (e.g. a label >= the number of classes, or < 0)"
            if what == "wrong dtype":
                return "the batch's dtypes do not fit the model/loss (e.g. float targets, or float64 inputs)"
            return "the batch's shapes do not fit the model/loss"
    return None
