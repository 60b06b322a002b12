"""Small models and locally generated tasks for the instability suite (no downloads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-LayerNorm block: causal multi-head attention (optional QK-layernorm) and a GELU MLP."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)
        hd = dim // heads
        self.q_norm = nn.LayerNorm(hd) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(hd) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        q, k = self.q_norm(q), self.k_norm(k)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Decoder-only transformer: ``forward(tokens (B, T)) -> logits (B, T, vocab)``."""

    def __init__(self, vocab: int = 16, dim: int = 64, depth: int = 2, heads: int = 4,
                 context: int = 32, qk_norm: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, qk_norm) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over every position (in float32)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition function (Wortsman et al. 2023's z-loss, times 1)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def progressions(n: int, length: int, vocab: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a + b t) mod vocab`` for random ``a``, ``b``: every token after the second is
    predictable from the two before it, through attention. Returns inputs, next tokens."""
    a = torch.randint(0, vocab, (n, 1), generator=generator)
    b = torch.randint(1, vocab, (n, 1), generator=generator)
    seq = (a + b * torch.arange(length + 1)) % vocab
    return seq[:, :-1], seq[:, 1:]


def noisy_targets(n: int, length: int, vocab: int, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A corrupted batch: clean progressions with uniform random next-token targets (label
    noise; random inputs *and* targets reach 10x the loss on only 1 seed of 3)."""
    x, y = progressions(n, length, vocab, generator)
    return x, torch.randint(0, vocab, y.shape, generator=generator)


class SmallCNN(nn.Module):
    """Two 3x3 conv layers (ReLU, max-pool) and a linear head on 1x12x12 images."""

    def __init__(self, classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 3 * 3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc(h.flatten(1))


class Templates:
    """Images = one of ``classes`` fixed random templates plus Gaussian noise (learnable to
    near-zero loss)."""

    def __init__(self, classes: int = 4, noise: float = 0.8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(10_000 + seed)
        self.templates = torch.randn(classes, 1, 12, 12, generator=g)
        self.classes, self.noise = classes, noise

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, self.classes, (n,), generator=generator)
        x = self.templates[y] + self.noise * torch.randn(n, 1, 12, 12, generator=generator)
        return x, y
