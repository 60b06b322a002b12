"""The healthy setups: small models on digits or local data, trained the way real loops train.

Each :class:`Setup` is one of the false-alarm hunt's setups, under the name its runs had
there (the hunt's own function name is kept as ``hunt_key``, and ``--setups`` accepts
either), or one of the nine recipes of a later audit of healthy recipes the hunt did not
try (character LSTM and GRU language models, a ViT, a VAE with KL warm-up, distillation, a
normalisation-free residual MLP, label noise, Lion, SWA; no ``hunt_key``).
``build(seed, steps)`` returns a :class:`Trial`: the model, the optimizer, the batches and
the loop's mechanics; the harness runs it. At the full size (``steps`` = the setup's
``steps``) a trial is the hunt's (or the audit's) run op for op (same construction order,
same generators), so its losses and findings can be compared with theirs; ``--small``
passes fewer steps and the schedules shrink with them.

Data: scikit-learn's bundled digits (1,797 8x8 images, no download), standardised and
shuffled with a fixed generator, the first 1,500 for training; the regression, modular
arithmetic and sequence tasks and an English-like character corpus are generated here.
Models: an MLP, a BatchNorm CNN for 8x8 images, the instability suite's ``TinyGPT`` and
``lm_loss``, and for the audit's recipes a character RNN, a ViT, a VAE and a residual MLP.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..instability.models import TinyGPT, lm_loss

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Trial:
    """One training run: what the harness's loop needs.

    Attributes:
        model: the model.
        optimizer: its optimizer (the monitor hooks it).
        loss_fn: ``loss_fn(model(x), y)``, the loss trained and reported.
        batch: ``batch(step)``, the next training batch (one micro-batch per call).
        steps: optimizer steps.
        schedule: called before each step with the step: sets the learning rates.
        scheduler: a ``torch.optim.lr_scheduler`` stepped after every optimizer step.
        clip: ``clip_grad_norm_``'s max norm; the norm before clipping goes to the monitor.
        accumulate: micro-batches per optimizer step (gradient accumulation).
        per_micro: with ``accumulate``, call the monitor after every micro-batch (its step
            counts micro-batches) instead of once per optimizer step with the mean loss.
        scaler: a ``torch.amp.GradScaler`` that scales the backward and skips the steps
            whose gradients overflow.
        extra: counters the loop fills in (the scaler's skipped steps).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    batch: Callable[[int], Batch]
    steps: int
    schedule: Callable[[int], None] | None = None
    scheduler: Any = None
    clip: float | None = None
    accumulate: int = 1
    per_micro: bool = False
    scaler: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    """A healthy training setup.

    Attributes:
        name: the name of its runs in the hunt (``per_setup_final.txt``) or in the
            healthy-recipes audit.
        what: one line on what it trains and why it is a hard case.
        steps: optimizer steps at the full size.
        build: ``build(seed, steps)`` -> :class:`Trial`.
        hunt_key: the hunt's name for it (``setups.py NAME``); empty for the audit's
            recipes.
        excluded: why its runs never count as healthy, whatever the criterion says (a task
            that changes on purpose); empty for the others.
    """

    name: str
    what: str
    steps: int
    build: Callable[[int, int], Trial] = field(repr=False)
    hunt_key: str = ""
    excluded: str = ""


# ------------------------------------------------------------------------------ helpers


@functools.lru_cache(maxsize=2)
def digits(unit: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised digits, shuffled with a fixed generator: the 1,500 training images.

    ``unit``: the pixels divided by 16, in [0, 1] (Bernoulli targets), not standardised.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = x / 16.0 if unit else (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1500], y[:1500]


class Batches:
    """Shuffled minibatches without replacement, reshuffled when an epoch runs out."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int, seed: int = 0) -> None:
        self.x, self.y, self.size = x, y, size
        self.g = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(len(y), generator=self.g)
        self.pos = 0

    def next(self, size: int | None = None) -> Batch:
        """The next batch of ``size`` samples (the default size without one)."""
        size = size or self.size
        if self.pos + size > len(self.y):
            self.perm = torch.randperm(len(self.y), generator=self.g)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + size]
        self.pos += size
        return self.x[idx], self.y[idx]


def pretrain(model: nn.Module, opt: torch.optim.Optimizer, batches: Batches,
             steps: int) -> None:
    """Train ``model`` on ``batches`` with the cross-entropy, unmonitored (a teacher, a body)."""
    for _ in range(steps):
        xb, yb = batches.next()
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()


@functools.lru_cache(maxsize=1)
def sentences(length: int, seed: int = 1234, words: int = 400, closed: float = 0.3,
              zipf: float = 1.1, lengths: tuple[int, int] = (4, 13)) -> str:
    """English-like text: sentences of pseudo-words, capitalised, ending in ". ".

    ``words`` pseudo-words of 1-3 consonant-vowel syllables (a closing consonant with
    probability ``closed``), drawn with Zipf weights of exponent ``zipf``, ``lengths`` words
    a sentence (``numpy``'s ``integers`` bounds); a fixed generator of ``seed``.
    """
    rng = np.random.default_rng(seed)
    cons, vows = list("bcdfghjklmnprstvwz"), list("aeiouy")
    vocabulary: set[str] = set()
    while len(vocabulary) < words:
        vocabulary.add("".join(rng.choice(cons) + rng.choice(vows)
                               + (rng.choice(cons) if rng.random() < closed else "")
                               for _ in range(rng.integers(1, 4))))
    vocab = sorted(vocabulary)
    p = 1.0 / np.arange(1, len(vocab) + 1) ** zipf
    p /= p.sum()
    out, total = [], 0
    while total < length:
        s = " ".join(vocab[i] for i in rng.choice(len(vocab), size=rng.integers(*lengths), p=p))
        out.append(s[0].upper() + s[1:] + ". ")
        total += len(out[-1])
    return "".join(out)[:length]


def pseudo_text(length: int = 200_000) -> tuple[torch.Tensor, int]:
    """English-like text as character codes, and the number of distinct characters.

    Sentences of 4-12 pseudo-words (1-3 consonant-vowel syllables, 400 words drawn with
    Zipf weights, exponent 1.1), capitalised, ending in ". " (:func:`sentences`). A fixed
    generator: the text is the same for every seed.
    """
    text = sentences(length)
    code = {c: i for i, c in enumerate(sorted(set(text)))}
    return torch.tensor([code[c] for c in text]), len(code)


def text_windows(length: int, size: int, seed: int) -> Callable[[int], Batch]:
    """``batch(step)``: ``size`` random windows of :func:`pseudo_text` and their next characters."""
    return windows(pseudo_text()[0], length, size, torch.Generator().manual_seed(seed))


def windows(data: torch.Tensor, length: int, size: int,
            g: torch.Generator) -> Callable[[int], Batch]:
    """``batch(step)``: ``size`` windows of ``length`` codes of ``data`` drawn from ``g``,
    and their next codes."""
    offsets = torch.arange(length + 1)

    def batch(step: int) -> Batch:
        w = data[torch.randint(0, len(data) - length - 1, (size,), generator=g)[:, None]
                 + offsets]
        return w[:, :-1], w[:, 1:]
    return batch


def mlp(inputs: int = 64, hidden: int = 128, outputs: int = 10, depth: int = 2,
        dropout: float = 0.0) -> nn.Sequential:
    """ReLU MLP with ``depth`` hidden layers (optional dropout after each)."""
    layers: list[nn.Module] = []
    d = inputs
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        d = hidden
    layers.append(nn.Linear(d, outputs))
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """Two 3x3 conv layers with BatchNorm, ReLU and max-pooling on 8x8 digits, linear head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, width, 3, padding=1)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.b2 = nn.BatchNorm2d(2 * width)
        self.drop = nn.Dropout(0.0)  # the hunt's model had this no-op module: same layers
        self.fc = nn.Linear(2 * width * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of flattened (B, 64) or (B, 1, 8, 8) images."""
        x = x.view(-1, 1, 8, 8)
        h = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        h = F.max_pool2d(F.relu(self.b2(self.c2(h))), 2)
        return self.fc(self.drop(h.flatten(1)))


class LastToken(nn.Module):
    """A language model's logits at the last position, first ``classes`` entries."""

    def __init__(self, model: nn.Module, classes: int) -> None:
        super().__init__()
        self.m, self.classes = model, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens -> (B, classes) logits."""
        return self.m(x)[:, -1, :self.classes]


def cosine_warmup(step: int, total: int, base: float, warmup: int, floor: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``base`` to ``floor``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * p))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for g in opt.param_groups:
        g["lr"] = lr


def _schedule(opt: torch.optim.Optimizer, lr: Callable[[int], float]) -> Callable[[int], None]:
    return lambda step: set_lr(opt, lr(step))


def _digits_trial(seed: int, steps: int, model: Callable[[], nn.Module],
                  optimizer: Callable[[nn.Module], torch.optim.Optimizer], size: int,
                  **kw: Any) -> Trial:
    """Minibatches of the digits: seed, data, model, optimizer, batches (the hunt's order)."""
    torch.manual_seed(seed)
    x, y = digits()
    m = model()
    opt = optimizer(m)
    b = Batches(x, y, size, seed)
    return Trial(m, opt, F.cross_entropy, lambda s: b.next(), steps, **kw)


# ------------------------------------------------------------------------------ schedules


def cosine_warmup_adamw(seed: int, steps: int, lr: float = 3e-3) -> Trial:
    """AdamW (wd 0.01), 100 warm-up steps, cosine decay; batch 32."""
    t = _digits_trial(seed, steps, mlp,
                      lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01), 32)
    t.schedule = _schedule(t.optimizer, lambda s: cosine_warmup(s, steps, lr, min(100, steps)))
    return t


def cosine_warmup_sgd(seed: int, steps: int, lr: float = 0.2) -> Trial:
    """SGD momentum 0.9 (wd 5e-4) at lr 0.2, 100 warm-up steps, cosine decay; batch 64."""
    t = _digits_trial(seed, steps, mlp, lambda m: torch.optim.SGD(
        m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4), 64)
    t.schedule = _schedule(t.optimizer, lambda s: cosine_warmup(s, steps, lr, min(100, steps)))
    return t


def sgdr_sgd(seed: int, steps: int, lr: float = 0.1) -> Trial:
    """SGD momentum with warm restarts (T_0 100, T_mult 2): the LR jumps back up 3 times."""
    t = _digits_trial(seed, steps, mlp,
                      lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), 32)
    t.scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(t.optimizer, T_0=100,
                                                                       T_mult=2)
    return t


def sgdr_adam(seed: int, steps: int, lr: float = 3e-3) -> Trial:
    """Adam with warm restarts every 150 steps."""
    t = _digits_trial(seed, steps, mlp, lambda m: torch.optim.Adam(m.parameters(), lr=lr), 32)
    t.scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(t.optimizer, T_0=150,
                                                                       T_mult=1)
    return t


def onecycle_sgd(seed: int, steps: int, lr: float = 0.3) -> Trial:
    """BatchNorm CNN, SGD Nesterov, one-cycle to lr 0.3; batch 64."""
    t = _digits_trial(seed, steps, DigitsCNN, lambda m: torch.optim.SGD(
        m.parameters(), lr=lr, momentum=0.9, nesterov=True), 64)
    t.scheduler = torch.optim.lr_scheduler.OneCycleLR(t.optimizer, max_lr=lr, total_steps=steps)
    return t


def onecycle_adamw(seed: int, steps: int, lr: float = 1e-2) -> Trial:
    """AdamW (wd 0.05), one-cycle to lr 0.01."""
    t = _digits_trial(seed, steps, mlp, lambda m: torch.optim.AdamW(
        m.parameters(), lr=lr, weight_decay=0.05), 32)
    t.scheduler = torch.optim.lr_scheduler.OneCycleLR(t.optimizer, max_lr=lr, total_steps=steps)
    return t


def step_decay_sgd(seed: int, steps: int) -> Trial:
    """SGD momentum at lr 0.1, x0.1 at 1/3 and 2/3 of the run."""
    t = _digits_trial(seed, steps, mlp,
                      lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), 32)
    t.scheduler = torch.optim.lr_scheduler.MultiStepLR(
        t.optimizer, [steps // 3, 2 * steps // 3], 0.1)
    return t


# ------------------------------------------------------------------------------ loop mechanics


def grad_accum(seed: int, steps: int, per_micro: bool = False) -> Trial:
    """AdamW, 4 micro-batches of 16 per step.

    The monitor sees the mean loss once per step, without outputs (``per_micro``: after
    every micro-batch, mid-accumulation).
    """
    t = _digits_trial(seed, steps, mlp, lambda m: torch.optim.AdamW(
        m.parameters(), lr=2e-3, weight_decay=0.01), 16)
    t.accumulate, t.per_micro = 4, per_micro
    return t


def gradscaler_skips(seed: int, steps: int) -> Trial:
    """Adam through a real ``torch.amp.GradScaler`` on CPU at its largest scale, 2^127.

    The hunt meant it to overflow and skip steps; it never does (0 skipped steps in the
    hunt's runs and here, ``extra["skipped"]``): the scaled loss is inf, but autograd never
    reads it, and fp32 gradients times 2^127 stay finite below 2; growth would reach inf,
    which the scaler refuses. So it checks the scaler's step / unscale path, not skipping.
    """
    t = _digits_trial(seed, steps, mlp, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), 32)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=40)
    return t


def clip_grad(seed: int, steps: int) -> Trial:
    """SGD momentum with ``clip_grad_norm_(1.0)``; the monitor gets the norm before clipping."""
    return _digits_trial(seed, steps, mlp,
                         lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), 32,
                         clip=1.0)


def batch_size_change(seed: int, steps: int) -> Trial:
    """Adam; batch 128, then 8 from 1/3 of the run, then 256 from 2/3."""
    torch.manual_seed(seed)
    x, y = digits()
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    b = Batches(x, y, 128, seed)

    def batch(s: int) -> Batch:
        return b.next(128 if s < steps // 3 else (8 if s < 2 * steps // 3 else 256))
    return Trial(model, opt, F.cross_entropy, batch, steps)


def remainder_batch(seed: int, steps: int) -> Trial:
    """SGD momentum, batch 64 over 1,473 images as a ``DataLoader(drop_last=False)`` reads
    them: every epoch (24 steps) ends on a batch of one image (review of session 40)."""
    torch.manual_seed(seed)
    x, y = digits()
    x, y = x[:23 * 64 + 1], y[:23 * 64 + 1]
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    epoch: list[torch.Tensor] = []

    def batch(s: int) -> Batch:
        if not epoch:  # a new epoch, shuffled, cut into 23 batches of 64 and one of 1
            epoch.extend(torch.randperm(len(y), generator=g).split(64))
        idx = epoch.pop(0)
        return x[idx], y[idx]
    return Trial(model, opt, F.cross_entropy, batch, steps)


def batch_size_shrink_sgd(seed: int, steps: int) -> Trial:
    """SGD momentum; batch 256, then 16 from half the run (the gradient noise jumps)."""
    torch.manual_seed(seed)
    x, y = digits()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    b = Batches(x, y, 256, seed)
    return Trial(model, opt, F.cross_entropy,
                 lambda s: b.next(256 if s < steps // 2 else 16), steps)


# ------------------------------------------------------------------------------ losses, data


def label_smoothing(seed: int, steps: int) -> Trial:
    """Adam, cross-entropy with label smoothing 0.1 (the loss floor is well above 0)."""
    t = _digits_trial(seed, steps, mlp, lambda m: torch.optim.Adam(m.parameters(), lr=2e-3), 32)
    t.loss_fn = functools.partial(F.cross_entropy, label_smoothing=0.1)
    return t


def _overfit(seed: int, steps: int, sgd: bool) -> Trial:
    torch.manual_seed(seed)
    x, y = digits()
    x, y = x[:256], y[:256]
    model = mlp(hidden=256)
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if sgd
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    b = Batches(x, y, 32, seed)
    return Trial(model, opt, F.cross_entropy, lambda s: b.next(), steps)


def overfit_adam(seed: int, steps: int) -> Trial:
    """256 images to 100 % training accuracy and on (loss -> ~1e-4), Adam."""
    return _overfit(seed, steps, sgd=False)


def overfit_sgd(seed: int, steps: int) -> Trial:
    """256 images to 100 % training accuracy and on, SGD momentum at lr 0.1."""
    return _overfit(seed, steps, sgd=True)


def mse_regression(seed: int, steps: int) -> Trial:
    """MLP regression (MSE) of a smooth function of 16 Gaussian inputs, Adam, warm-up+cosine."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 1, generator=g)
    x = torch.randn(4000, 16, generator=g)
    y = torch.sin(x @ w) + 0.1 * (x[:, :1] ** 2) + 0.05 * torch.randn(4000, 1, generator=g)
    model = mlp(16, 64, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    b = Batches(x, y, 64, seed)
    return Trial(model, opt, F.mse_loss, lambda s: b.next(), steps,
                 schedule=_schedule(opt, lambda s: cosine_warmup(s, steps, 3e-3, 50)))


def mse_regression_sgd(seed: int, steps: int) -> Trial:
    """MLP regression (MSE) of 3 tanh(sum of 4 inputs), SGD momentum, constant LR."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4000, 16, generator=g)
    y = (x[:, :4].sum(1, keepdim=True)).tanh() * 3 + 0.1 * torch.randn(4000, 1, generator=g)
    model = mlp(16, 64, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    b = Batches(x, y, 32, seed)
    return Trial(model, opt, F.mse_loss, lambda s: b.next(), steps)


def class_imbalance(seed: int, steps: int) -> Trial:
    """All the zeros and 8 images of each other class (a ~2:1 majority class), Adam."""
    torch.manual_seed(seed)
    x, y = digits()
    keep = torch.cat([torch.nonzero(y == 0).flatten(),
                      *[torch.nonzero(y == c).flatten()[:8] for c in range(1, 10)]])
    x, y = x[keep], y[keep]
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    b = Batches(x, y, 32, seed)
    return Trial(model, opt, F.cross_entropy, lambda s: b.next(), steps)


def curriculum(seed: int, steps: int) -> Trial:
    """Classes 0-1 for the first third, then 0-4, then all ten: the loss jumps at each stage."""
    torch.manual_seed(seed)
    x, y = digits()
    stages = [(0, 2), (steps // 3, 5), (2 * steps // 3, 10)]
    pools = {n: Batches(x[y < n], y[y < n], 32, seed) for _, n in stages}

    def batch(s: int) -> Batch:
        return pools[[n for start, n in stages if s >= start][-1]].next()
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Trial(model, opt, F.cross_entropy, batch, steps)


def curriculum_noise(seed: int, steps: int) -> Trial:
    """Clean inputs, then Gaussian input noise (sigma 1) from 5/12 of the run on."""
    torch.manual_seed(seed)
    x, y = digits()
    b = Batches(x, y, 32, seed)
    g = torch.Generator().manual_seed(seed + 7)
    noisy_from = 5 * steps // 12

    def batch(s: int) -> Batch:
        xb, yb = b.next()
        sigma = 0.0 if s < noisy_from else 1.0
        return xb + sigma * torch.randn(xb.shape, generator=g), yb
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Trial(model, opt, F.cross_entropy, batch, steps)


def dropout_heavy(seed: int, steps: int) -> Trial:
    """Dropout 0.5 after both hidden layers (256 wide), Adam: a noisy training loss."""
    return _digits_trial(seed, steps, lambda: mlp(hidden=256, dropout=0.5),
                         lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), 32)


def bn_cnn_small_batch(seed: int, steps: int) -> Trial:
    """BatchNorm CNN on batches of 8, SGD momentum at lr 0.05 (noisy batch statistics)."""
    return _digits_trial(seed, steps, DigitsCNN,
                         lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), 8)


def bn_cnn_batch4_adam(seed: int, steps: int) -> Trial:
    """BatchNorm CNN on batches of 4, Adam."""
    return _digits_trial(seed, steps, DigitsCNN,
                         lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), 4)


def wd_high_lr(seed: int, steps: int) -> Trial:
    """AdamW at lr 0.01 with weight decay 0.5 (the loss wanders at a high level)."""
    return _digits_trial(seed, steps, mlp, lambda m: torch.optim.AdamW(
        m.parameters(), lr=1e-2, weight_decay=0.5), 32)


def wd_high_lr_sgd(seed: int, steps: int) -> Trial:
    """BatchNorm CNN, SGD momentum at lr 0.3 with weight decay 5e-3, batch 64."""
    return _digits_trial(seed, steps, DigitsCNN, lambda m: torch.optim.SGD(
        m.parameters(), lr=0.3, momentum=0.9, weight_decay=5e-3), 64)


def _pretrained_body(seed: int, steps: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An MLP body pretrained (unmonitored) on classes 0-4; the digits."""
    torch.manual_seed(seed)
    x, y = digits()
    body = mlp(outputs=64, depth=2)
    pre = nn.Sequential(body, nn.ReLU(), nn.Linear(64, 5))
    opt = torch.optim.Adam(pre.parameters(), lr=1e-3)
    pretrain(pre, opt, Batches(x[y < 5], y[y < 5], 32, seed), min(600, steps))
    return body, x, y


def finetune_new_head(seed: int, steps: int) -> Trial:
    """Pretrain on classes 0-4, replace the head, fine-tune on 5-9.

    AdamW, body lr 1e-4, head 3e-3; the monitor is attached at the fine-tune.
    """
    body, x, y = _pretrained_body(seed, steps)
    model = nn.Sequential(body, nn.ReLU(), nn.Linear(64, 5))
    opt = torch.optim.AdamW([{"params": body.parameters(), "lr": 1e-4},
                             {"params": model[2].parameters(), "lr": 3e-3}], weight_decay=0.01)
    b = Batches(x[y >= 5], y[y >= 5] - 5, 32, seed)
    return Trial(model, opt, F.cross_entropy, lambda s: b.next(), steps)


def finetune_unfreeze(seed: int, steps: int) -> Trial:
    """Pretrain on 0-4, new head on 5-9: a linear probe, then the body unfreezes.

    Body lr 0 for the first third, then a 50-step warm-up to lr 1e-3.
    """
    body, x, y = _pretrained_body(seed, steps)
    model = nn.Sequential(body, nn.ReLU(), nn.Linear(64, 5))
    opt = torch.optim.Adam([{"params": body.parameters(), "lr": 0.0},
                            {"params": model[2].parameters(), "lr": 3e-3}])
    b = Batches(x[y >= 5], y[y >= 5] - 5, 32, seed)
    unfreeze = steps // 3

    def schedule(s: int) -> None:
        opt.param_groups[0]["lr"] = 0.0 if s < unfreeze else 1e-3 * min(1.0, (s - unfreeze + 1)
                                                                         / 50)
    return Trial(model, opt, F.cross_entropy, lambda s: b.next(), steps, schedule=schedule)


def full_batch_gd(seed: int, steps: int) -> Trial:
    """Full-batch GD at lr 0.5 on 512 images, tanh MLP.

    Edge of stability: the loss is non-monotone but decreasing.
    """
    torch.manual_seed(seed)
    x, y = digits()
    x, y = x[:512], y[:512]
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    return Trial(model, opt, F.cross_entropy, lambda s: (x, y), steps)


# ------------------------------------------------------------------------------ phase changes


def induction_lm(seed: int, steps: int, lr: float = 1e-3, vocab: int = 24,
                 half: int = 16) -> Trial:
    """A random sequence of 16 tokens repeated twice, 2-block TinyGPT, AdamW.

    Warm-up and cosine to lr/10. The second half becomes copyable when an induction head
    forms (a sudden loss drop).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TinyGPT(vocab, dim=64, depth=2, context=2 * half)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    def batch(s: int) -> Batch:
        a = torch.randint(0, vocab, (32, half), generator=g)
        seq = torch.cat([a, a, a[:, :1]], 1)
        return seq[:, :-1], seq[:, 1:]
    return Trial(model, opt, lm_loss, batch, steps, schedule=_schedule(
        opt, lambda s: cosine_warmup(s, steps, lr, min(100, steps), lr * 0.1)))


def _modular(seed: int, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    """Operands, labels (a + b) mod p and a random permutation of the p^2 pairs."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    return a, b, (a + b) % p, torch.randperm(p * p, generator=g)


def grokking_mlp(seed: int, steps: int, p: int = 23) -> Trial:
    """Modular addition (p 23), one-hot MLP, AdamW with weight decay 1.

    50 % training split, full batch: memorisation, then (maybe) a late generalisation
    phase.
    """
    a, b, y, perm = _modular(seed, p)
    x = torch.cat([F.one_hot(a, p), F.one_hot(b, p)], 1).float()
    train = perm[: p * p // 2]
    model = nn.Sequential(nn.Linear(2 * p, 256), nn.ReLU(), nn.Linear(256, p))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0)
    return Trial(model, opt, F.cross_entropy, lambda s: (x[train], y[train]), steps)


def grokking_tf(seed: int, steps: int, p: int = 17) -> Trial:
    """Modular addition (p 17) with a 1-block TinyGPT on "a b =" sequences.

    Loss on the answer; AdamW with weight decay 1, 60 % split, full batch. Loss spikes of
    the slingshot kind: not healthy by the criterion.
    """
    a, b, y, perm = _modular(seed, p)
    x = torch.stack([a, b, torch.full_like(a, p)], 1)
    train = perm[: int(0.6 * p * p)]
    model = LastToken(TinyGPT(p + 1, dim=64, depth=1, context=3), p)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0)
    return Trial(model, opt, F.cross_entropy, lambda s: (x[train], y[train]), steps,
                 schedule=_schedule(opt, lambda s: 1e-3 * min(1.0, (s + 1) / 10)))


def wd_moderate(seed: int, steps: int) -> Trial:
    """AdamW at lr 3e-3 with weight decay 0.1."""
    return _digits_trial(seed, steps, mlp, lambda m: torch.optim.AdamW(
        m.parameters(), lr=3e-3, weight_decay=0.1), 32)


def sgd_moderate(seed: int, steps: int) -> Trial:
    """SGD momentum at lr 0.03."""
    return _digits_trial(seed, steps, mlp,
                         lambda m: torch.optim.SGD(m.parameters(), lr=0.03, momentum=0.9), 32)


# ------------------------------------------------------------------------------ beyond the hunt
# The healthy-recipes audit's recipes, op for op. The three slowest train for fewer steps
# than the audit's runs (char_lstm_sgd_clip and gru_tied_adam 600 of 1500, tiny_vit 400 of
# 2000), to keep the benchmark's time: their losses are the audit's up to the step where the
# shorter schedule first differs (400, none, 100).


class CharRNN(nn.Module):
    """Character language model: embedding, one LSTM or GRU layer, linear head.

    ``tie``: the head's weight is the embedding (whose width is then ``hidden``).
    """

    def __init__(self, vocab: int, emb: int = 32, hidden: int = 128, cell: str = "lstm",
                 tie: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden if tie else emb)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(hidden if tie else emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) characters -> (B, T, vocab) logits."""
        return self.head(self.rnn(self.emb(x))[0])


def char_lstm_sgd_clip(seed: int, steps: int) -> Trial:
    """Zaremba-style character LSTM (128) on generated text: SGD at lr 1, ``clip_grad_norm_(5)``.

    The LR drops to 0.25 at 2/3 of the run; 32 windows of 48 characters.
    """
    torch.manual_seed(seed)
    batch = text_windows(48, 32, seed)
    model = CharRNN(pseudo_text()[1], 32, 128, "lstm")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    return Trial(model, opt, lm_loss, batch, steps, clip=5.0, schedule=_schedule(
        opt, lambda s: 1.0 if s < 2 * steps // 3 else 0.25))


def gru_tied_adam(seed: int, steps: int) -> Trial:
    """Character GRU (96) with the embedding tied to the head, Adam 2e-3, no clipping."""
    torch.manual_seed(seed)
    batch = text_windows(48, 32, seed)
    model = CharRNN(pseudo_text()[1], hidden=96, cell="gru", tie=True)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    return Trial(model, opt, lm_loss, batch, steps)


class TinyViT(nn.Module):
    """ViT on 8x8 images: 2x2 patches, a class token, pre-LN encoder blocks (dropout 0.1)."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, patch: int = 2,
                 classes: int = 10) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (8 // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of flattened (B, 64) images, read at the class token."""
        p, n = self.patch, 8 // self.patch
        x = x.view(-1, n, p, n, p).permute(0, 1, 3, 2, 4).reshape(x.shape[0], -1, p * p)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.proj(x)], 1) + self.pos
        return self.head(self.norm(self.blocks(h))[:, 0])


def tiny_vit(seed: int, steps: int, lr: float = 1e-3) -> Trial:
    """ViT (2 blocks of width 64), AdamW (wd 0.05), warm-up 100 + cosine, label smoothing 0.1."""
    t = _digits_trial(seed, steps, TinyViT, lambda m: torch.optim.AdamW(
        m.parameters(), lr=lr, weight_decay=0.05), 64)
    t.loss_fn = functools.partial(F.cross_entropy, label_smoothing=0.1)
    t.schedule = _schedule(t.optimizer, lambda s: cosine_warmup(s, steps, lr, min(100, steps)))
    return t


class VAE(nn.Module):
    """Gaussian VAE of 8x8 images: encoder 64-128, a latent of ``z``, decoder to 64 logits.

    It returns one tensor, the pixel logits, the posterior means and log-variances side by
    side, (B, 64 + 2z): the harness detaches tensors, not tuples. Train mode samples the
    latent (reparameterised), eval mode decodes the mean.
    """

    def __init__(self, z: int = 8, hidden: int = 128) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, hidden), nn.ReLU())
        self.mu, self.logvar = nn.Linear(hidden, z), nn.Linear(hidden, z)
        self.dec = nn.Sequential(nn.Linear(z, hidden), nn.ReLU(), nn.Linear(hidden, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 64) images -> (B, 64 + 2z): logits, means, log-variances."""
        e = self.enc(x)
        mu, logvar = self.mu(e), self.logvar(e)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return torch.cat([self.dec(z), mu, logvar], -1)


def vae_kl_anneal(seed: int, steps: int) -> Trial:
    """VAE on [0, 1] digits, Adam 1e-3, batch 64: Bernoulli reconstruction plus beta x KL.

    Both summed per image and averaged over the batch; beta rises linearly from 0 to 1 over
    the first 600 of 2500 steps (KL warm-up), so the loss trained is not the ELBO until then.
    """
    torch.manual_seed(seed)
    x, _ = digits(unit=True)
    model = VAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    b = Batches(x, x, 64, seed)
    beta, warmup = [0.0], max(1, 6 * steps // 25)

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z = (out.shape[-1] - 64) // 2
        logits, mu, logvar = out.split([64, z, z], -1)
        rec = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(target)
        kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum() / len(target)
        return rec + beta[0] * kl

    def schedule(s: int) -> None:
        beta[0] = min(1.0, s / warmup)
    return Trial(model, opt, loss_fn, lambda s: b.next(), steps, schedule=schedule)


def distill_kd(seed: int, steps: int, temperature: float = 4.0) -> Trial:
    """Knowledge distillation into an MLP 32 wide, Adam 2e-3, batch 64.

    The teacher (MLP 256 wide) first trains 800 steps on the labels, unmonitored; the
    student's targets are its softmax at temperature 4 (soft labels), its loss the KL
    divergence at that temperature times T^2 (Hinton et al. 2015).
    """
    torch.manual_seed(seed)
    x, y = digits()
    teacher = mlp(hidden=256)
    topt = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    pretrain(teacher, topt, Batches(x, y, 64, seed + 1), min(800, steps))
    teacher.eval()
    model = mlp(hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    b = Batches(x, y, 64, seed)

    def batch(s: int) -> Batch:
        xb, _ = b.next()
        with torch.no_grad():
            return xb, F.softmax(teacher(xb) / temperature, -1)

    def kd(out: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(out / temperature, -1), soft,
                        reduction="batchmean") * temperature ** 2
    return Trial(model, opt, kd, batch, steps)


class ResMLP(nn.Module):
    """Residual MLP without normalisation layers: ``h + Linear(ReLU(Linear(h)))`` blocks."""

    def __init__(self, width: int = 64, hidden: int = 128, blocks: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
            for _ in range(blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of flattened (B, 64) images."""
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(F.relu(h))


def resmlp_noln_radam(seed: int, steps: int) -> Trial:
    """Residual MLP of 6 blocks, no normalisation, RAdam 2e-3, batch 32 (the residual grows)."""
    return _digits_trial(seed, steps, ResMLP,
                         lambda m: torch.optim.RAdam(m.parameters(), lr=2e-3), 32)


def label_noise(seed: int, steps: int, noise: float = 0.2) -> Trial:
    """MLP 256 wide, 20 % of the labels replaced by random classes (fixed), SGD momentum 0.05.

    Weight decay 5e-4, batch 64, 3000 steps: it goes on to memorise the noisy labels.
    """
    torch.manual_seed(seed)
    x, y = digits()
    g = torch.Generator().manual_seed(seed + 11)
    flip = torch.rand(len(y), generator=g) < noise
    y = torch.where(flip, torch.randint(0, 10, y.shape, generator=g), y)
    model = mlp(hidden=256)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    b = Batches(x, y, 64, seed)
    return Trial(model, opt, F.cross_entropy, lambda s: b.next(), steps)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    Each step moves by ``lr`` times the sign of ``betas[0]`` momentum + ``1 - betas[0]``
    gradient, after a decoupled weight decay; the momentum (state ``exp_avg``) is an EMA of
    the gradients at ``betas[1]``.
    """

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter with a gradient; the closure's loss, if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss


def lion(seed: int, steps: int, lr: float = 3e-4) -> Trial:
    """MLP, Lion at lr 3e-4 (wd 0.1), warm-up 100 + cosine, batch 64: sign updates."""
    t = _digits_trial(seed, steps, mlp, lambda m: Lion(m.parameters(), lr=lr, weight_decay=0.1),
                      64)
    t.schedule = _schedule(t.optimizer, lambda s: cosine_warmup(s, steps, lr, min(100, steps)))
    return t


class SWA:
    """Stochastic weight averaging's loop: cosine annealing until ``start``, then ``SWALR``.

    ``step()`` after every optimizer step: before ``start`` it steps the cosine schedule;
    from ``start`` on it updates the ``AveragedModel`` and steps ``SWALR``, which raises the
    LR from ~0 back to ``swa_lr`` over ``anneal`` steps and holds it.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, start: int,
                 swa_lr: float, anneal: int) -> None:
        self.start, self.count, self.model = start, 0, model
        self.cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=start)
        self.averaged = torch.optim.swa_utils.AveragedModel(model)
        self.swalr = torch.optim.swa_utils.SWALR(opt, swa_lr=swa_lr, anneal_epochs=anneal,
                                                 anneal_strategy="cos")

    def step(self) -> None:
        """After optimizer step ``count``: the cosine step, or an SWA update and SWALR step."""
        if self.count >= self.start:
            self.averaged.update_parameters(self.model)
            self.swalr.step()
        else:
            self.cosine.step()
        self.count += 1


def swa_lr_raise(seed: int, steps: int) -> Trial:
    """SWA: SGD momentum (wd 5e-4) at lr 0.1, cosine to ~0 over 3/4 of the run, batch 64.

    Then ``SWALR`` raises the LR back to 0.05 over 50 steps and holds it, the weights
    averaged every step.
    """
    t = _digits_trial(seed, steps, mlp, lambda m: torch.optim.SGD(
        m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), 64)
    t.scheduler = SWA(t.model, t.optimizer, 3 * steps // 4, 0.05, 50)
    return t


# ------------------------------------------------------------------------------ the list

TASK_CHANGES = "the task changes on purpose (the hunt kept it out of the healthy count)"


def _setups() -> list[Setup]:
    def bind(fn: Callable[..., Trial], **kw: Any) -> Callable[[int, int], Trial]:
        return lambda seed, steps: fn(seed, steps, **kw)

    return [
        Setup("cosine_warmup_adamw_lr0.003", "MLP, AdamW 3e-3, warm-up + cosine", 1200,
              cosine_warmup_adamw, "cosine_warmup_adamw"),
        Setup("cosine_warmup_adamw_lr0.01", "MLP, AdamW 1e-2, warm-up + cosine", 1200,
              bind(cosine_warmup_adamw, lr=1e-2), "cosine_warmup_adamw_hi"),
        Setup("cosine_warmup_sgd_lr0.2", "MLP, SGD-momentum 0.2, warm-up + cosine", 1200,
              cosine_warmup_sgd, "cosine_warmup_sgd"),
        Setup("sgdr_sgd_lr0.1", "MLP, SGD-momentum 0.1, warm restarts", 1500, sgdr_sgd,
              "sgdr_sgd"),
        Setup("sgdr_adam_lr0.003", "MLP, Adam 3e-3, warm restarts", 1500, sgdr_adam,
              "sgdr_adam"),
        Setup("onecycle_sgd_cnn_lr0.3", "BN CNN, SGD-Nesterov, one-cycle to 0.3", 1200,
              onecycle_sgd, "onecycle_sgd"),
        Setup("onecycle_adamw_lr0.01", "MLP, AdamW, one-cycle to 1e-2", 1200, onecycle_adamw,
              "onecycle_adamw"),
        Setup("step_decay_sgd", "MLP, SGD-momentum 0.1, x0.1 steps", 1200, step_decay_sgd,
              "step_decay_sgd"),
        Setup("grad_accum_k4", "MLP, 4 micro-batches per step, mean loss", 600, grad_accum,
              "grad_accum"),
        Setup("grad_accum_k4_permicro", "MLP, 4 micro-batches, monitor per micro-batch", 300,
              bind(grad_accum, per_micro=True), "grad_accum_permicro"),
        Setup("gradscaler_skips", "MLP, Adam through a GradScaler at scale 2^127", 1000,
              gradscaler_skips, "gradscaler_skips"),
        Setup("clip_grad", "MLP, SGD-momentum, clip_grad_norm_ 1.0", 1000, clip_grad,
              "clip_grad"),
        Setup("batch_size_change", "MLP, Adam, batch 128 -> 8 -> 256", 1200, batch_size_change,
              "batch_size_change"),
        Setup("batch_size_shrink_sgd", "MLP, SGD-momentum, batch 256 -> 16", 1200,
              batch_size_shrink_sgd, "batch_size_shrink_sgd"),
        Setup("remainder_batch", "MLP, SGD-momentum, batch 64, a 1-image batch every epoch",
              1200, remainder_batch, "remainder_batch"),
        Setup("label_smoothing", "MLP, Adam, label smoothing 0.1", 1200, label_smoothing,
              "label_smoothing"),
        Setup("overfit_adam", "MLP on 256 images to ~0 loss, Adam", 1500, overfit_adam,
              "overfit_adam"),
        Setup("overfit_sgd", "MLP on 256 images to ~0 loss, SGD-momentum", 1500, overfit_sgd,
              "overfit_sgd"),
        Setup("mse_regression", "MLP regression, Adam, warm-up + cosine", 1200, mse_regression,
              "mse_regression"),
        Setup("mse_regression_sgd", "MLP regression, SGD-momentum", 1200, mse_regression_sgd,
              "mse_regression_sgd"),
        Setup("class_imbalance", "MLP, Adam, one class ~2/3 of the data", 1200,
              class_imbalance, "class_imbalance"),
        Setup("curriculum", "MLP, Adam, 2 -> 5 -> 10 classes", 1200, curriculum, "curriculum",
              TASK_CHANGES),
        Setup("curriculum_noise", "MLP, Adam, input noise from step 500", 1200,
              curriculum_noise, "curriculum_noise", TASK_CHANGES),
        Setup("dropout_heavy", "MLP, dropout 0.5, Adam", 1200, dropout_heavy, "dropout_heavy"),
        Setup("bn_cnn_bs8", "BN CNN, batch 8, SGD-momentum", 1200, bn_cnn_small_batch,
              "bn_cnn_small_batch"),
        Setup("bn_cnn_bs4_adam", "BN CNN, batch 4, Adam", 1200, bn_cnn_batch4_adam,
              "bn_cnn_batch4_adam"),
        Setup("wd_high_lr_adamw", "MLP, AdamW 1e-2, weight decay 0.5", 1500, wd_high_lr,
              "wd_high_lr"),
        Setup("wd_high_lr_sgd_bncnn", "BN CNN, SGD-momentum 0.3, weight decay 5e-3", 1500,
              wd_high_lr_sgd, "wd_high_lr_sgd"),
        Setup("finetune_new_head", "pretrained MLP, new head, AdamW two LRs", 800,
              finetune_new_head, "finetune_new_head"),
        Setup("finetune_unfreeze", "pretrained MLP, linear probe then unfreeze", 900,
              finetune_unfreeze, "finetune_unfreeze"),
        Setup("full_batch_gd", "tanh MLP, full-batch GD at lr 0.5", 800, full_batch_gd,
              "full_batch_gd"),
        Setup("induction_lm_lr0.001", "TinyGPT on repeated sequences, AdamW 1e-3", 1500,
              induction_lm, "induction_lm"),
        Setup("induction_lm_lr0.003", "TinyGPT on repeated sequences, AdamW 3e-3", 1500,
              bind(induction_lm, lr=3e-3), "induction_lm_hi"),
        Setup("grokking_mlp", "modular addition, MLP, AdamW wd 1, full batch", 4000,
              grokking_mlp, "grokking_mlp"),
        Setup("grokking_tf", "modular addition, TinyGPT, AdamW wd 1, full batch", 3000,
              grokking_tf, "grokking_tf", TASK_CHANGES),
        Setup("wd_moderate_adamw", "MLP, AdamW 3e-3, weight decay 0.1", 1500, wd_moderate,
              "wd_moderate"),
        Setup("sgd_moderate", "MLP, SGD-momentum 0.03", 1200, sgd_moderate, "sgd_moderate"),
        # the healthy-recipes audit's
        Setup("char_lstm_sgd_clip", "char LSTM LM, SGD lr 1, clip 5, LR /4 at 2/3", 600,
              char_lstm_sgd_clip),
        Setup("gru_tied_adam", "char GRU LM, tied embedding, Adam 2e-3", 600, gru_tied_adam),
        Setup("tiny_vit", "ViT, AdamW, warm-up + cosine, label smoothing 0.1", 400, tiny_vit),
        Setup("vae_kl_anneal", "VAE, KL weight 0 -> 1 over the first 600 steps", 2500,
              vae_kl_anneal),
        Setup("distill_kd", "MLP student, KL to a teacher's softmax at T 4, Adam", 2000,
              distill_kd),
        Setup("resmlp_noln_radam", "residual MLP, 6 blocks, no normalisation, RAdam", 2000,
              resmlp_noln_radam),
        Setup("label_noise20_sgd", "MLP, 20 % random labels, SGD-momentum", 3000, label_noise),
        Setup("lion", "MLP, Lion 3e-4, warm-up + cosine", 2000, lion),
        Setup("swa_lr_raise", "MLP, SGD cosine to ~0, then SWALR back up to 0.05", 2000,
              swa_lr_raise),
    ]


SETUPS: dict[str, Setup] = {s.name: s for s in _setups()}

# --small: one of each loop mechanics (LR hook, scheduler, accumulation with a mean loss and
# no outputs, a GradScaler, clipping with the pre-clip norm, a regression loss)
SMALL = ("cosine_warmup_adamw_lr0.003", "step_decay_sgd", "grad_accum_k4", "gradscaler_skips",
         "clip_grad", "mse_regression")
SMALL_STEPS = 120


def resolve(names: list[str]) -> list[Setup]:
    """Setups by name or by the hunt's key.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    by_key = {s.hunt_key: s for s in SETUPS.values()}
    out = []
    for n in names:
        s = SETUPS.get(n) or by_key.get(n)
        if s is None:
            raise KeyError(f"unknown setup {n!r}; known: {', '.join(SETUPS)}")
        out.append(s)
    return out
