"""Twelve more healthy recipes, from an audit of recipes outside the first 45 setups.

Contrastive learning (NT-Xent), CutMix, focal loss, two losses of different scales, a
policy gradient, a negative log-likelihood that goes below zero, BYOL, a LoRA fine-tune of
the small GPT, a mixture of experts, Adagrad, Adafactor and a long warm-up. Three of them
(the policy gradient, the Gaussian NLL and CutMix) do not suit the health criterion (a loss
at or below zero, or one that swings with each batch's mixing): their runs are counted
unhealthy; docs/benchmarks.md says how they were judged.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..instability.models import TinyGPT, lm_loss
from .setups import (
    Batch,
    Batches,
    DigitsCNN,
    Setup,
    Trial,
    _digits_trial,
    _schedule,
    cosine_warmup,
    digits,
    mlp,
    pseudo_text,
    sentences,
    windows,
)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A view: random shift by up to 1 pixel, Gaussian noise 0.3, 10 % pixel dropout."""
    b = x.shape[0]
    img = x.view(b, 8, 8)
    out = img.clone()
    sh = torch.randint(-1, 2, (b, 2), generator=g)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            sel = (sh[:, 0] == dx) & (sh[:, 1] == dy)
            if (dx or dy) and sel.any():
                out[sel] = torch.roll(img[sel], (dx, dy), (1, 2))
    out = out + 0.3 * torch.randn(out.shape, generator=g)
    out = out * (torch.rand(out.shape, generator=g) > 0.1)
    return out.view(b, 64)


# ---------------------------------------------------------------- 1. SimCLR / NT-Xent


class SimCLR(nn.Module):
    """Encoder + projector; forward((B, 2, 64) views) -> NT-Xent logits (B, 2, 2B - 1)."""

    def __init__(self, tau: float = 0.1) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                                 nn.Linear(128, 64))
        self.proj = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
        self.tau = tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        z = F.normalize(self.proj(self.enc(torch.cat([x[:, 0], x[:, 1]]))), dim=-1)
        sim = z @ z.T / self.tau
        n = 2 * b
        off = ~torch.eye(n, dtype=torch.bool)
        logits = sim[off].view(n, n - 1)           # the self-similarity removed
        return torch.stack([logits[:b], logits[b:]], 1)


def simclr(seed: int, steps: int, tau: float = 0.1) -> Trial:
    """SimCLR on digits: two augmented views, NT-Xent at tau 0.1, AdamW 1e-3, warm-up+cosine.

    32 pairs per batch; the positive of view 1 of i is view 2 of i (column B + i - 1 once the
    diagonal is removed), of view 2 of i is view 1 of i (column i).
    """
    torch.manual_seed(seed)
    x, _ = digits()
    g = torch.Generator().manual_seed(seed + 100)
    model = SimCLR(tau)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    b = Batches(x, torch.zeros(len(x), dtype=torch.long), 32, seed)
    n = 32
    target = torch.stack([torch.arange(n) + n - 1, torch.arange(n)], 1)

    def batch(s: int) -> Batch:
        xb, _ = b.next()
        return torch.stack([augment(xb, g), augment(xb, g)], 1), target

    return Trial(model, opt, lm_loss, batch, steps, schedule=_schedule(
        opt, lambda s: cosine_warmup(s, steps, 1e-3, min(100, steps))))


# ---------------------------------------------------------------- 2. CutMix on a BN CNN


def cutmix(seed: int, steps: int) -> Trial:
    """BatchNorm CNN, CutMix (alpha 1, every batch), SGD Nesterov 0.05, wd 5e-4, cosine; batch 64.

    Soft targets (the mixed one-hot labels, weighted by the pasted area).
    """
    t = _digits_trial(seed, steps, DigitsCNN, lambda m: torch.optim.SGD(
        m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4), 64)
    base = t.batch
    g = torch.Generator().manual_seed(seed + 200)
    beta = torch.distributions.Beta(1.0, 1.0)

    def batch(s: int) -> Batch:
        xb, yb = base(s)
        img = xb.view(-1, 8, 8).clone()
        torch.manual_seed(seed * 100_000 + s)
        lam = float(beta.sample())
        cut = round(8 * math.sqrt(1 - lam))
        cx, cy = torch.randint(0, 8, (2,), generator=g).tolist()
        x0, x1 = max(cx - cut // 2, 0), min(cx + cut // 2 + cut % 2, 8)
        y0, y1 = max(cy - cut // 2, 0), min(cy + cut // 2 + cut % 2, 8)
        perm = torch.randperm(len(yb), generator=g)
        img[:, x0:x1, y0:y1] = img[perm][:, x0:x1, y0:y1]
        area = (x1 - x0) * (y1 - y0) / 64
        soft = (1 - area) * F.one_hot(yb, 10).float() + area * F.one_hot(yb[perm], 10).float()
        return img.view(-1, 64), soft

    t.batch = batch
    t.loss_fn = lambda out, soft: -(soft * F.log_softmax(out, -1)).sum(-1).mean()
    t.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(t.optimizer, steps)
    return t


# ---------------------------------------------------------------- 3. focal loss


def focal(seed: int, steps: int, gamma: float = 2.0) -> Trial:
    """MLP, focal loss (gamma 2, Lin et al. 2017), Adam 1e-3, batch 64."""
    t = _digits_trial(seed, steps, mlp, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), 64)

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(out, -1).gather(1, y[:, None])[:, 0]
        return (-(1 - logp.exp()) ** gamma * logp).mean()
    t.loss_fn = loss
    return t


# ---------------------------------------------------------------- 4. multi-task


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.cls, self.reg = nn.Linear(128, 10), nn.Linear(128, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return torch.cat([self.cls(h), self.reg(h)], -1)


def multitask(seed: int, steps: int) -> Trial:
    """Shared trunk, a class head (CE ~2.3) and a regression head for the total ink / 10 in
    raw units (mean ~29, MSE at start ~900) weighted 0.1: two losses of different scales.
    Adam 1e-3, batch 64."""
    from sklearn.datasets import load_digits
    torch.manual_seed(seed)
    x, y = digits()
    raw = torch.tensor(load_digits().data, dtype=torch.float32)
    perm = torch.randperm(len(raw), generator=torch.Generator().manual_seed(0))
    ink = raw[perm][:1500].sum(1) / 10
    model = TwoHeads()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    b = Batches(x, torch.stack([y.float(), ink], 1), 64, seed)

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out[:, :10], t[:, 0].long()) + 0.1 * F.mse_loss(out[:, 10], t[:, 1])
    return Trial(model, opt, loss, lambda s: b.next(), steps)


# ---------------------------------------------------------------- 5. REINFORCE bandit


def reinforce(seed: int, steps: int) -> Trial:
    """Contextual bandit on digits: the policy picks a class, reward 1 if right; REINFORCE
    with an EMA baseline (0.9) and entropy bonus 0.01, Adam 1e-3, batch 64. The loss
    -(r - b) log pi(a) - 0.01 H is high-variance and often negative."""
    t = _digits_trial(seed, steps, mlp, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), 64)
    g = torch.Generator().manual_seed(seed + 300)
    base = [0.1]
    rewards: list[float] = []
    t.extra["reward"] = rewards

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(out, -1)
        a = torch.multinomial(logp.detach().exp(), 1, generator=g)[:, 0]
        r = (a == y).float()
        adv = r - base[0]
        base[0] = 0.9 * base[0] + 0.1 * float(r.mean())
        rewards.append(float(r.mean()))
        ent = -(logp.exp() * logp).sum(-1).mean()
        return -(adv * logp.gather(1, a[:, None])[:, 0]).mean() - 0.01 * ent
    t.loss_fn = loss
    return t


# ---------------------------------------------------------------- 6. heteroscedastic NLL


def gaussian_nll(seed: int, steps: int) -> Trial:
    """1-D regression, noise sd 0.05 + 0.3 |x| / 3; MLP predicts mean and log-variance,
    F.gaussian_nll_loss (no constant: negative once sd < ~0.6), Adam 1e-3, batch 64."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 400)
    model = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def batch(s: int) -> Batch:
        x = torch.rand(64, 1, generator=g) * 6 - 3
        sd = 0.05 + 0.3 * x.abs() / 3
        return x, torch.sin(x) * 2 + sd * torch.randn(x.shape, generator=g)

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.gaussian_nll_loss(out[:, :1], y, out[:, 1:].exp())
    return Trial(model, opt, loss, batch, steps)


# ---------------------------------------------------------------- 7. BYOL


class BYOLNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
        self.proj = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
                                  nn.Linear(128, 32))
        self.pred = nn.Sequential(nn.Linear(32, 128), nn.BatchNorm1d(128), nn.ReLU(),
                                  nn.Linear(128, 32))

    def project(self, v: torch.Tensor) -> torch.Tensor:
        return self.proj(self.enc(v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        p = self.pred(self.project(torch.cat([x[:, 0], x[:, 1]])))
        return torch.stack([p[:b], p[b:]], 1)


def byol(seed: int, steps: int) -> Trial:
    """BYOL: an online net with a predictor, an EMA target (tau 0.99 -> 1 on a cosine),
    loss 2 - 2 cos between each view's prediction and the other view's target projection,
    AdamW 1e-3 (wd 1e-4), warm-up 100 + cosine, 64 images per batch."""
    torch.manual_seed(seed)
    x, _ = digits()
    g = torch.Generator().manual_seed(seed + 500)
    model = BYOLNet()
    target = copy.deepcopy(model)
    for p in target.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    b = Batches(x, torch.zeros(len(x), dtype=torch.long), 64, seed)

    def schedule(s: int) -> None:
        for gr in opt.param_groups:
            gr["lr"] = cosine_warmup(s, steps, 1e-3, min(100, steps))
        tau = 1 - (1 - 0.99) * (math.cos(math.pi * s / steps) + 1) / 2
        with torch.no_grad():
            for pt, po in zip(target.parameters(), model.parameters()):
                pt.mul_(tau).add_(po, alpha=1 - tau)
            for bt, bo in zip(target.buffers(), model.buffers()):
                bt.copy_(bo)

    def batch(s: int) -> Batch:
        xb, _ = b.next()
        v = torch.stack([augment(xb, g), augment(xb, g)], 1)
        with torch.no_grad():
            n = v.shape[0]
            z = target.project(torch.cat([v[:, 0], v[:, 1]]))
            return v, torch.stack([z[:n], z[n:]], 1)

    def loss(out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        p, z = F.normalize(out, dim=-1), F.normalize(z.flip(1), dim=-1)
        return (2 - 2 * (p * z).sum(-1)).mean() * 2
    return Trial(model, opt, loss, batch, steps, schedule=schedule)


# ---------------------------------------------------------------- 8. LoRA fine-tune


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, r))
        self.scale = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale


def other_text(length: int = 100_000) -> torch.Tensor:
    """Another English-like text (300 other words, the same alphabet) in pseudo_text's codes."""
    text = sentences(length, seed=4321, words=300, closed=0.5, zipf=1.2, lengths=(3, 10))
    code = {c: i for i, c in enumerate(sorted(set(sentences(200_000))))}  # pseudo_text's
    return torch.tensor([code.get(c, code[" "]) for c in text])


def lora_gpt(seed: int, steps: int) -> Trial:
    """TinyGPT (2 blocks, 64 wide) pre-trained 400 steps (10 per step of a shorter run) on
    pseudo_text (AdamW 3e-3, unmonitored), frozen; rank-8 LoRA (alpha 16) on qkv, proj,
    fc, out; fine-tuned on another text with AdamW 1e-3 (wd 0), warm-up 50 + cosine; 32
    windows of 32."""
    torch.manual_seed(seed)
    data, vocab = pseudo_text()
    g = torch.Generator().manual_seed(seed + 600)
    model = TinyGPT(vocab, dim=64, depth=2, context=32)
    popt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    pb = windows(data, 32, 32, g)
    pretraining = min(400, 10 * steps)  # 400 in the benchmark; fewer in a smoke test
    for s in range(pretraining):
        for gr in popt.param_groups:
            gr["lr"] = cosine_warmup(s, pretraining, 3e-3, min(50, pretraining))
        xb, yb = pb(s)
        loss = lm_loss(model(xb), yb)
        popt.zero_grad()
        loss.backward()
        popt.step()
    for p in model.parameters():
        p.requires_grad_(False)
    for blk in model.blocks:
        for name in ("qkv", "proj", "fc", "out"):
            setattr(blk, name, LoRALinear(getattr(blk, name)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    fb = windows(other_text(), 32, 32, g)
    return Trial(model, opt, lm_loss, fb, steps, schedule=_schedule(
        opt, lambda s: cosine_warmup(s, steps, 1e-3, min(50, steps))))


# ---------------------------------------------------------------- 9. mixture of experts


class MoE(nn.Module):
    """Linear 64-128, a top-2 MoE layer of 4 expert MLPs (128-256-128) with a softmax router,
    linear head; ``aux`` is the Switch load-balancing loss of the last forward."""

    def __init__(self, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 128)
        self.router = nn.Linear(128, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(128, 256), nn.ReLU(),
                                                   nn.Linear(256, 128)) for _ in range(experts))
        self.head = nn.Linear(128, 10)
        self.k, self.n = k, experts
        self.aux = torch.tensor(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x))
        probs = F.softmax(self.router(h), -1)
        topv, topi = probs.topk(self.k, -1)
        gates = topv / topv.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for e in range(self.n):
            sel = (topi == e)
            rows = sel.any(-1)
            if rows.any():
                w = (gates * sel).sum(-1)[rows, None]
                out[rows] += w * self.experts[e](h[rows])
        frac = F.one_hot(topi[:, 0], self.n).float().mean(0)
        self.aux = self.n * (frac * probs.mean(0)).sum()
        return self.head(F.relu(h + out))


def moe(seed: int, steps: int) -> Trial:
    """Top-2 MoE MLP with load-balancing loss 0.01, Adam 1e-3, batch 64."""
    t = _digits_trial(seed, steps, MoE, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), 64)
    model = t.model
    t.loss_fn = lambda out, y: F.cross_entropy(out, y) + 0.01 * model.aux
    return t


# ---------------------------------------------------------------- 10-11. Adagrad, Adafactor


def adagrad(seed: int, steps: int) -> Trial:
    """MLP, Adagrad lr 0.05, batch 32."""
    return _digits_trial(seed, steps, mlp, lambda m: torch.optim.Adagrad(m.parameters(), lr=0.05),
                         32)


def adafactor(seed: int, steps: int) -> Trial:
    """MLP, torch.optim.Adafactor at lr 1e-2 (its relative step min(lr, 1/sqrt(t)) scaled by
    the parameters' RMS), batch 32."""
    return _digits_trial(seed, steps, mlp,
                         lambda m: torch.optim.Adafactor(m.parameters(), lr=1e-2), 32)


# ---------------------------------------------------------------- 12. GPT long warm-up


def gpt_long_warmup(seed: int, steps: int, lr: float = 3e-3) -> Trial:
    """TinyGPT char LM on pseudo_text, AdamW 3e-3 (betas 0.9/0.95, wd 0.1), warm-up over the
    first third, cosine to lr/10; 32 windows of 32."""
    torch.manual_seed(seed)
    data, vocab = pseudo_text()
    g = torch.Generator().manual_seed(seed + 700)
    model = TinyGPT(vocab, dim=64, depth=2, context=32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    return Trial(model, opt, lm_loss, windows(data, 32, 32, g), steps, schedule=_schedule(
        opt, lambda s: cosine_warmup(s, steps, lr, steps // 3, lr * 0.1)))


RECIPES = [
    Setup("simclr_t0.1", "SimCLR NT-Xent tau 0.1, two views, AdamW 1e-3", 1500, simclr),
    Setup("cutmix_bncnn_sgd", "BN CNN, CutMix, SGD Nesterov 0.05 cosine", 1200, cutmix),
    Setup("focal_adam", "MLP, focal loss gamma 2, Adam 1e-3", 1200, focal),
    Setup("multitask", "trunk + CE head + 0.1 x MSE head (raw units)", 1500, multitask),
    Setup("reinforce_bandit", "REINFORCE contextual bandit, EMA baseline", 2000, reinforce),
    Setup("gaussian_nll", "heteroscedastic Gaussian NLL regression, Adam", 2000, gaussian_nll),
    Setup("byol_ema", "BYOL, EMA target, AdamW 1e-3", 1500, byol),
    Setup("lora_gpt", "TinyGPT LoRA r8 fine-tune on new text", 1000, lora_gpt),
    Setup("moe_top2", "top-2 MoE, load-balancing 0.01, Adam", 1500, moe),
    Setup("adagrad", "MLP, Adagrad 0.05", 1500, adagrad),
    Setup("adafactor", "MLP, Adafactor 1e-2", 1500, adafactor),
    Setup("gpt_long_warmup", "TinyGPT char LM, AdamW 3e-3, 500-step warm-up", 1500,
          gpt_long_warmup),
]
