"""Small model and data builders shared by tests and benchmarks.

Every builder is deterministic given ``seed`` and small enough for a dense float64
Hessian where the docstring says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(d_in: int = 6, hidden: int = 8, d_out: int = 3, depth: int = 2, seed: int = 0) -> nn.Module:
    """Tanh MLP ``d_in -> hidden (x depth-1) -> d_out``."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, hidden), nn.Tanh()]
        d = hidden
    layers.append(nn.Linear(d, d_out))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
    return model


class SmallCNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> pool -> linear, on 1x6x6 inputs (~250 parameters)."""

    def __init__(self, channels: int = 3, n_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, channels, 3)
        self.bn = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(channels * 2 * 2, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.tanh(self.bn(self.conv(x))), 2)
        return self.fc(self.drop(h.flatten(1)))


def cnn_bn(seed: int = 0) -> nn.Module:
    """A :class:`SmallCNN` whose BatchNorm has non-trivial running statistics."""
    model = SmallCNN(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(3, generator=g) * 0.1)
        model.bn.running_var.copy_(1.0 + torch.rand(3, generator=g))
        model.bn.num_batches_tracked.fill_(7)
        model.bn.weight.copy_(1.0 + 0.1 * torch.randn(3, generator=g))
        model.bn.bias.copy_(0.1 * torch.randn(3, generator=g))
    return model


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (a.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for a in (q, k, v))
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Causal decoder with ``F.scaled_dot_product_attention``; ``forward(ids) -> logits``."""

    def __init__(
        self, vocab: int = 11, d: int = 8, heads: int = 2, layers: int = 1, seq: int = 6,
        dropout: float = 0.0, seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(seq, d))
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy for a dict batch ``{"ids": (B, T)}`` (a closure example)."""
    ids = batch["ids"]
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class MergingLoRA(nn.Linear):
    """A LoRA layer in loralib's style: eval() adds B @ A into the weight, train() takes
    it out again (rounding the weight), and forward adds the low-rank path while unmerged."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        g = torch.Generator().manual_seed(3)
        self.lora_a = nn.Parameter(torch.randn(2, n_in, generator=g) / 3)
        self.lora_b = nn.Parameter(torch.randn(n_out, 2, generator=g) / 3)
        self.merged = False

    def train(self, mode=True):
        super().train(mode)
        with torch.no_grad():
            if mode and self.merged:
                self.weight.data -= self.lora_b @ self.lora_a
                self.merged = False
            elif not mode and not self.merged:
                self.weight.data += self.lora_b @ self.lora_a
                self.merged = True
        return self

    def forward(self, x):
        out = super().forward(x)
        return out if self.merged else out + x @ (self.lora_b @ self.lora_a).T


class CheckpointedMLP(nn.Module):
    """``6 -> 16 -> tanh(16) -> 3`` whose middle block runs under reentrant activation
    checkpointing when ``checkpointed`` (forward-mode AD cannot go through it: "must
    override the setup_context staticmethod"); the same weights either way."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.checkpointed = checkpointed
        self.inp = nn.Linear(6, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.checkpointed:
            from torch.utils.checkpoint import checkpoint

            h = checkpoint(self.block, h, use_reentrant=True)
        else:
            h = self.block(h)
        return self.head(h)


def classification_data(n: int = 16, d_in: int = 6, n_classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randint(0, n_classes, (n,), generator=g)


def image_data(n: int = 12, n_classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, n_classes, (n,), generator=g)


def token_data(n: int = 4, seq: int = 7, vocab: int = 11, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, vocab, (n, seq), generator=g)}


def full_batch_steps(mon, model, opt, x, y, steps, after_step=None, start=0,
                     loss_fn=F.cross_entropy):
    """``steps`` optimizer steps of ``loss_fn`` (cross-entropy) on ``(x, y)``, each recorded
    by ``mon`` (``mon.step(step, batch=(x, y), loss=loss)`` from step ``start``);
    ``after_step()`` after each, if given."""
    for step in range(start, start + steps):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step, batch=(x, y), loss=loss)
        if after_step is not None:
            after_step()
