"""Transformer models for the product-cost benchmarks: a tiny Hugging Face GPT-2 and a tiny ViT.

Both are randomly initialised (nothing is downloaded) and sized for a 2-core CPU.

* :func:`gpt2_tiny`: ``transformers.GPT2LMHeadModel`` with 2 layers, width 64, 2 heads, a byte
  vocabulary (256) and 64 positions: 120,576 parameters; 32 sequences of 64 bytes of
  ``pydoc_data.topics`` (CPython's help text), next-byte cross-entropy through the model's own
  ``labels=`` loss, with the KV cache off (``use_cache=False``: a loss needs no cache).
* :func:`vit_tiny`: timm's ``VisionTransformer`` architecture (conv patch embedding, class token,
  learned position embedding, pre-norm blocks of multi-head self-attention through
  ``scaled_dot_product_attention`` and a GELU MLP, final LayerNorm, linear head on the class
  token), written out here because timm cannot be installed next to this torch build (it needs
  torchvision, whose only wheels pull in a different torch). Shape of timm's
  ``vit_tiny_patch16_224`` scaled down: width 64, depth 2, 2 heads, MLP ratio 4, 8x8 patches of
  3x32x32 images (16 patches + the class token), 10 classes: 114,250 parameters; 32 random images.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = Any


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return str(transformers.__version__)


def gpt2_tiny(
    sequences: int = 32, length: int = 64, micro_batch: int = 32, seed: int = 0
) -> tuple[nn.Module, list[Batch], Any]:
    """``(model, batches, batch_loss)`` for the tiny GPT-2 (requires ``transformers``)."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=256,
        n_positions=length,
        n_embd=64,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    model = GPT2LMHeadModel(config).eval()
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics)).encode()
    ids = torch.tensor(list(text[: sequences * length]), dtype=torch.long).view(sequences, length)
    batches = [(ids[i : i + micro_batch],) for i in range(0, sequences, micro_batch)]

    def batch_loss(m: nn.Module, batch: Batch) -> Tensor:
        return m(input_ids=batch[0], labels=batch[0], use_cache=False).loss

    return model, batches, batch_loss


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """timm's ``VisionTransformer`` (class-token pooling, pre-norm blocks), at a CPU-sized scale."""

    def __init__(
        self,
        image: int = 32,
        patch: int = 8,
        dim: int = 64,
        depth: int = 2,
        heads: int = 2,
        mlp_ratio: float = 4.0,
        classes: int = 10,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        tokens = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(images: int = 32, micro_batch: int = 32, seed: int = 0) -> tuple[nn.Module, list[Batch], Any]:
    """``(model, batches, batch_loss)`` for the tiny ViT on random 3x32x32 images, 10 classes."""
    torch.manual_seed(seed)
    model = TinyViT().eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(images, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (images,), generator=g)
    batches = [(x[i : i + micro_batch], y[i : i + micro_batch]) for i in range(0, images, micro_batch)]

    def batch_loss(m: nn.Module, batch: Batch) -> Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    return model, batches, batch_loss
