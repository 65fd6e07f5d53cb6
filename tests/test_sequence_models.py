"""Sequence models end to end: attention kernels, token-weighted losses, a tiny GPT under Lightning.

Truth is the exact float64 Hessian by double backward (``torch.autograd.functional.hessian``,
checked symmetric; ``torch.func.hessian`` is wrong through ``nn.LayerNorm`` in torch 2.13), with
attention computed *explicitly* (softmax(QK^T/sqrt(d))V, or ``MultiheadAttention``'s
``need_weights=True`` path) where the model allows it, so that the truth does not depend on the
SDPA kernel under test.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianOperator, top_eigenvalues
from lightning_hessian.callbacks import HessianMonitor, LocalVolumeMonitor
from lightning_hessian.callbacks._base import valid_target_count
from lightning_hessian.operators import derivative_friendly_attention
from lightning_hessian.volume import local_volume
from tests.lightning_helpers import trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 7


def _load_example():
    spec = importlib.util.spec_from_file_location("tiny_gpt_text", ROOT / "examples" / "tiny_gpt_text.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tiny_gpt_text", module)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# Models: attention through SDPA (the object under test) or computed explicitly (the truth)
# --------------------------------------------------------------------------------------------


class SDPAModel(nn.Module):
    """Embedding -> one attention head pair through ``F.scaled_dot_product_attention`` -> logits."""

    def __init__(self, causal: bool, dim: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.causal, self.heads = causal, heads
        self.emb = nn.Embedding(VOCAB, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, VOCAB)
        self.explicit = False  # True: softmax(QK^T/sqrt(d))V by hand (the truth)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids)
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, -1))
        if self.explicit:
            scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
            if self.causal:
                mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
                scores = scores.masked_fill(~mask, float("-inf"))
            y = scores.softmax(-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(torch.tanh(x + y.transpose(1, 2).reshape(b, t, d)))


class MHAModel(nn.Module):
    """``nn.MultiheadAttention`` (``need_weights=False``: SDPA; ``True``: explicit, the truth)."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.out = nn.Linear(dim, VOCAB)
        self.explicit = False

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids)
        y, _ = self.attn(x, x, x, need_weights=self.explicit, average_attn_weights=False)
        return self.out(x + y)


class EncoderModel(nn.Module):
    """``nn.TransformerEncoderLayer`` (LayerNorms, SDPA self-attention, GELU MLP)."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.layer = nn.TransformerEncoderLayer(
            dim, 2, dim_feedforward=6, dropout=0.0, batch_first=True, activation="gelu"
        )
        self.out = nn.Linear(dim, VOCAB)
        self.explicit = False  # the truth runs SDPA on its math kernel (a composite of plain ops)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(self.layer(self.emb(ids)))


def _token_data(seed: int = 0, batches: int = 2, batch_size: int = 2, seq_len: int = 4) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=g)
        out.append((ids, torch.randint(0, VOCAB, (batch_size, seq_len), generator=g)))
    return out


def _token_mean_loss(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
    """The exact token-mean cross-entropy over every counted target of every batch."""
    total = sum(int((y != -100).sum()) for _, y in batches)
    loss = 0.0
    for ids, y in batches:
        logits = model(ids)
        loss = loss + F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum", ignore_index=-100
        )
    return loss / total


def _exact_hessian(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Float64 double-backward Hessian of the token-mean loss (explicit attention), checked symmetric."""
    model.explicit = True
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1).double() for _, p in named])

    def loss(flat: Tensor) -> Tensor:
        params, offset = {}, 0
        for name, p in named:
            params[name] = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return _token_mean_loss(lambda ids: torch.func.functional_call(model, params, (ids,)), batches)

    try:
        with derivative_friendly_attention():
            # reverse-over-reverse, rows batched with vmap over the second backward
            hess = torch.autograd.functional.hessian(loss, flat0, vectorize=True)
            # cross-check two columns by plain (unbatched) double backward
            flat = flat0.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss(flat), flat, create_graph=True)
            for j in (0, flat0.numel() - 1):
                (column,) = torch.autograd.grad(grad[j], flat, retain_graph=True)
                assert torch.allclose(column, hess[:, j], rtol=0, atol=1e-12 * hess.abs().max())
    finally:
        model.explicit = False
    assert torch.allclose(hess, hess.T, rtol=0, atol=1e-12 * hess.abs().max())
    return hess


def _ce(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# --------------------------------------------------------------------------------------------
# 1. HVPs through SDPA = exact float64 HVPs, both backends
# --------------------------------------------------------------------------------------------

MODELS = {
    "sdpa-causal": lambda: SDPAModel(causal=True),
    "sdpa-bidirectional": lambda: SDPAModel(causal=False),
    "multihead-attention": MHAModel,
    "transformer-encoder-layer": EncoderModel,
}


@pytest.fixture(scope="module", params=list(MODELS))
def attention_truth(request):
    torch.manual_seed(0)
    model = MODELS[request.param]().double()
    model.eval()
    batches = _token_data()
    return request.param, model, batches, _exact_hessian(model, batches)


@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_hvps_through_attention_equal_the_exact_hessian(attention_truth, backend):
    name, model, batches, hess = attention_truth
    op = HessianOperator(model, _ce, batches, backend=backend, func_min_vectors=1)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(op.num_params, 3, generator=g, dtype=torch.float64)
    got = op.matmat(v)
    want = hess @ v
    assert op.backend == backend
    assert (got - want).norm() <= 1e-10 * want.norm(), name
    single = op.matvec(v[:, 0])  # the single-vector path (no vmap) too
    assert (single - want[:, 0]).norm() <= 1e-10 * want[:, 0].norm()


def test_fused_kernel_is_selected_outside_and_math_kernel_inside_the_analysis():
    """The SDPA selection is math-only during HVPs and volume passes, and restored afterwards."""
    flags_seen: list[bool] = []

    def recording_loss(model: nn.Module, batch) -> Tensor:
        flags_seen.append(torch.backends.cuda.flash_sdp_enabled())
        return _ce(model(batch[0]), batch[1])

    def recording_outputs(model: nn.Module, batch) -> Tensor:
        flags_seen.append(torch.backends.cuda.flash_sdp_enabled())
        return model(batch[0])

    torch.manual_seed(0)
    model = SDPAModel(causal=True)
    before = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )
    assert before[0]  # the fused kernels are on by default
    op = HessianOperator(model, data=_token_data(), batch_loss=recording_loss)
    op.matvec(torch.ones(op.num_params))
    local_volume(model, _token_data(), output_fn=recording_outputs, num_directions=2, measure="lebesgue")
    assert flags_seen and not any(flags_seen)
    after = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )
    assert after == before


def test_interleaved_analysis_blocks_restore_the_selection():
    """Blocks exited out of order (threads simulating ranks) leave the fused kernels selected."""
    assert torch.backends.cuda.flash_sdp_enabled()
    first, second = derivative_friendly_attention(), derivative_friendly_attention()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the outer block ends first
    assert not torch.backends.cuda.flash_sdp_enabled()  # the second block is still running
    second.__exit__(None, None, None)
    assert torch.backends.cuda.flash_sdp_enabled()


# --------------------------------------------------------------------------------------------
# 3. Token-weighted losses on padded sequences
# --------------------------------------------------------------------------------------------


def _padded_batches() -> list[tuple[Tensor, Tensor]]:
    """Two micro-batches of 3 sequences: full-length ones (18 tokens) and short ones (4 tokens)."""
    g = torch.Generator().manual_seed(3)
    long_ids = torch.randint(0, VOCAB, (3, 6), generator=g)
    long_y = torch.randint(0, VOCAB, (3, 6), generator=g)
    short_ids = torch.randint(0, VOCAB, (3, 6), generator=g)
    short_y = torch.randint(0, VOCAB, (3, 6), generator=g)
    lengths = [2, 1, 1]
    for row, length in enumerate(lengths):
        short_ids[row, length:] = 0  # padding token
        short_y[row, length:] = -100
    return [(long_ids, long_y), (short_ids, short_y)]


def test_token_weighting_gives_the_token_mean_hessian_on_padded_sequences():
    torch.manual_seed(0)
    model = SDPAModel(causal=True).double()
    batches = _padded_batches()
    assert [valid_target_count(b) for b in batches] == [18.0, 4.0]
    hess = _exact_hessian(model, batches)
    exact_top = float(torch.linalg.eigvalsh(hess)[-1])

    def ce(logits: Tensor, targets: Tensor) -> Tensor:  # mean over counted tokens, as F.cross_entropy
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    tokens = HessianOperator(model, ce, batches, batch_size_fn=valid_target_count)
    v = torch.randn(tokens.num_params, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (tokens.matmat(v) - hess @ v).norm() <= 1e-10 * (hess @ v).norm()
    top = top_eigenvalues(tokens, 1, tol=1e-8, seed=0).values[0].item()
    assert abs(top - exact_top) <= 1e-3 * abs(exact_top)

    sequences = HessianOperator(model, ce, batches)  # default weight: sequences per micro-batch
    seq_top = top_eigenvalues(sequences, 1, tol=1e-8, seed=0).values[0].item()
    assert abs(seq_top - exact_top) >= 0.03 * abs(exact_top)  # several per cent off


def test_local_volume_loss_cost_uses_batch_size_fn():
    """cost='loss' with token weights = the same cost on one merged batch (a plain token mean)."""
    torch.manual_seed(0)
    model = SDPAModel(causal=True).double()
    batches = _padded_batches()
    merged = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]

    def ce(logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    kwargs = dict(cost="loss", loss_fn=ce, num_directions=3, measure="lebesgue", seed=0, rel_tol=1e-8)
    truth = local_volume(model, merged, **kwargs)
    by_tokens = local_volume(model, batches, batch_size_fn=valid_target_count, **kwargs)
    by_sequences = local_volume(model, batches, **kwargs)
    assert torch.allclose(by_tokens.log_radii, truth.log_radii, rtol=0, atol=1e-6)
    assert (by_sequences.log_radii - truth.log_radii).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# Lightning: a tiny GPT with both monitors; logged top eigenvalue = exact
# --------------------------------------------------------------------------------------------


def _padded_sequences(count: int = 12, seq_len: int = 6, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (count, seq_len), generator=g)
    targets = torch.randint(0, VOCAB, (count, seq_len), generator=g)
    lengths = torch.randint(1, seq_len + 1, (count,), generator=g)
    for row, length in enumerate(lengths.tolist()):
        ids[row, length:] = 0
        targets[row, length:] = -100
    return TensorDataset(ids, targets)


def test_tiny_gpt_fit_with_both_monitors_logs_the_exact_top_eigenvalue():
    example = _load_example()

    class Module(example.TinyGPTModule):
        def training_step(self, batch, batch_idx):
            ids, targets = batch
            flags.append(torch.backends.cuda.flash_sdp_enabled())
            logits = self(ids)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    flags: list[bool] = []
    data = _padded_sequences()
    analysis = DataLoader(data, batch_size=5)  # micro-batches of 5, 5, 2 sequences, unequal token counts
    hessian = HessianMonitor(dataloader=analysis, num_runs=1, num_steps=30, hvp_precision="float64", log_density=False)
    volume = LocalVolumeMonitor(dataloader=analysis, num_directions=4, mask_fn=lambda batch: batch[1] != -100)
    pl.seed_everything(0, verbose=False)
    module = Module(VOCAB, 6, dim=4, layers=1, heads=2, lr=1e-2)
    trainer = pl.Trainer(callbacks=[hessian, volume], **trainer_kwargs(max_epochs=2))
    trainer.fit(module, DataLoader(data, batch_size=4, shuffle=True))
    assert trainer.current_epoch == 2 and flags and all(flags)  # training kept the fused kernel
    assert len(hessian.history) == 2 and len(volume.history) == 2
    assert all(math.isfinite(row["log_volume"]) for row in volume.history)

    gpt = module.gpt
    copy64 = example.TinyGPT(VOCAB, 6, dim=4, layers=1, heads=2).double()
    copy64.load_state_dict({k: v.double() for k, v in gpt.state_dict().items()})
    copy64.explicit = False
    batches = [(ids, y) for ids, y in analysis]
    hess = _exact_hessian(copy64, batches)
    exact_top = float(torch.linalg.eigvalsh(hess)[-1])
    logged = hessian.history[-1]["top_eigenvalue"]
    assert abs(logged - exact_top) <= 1e-3 * abs(exact_top)
