"""Trainer precisions: ``bf16-true``/``16-true``/``64-true``/``bf16-mixed`` with both monitors.

Half-precision models are analysed in float32 on cast copies (HVPs and volume forward passes),
floating analysis inputs are rounded to the model's dtype first; the logged top eigenvalue is
compared with the exact float64 Hessian at the (rounded) weights.
"""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianOperator, local_volume
from lightning_hessian.callbacks import HessianMonitor, LocalVolumeMonitor
from lightning_hessian.operators import derivative_friendly_attention
from tests.lightning_helpers import DigitsModule, digits_dataset, trainer_kwargs

VOCAB = 7


def _exact_top_eigenvalue(model: nn.Module, batches, loss_of_logits) -> float:
    """Largest eigenvalue of the float64 double-backward Hessian of the size-weighted mean loss."""
    m64 = copy.deepcopy(model).double().eval()
    named = [(n, p) for n, p in m64.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    weights = [float(loss_of_logits.weight(b)) for b in batches]
    total = sum(weights)

    def loss(flat: Tensor) -> Tensor:
        params, offset = {}, 0
        for name, p in named:
            params[name] = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        out = 0.0
        for (x, y), w in zip(batches, weights, strict=False):
            x = x.double() if torch.is_floating_point(x) else x
            out = out + loss_of_logits(torch.func.functional_call(m64, params, (x,)), y) * (w / total)
        return out

    with derivative_friendly_attention():  # SDPA's math kernel: a composite of plain ops
        hess = torch.autograd.functional.hessian(loss, flat0, vectorize=True)
    assert torch.allclose(hess, hess.T, rtol=0, atol=1e-12 * hess.abs().max())
    return float(torch.linalg.eigvalsh(hess)[-1])


class _MeanCE:
    def __call__(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)

    @staticmethod
    def weight(batch) -> float:
        return float((batch[1] != -100).sum())


def _fit(module, monitors, loader, precision: str) -> pl.Trainer:
    trainer = pl.Trainer(callbacks=monitors, **trainer_kwargs(max_epochs=1, precision=precision))
    trainer.fit(module, loader)
    return trainer


@pytest.mark.parametrize(
    ("precision", "param_dtype"),
    [
        ("bf16-true", torch.bfloat16),
        ("16-true", torch.float16),
        ("64-true", torch.float64),
        ("bf16-mixed", torch.float32),
    ],
)
def test_digits_mlp_float_inputs_each_precision(precision, param_dtype):
    data = digits_dataset(64)
    analysis = DataLoader(data, batch_size=28)  # micro-batches of 28, 28, 8
    hessian = HessianMonitor(dataloader=analysis, num_runs=1, num_steps=25, log_density=False)
    sgd = precision == "16-true"  # pure float16 Adam underflows its eps (1e-8) and diverges
    volume = LocalVolumeMonitor(dataloader=analysis, num_directions=3, preconditioner=None if sgd else "adam")
    pl.seed_everything(0, verbose=False)
    module = DigitsModule(hidden=8, optimizer="sgd" if sgd else "adam", lr=1e-2)
    _fit(module, [hessian, volume], DataLoader(data, batch_size=32), precision)
    assert next(module.parameters()).dtype == param_dtype
    assert math.isfinite(volume.history[0]["log_volume"])
    exact = _exact_top_eigenvalue(module, list(analysis), _MeanCE())
    logged = hessian.history[0]["top_eigenvalue"]
    # float32 products at the rounded weights (float64 for 64-true); 25 Lanczos steps
    assert abs(logged - exact) <= 1e-3 * abs(exact), (logged, exact)


class TokenModule(pl.LightningModule):
    """Embedding -> causal SDPA attention -> tied output: integer inputs, sequence outputs."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids)
        b, t, d = x.shape
        q, k, v = (z.view(b, t, 2, d // 2).transpose(1, 2) for z in self.qkv(x).split(d, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        return self.norm(x + y) @ self.emb.weight.t()

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return _MeanCE()(self(ids), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _token_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (12, 5), generator=g)
    y = torch.randint(0, VOCAB, (12, 5), generator=g)
    y[::3, 3:] = -100  # some padding
    return TensorDataset(ids, y)


def test_bf16_true_token_inputs_sdpa_model():
    data = _token_data()
    analysis = DataLoader(data, batch_size=5)
    hessian = HessianMonitor(dataloader=analysis, num_runs=1, num_steps=25, log_density=False)
    volume = LocalVolumeMonitor(dataloader=analysis, num_directions=3, mask_fn=lambda b: b[1] != -100)
    pl.seed_everything(0, verbose=False)
    module = TokenModule()
    _fit(module, [hessian, volume], DataLoader(data, batch_size=4), "bf16-true")
    assert module.emb.weight.dtype == torch.bfloat16
    assert math.isfinite(volume.history[0]["log_volume"])
    exact = _exact_top_eigenvalue(module, list(analysis), _MeanCE())
    logged = hessian.history[0]["top_eigenvalue"]
    assert abs(logged - exact) <= 1e-3 * abs(exact), (logged, exact)


def test_half_model_operator_and_volume_compute_in_float32_and_leave_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    op = HessianOperator(model, F.cross_entropy, batches)
    assert op.dtype == torch.float32 and op.compute_dtype == torch.float32
    # truth: the float64 Hessian at the bf16 weights with inputs rounded to bf16
    rounded = [(x.to(torch.bfloat16), y) for x, y in batches]

    class CE:
        def __call__(self, logits, y):
            return F.cross_entropy(logits, y)

        @staticmethod
        def weight(batch):
            return batch[0].shape[0]

    exact = _exact_top_eigenvalue(model, rounded, CE())
    from lightning_hessian import top_eigenvalues

    got = top_eigenvalues(op, 1, tol=1e-9, seed=0).values[0].item()
    assert abs(got - exact) <= 1e-5 * abs(exact)
    est = local_volume(model, batches, num_directions=3, measure="lebesgue")
    assert math.isfinite(est.log_volume) and est.num_capped == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.bfloat16
