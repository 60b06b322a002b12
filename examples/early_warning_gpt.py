"""Early warning of a loss explosion: a small GPT trained with AdamW and a learning-rate spike.

A decoder-only transformer (pre-LayerNorm blocks, causal ``F.scaled_dot_product_attention``,
learned positions, untied head; about 100k parameters) learns a synthetic language: each
sequence is an arithmetic progression ``x_t = (a + b t) mod 16`` with random ``a`` and ``b``
(generated locally: no downloads), so every token after the second is predictable from the
two before it. AdamW warms up to ``--lr`` and decays (cosine) to a tenth of it at
``--spike-step``, where the learning rate jumps by ``--spike-factor`` (a bad restart, a
mis-set scheduler). The :class:`landscape.Monitor` records, every step:

* ``loss`` and ``grad_norm`` (robust z-score spike rules, :class:`landscape.alarms.LossSpike`
  and :class:`~landscape.alarms.GradNormSpike`);
* ``taylor_radius``: the Taylor ratio r = ||step|| / rho_a of the optimizer's actual step
  (Sao 2026; warning at r >= 1);
* ``spectral_alignment``: the sign diversity of each linear layer's inputs along the top
  singular vector of its weight (Qiu et al. 2025; warning when it collapses);
* ``logits``: max |logit| and softmax collapse (Wortsman et al. 2024; Prieto et al. 2025).

and the default alarm rules turn them into findings. At the end the script prints, with
:func:`landscape.alarms.warning_leads`, the blow-up step (the first step after the spike
whose loss exceeds 10x the median loss of the 20 steps before the spike) and, for each
rule, the first step it warned after the spike and its lead in steps before the blow-up.
Files written into ``--out``: ``run.h5``, ``loss.png``, ``taylor_radius.png``,
``spectral_alignment.png``, ``warnings.png`` (the loss with each rule's first warning),
``summary.json``.

    python examples/early_warning_gpt.py --out gpt-out      # ~1-2 minutes on a CPU
    python examples/early_warning_gpt.py --small            # seconds (CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import landscape as ls
from landscape.alarms import RULES, warning_leads
from landscape.plotting.timelines import new_figure, save_figure, timeline

# ------------------------------------------------------------------------------ the model


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal multi-head self-attention and a GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token and position embeddings, ``depth`` blocks, a final LayerNorm and a linear head.

    ``forward(tokens (B, T)) -> logits (B, T, vocab)``.
    """

    def __init__(self, vocab: int, dim: int = 64, depth: int = 2, heads: int = 4,
                 context: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over every position."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def progressions(n: int, length: int, vocab: int, generator: torch.Generator,
                 strides: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences ``(a + b t) mod vocab``, ``t = 0..length``: inputs and next tokens.

    ``a`` is uniform, ``b`` uniform in ``1..strides`` (default ``vocab - 1``): the best
    achievable loss is ``log(strides) / length`` (only the second token is uncertain).
    """
    a = torch.randint(0, vocab, (n, 1), generator=generator)
    b = torch.randint(1, (strides or vocab - 1) + 1, (n, 1), generator=generator)
    seq = (a + b * torch.arange(length + 1)) % vocab
    return seq[:, :-1], seq[:, 1:]


# ------------------------------------------------------------------------------ the run


def learning_rate(step: int, peak: float, spike: int, factor: float, warmup: int = 20) -> float:
    """Linear warm-up to ``peak``, cosine decay to ``peak / 10`` at ``spike``, then ``factor``
    times that: a sudden jump of the learning rate late in training."""
    t = min(step, spike) / spike
    base = peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))
    return base * (factor if step >= spike else 1.0)


def metrics() -> list[ls.metrics.Metric]:
    """Every warning signal at every step (the model is small enough)."""
    m = ls.metrics
    return [m.Loss(), m.GradNorm(), m.NonFinite(), m.Update(), m.Sentinels(),
            m.TaylorRadius(schedule=1),
            m.SpectralAlignment(schedule=1), m.Logits(schedule=1)]


def plot_warnings(run: ls.Run, spike: int, blowup: int | None, firsts: dict[str, int],
                  path: Path) -> Path:
    """The training loss (log scale) with the spike, the blow-up and each rule's first warning."""
    fig = new_figure(9.0, 4.5)
    ax = fig.subplots()
    steps, loss = run.series("loss", "value")
    ax.plot(steps, loss, color="#444444", lw=1, label="training loss")
    ax.set_yscale("log")
    ax.axvline(spike, color="#7f7f7f", ls=":", label=f"lr spike @ {spike}")
    if blowup is not None:
        ax.axvline(blowup, color="#d62728", lw=2, label=f"loss > 10x pre-spike @ {blowup}")
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    for (rule, step), c in zip(sorted(firsts.items(), key=lambda kv: kv[1]), colors):
        ax.axvline(step, color=c, ls="--", lw=1, label=f"{rule} @ {step}")
    ax.set_xlim(max(0, spike - 40), steps[-1])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    fig.suptitle("First warning of each rule before the loss blow-up")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpt-out", help="directory for the run and the plots")
    parser.add_argument("--small", action="store_true", help="reduced size (CI smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="total steps (360; small 110)")
    parser.add_argument("--spike-step", type=int, default=None,
                        help="step of the learning-rate jump (300; small 80)")
    parser.add_argument("--spike-factor", type=float, default=None,
                        help="the jump: lr x this from the spike on (40; small 100)")
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW peak learning rate (3e-3; small 1e-2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for models this small)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (110 if args.small else 360)
    spike = args.spike_step or (80 if args.small else 300)
    factor = args.spike_factor or (100.0 if args.small else 40.0)
    peak = args.lr or (1e-2 if args.small else 3e-3)
    strides = 3 if args.small else None  # the small run learns an easier language
    vocab, length, batch = 16, 16 if args.small else 32, 32
    dim, depth = (32, 1) if args.small else (64, 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = TinyGPT(vocab, dim=dim, depth=depth, context=length)
    opt = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.01)
    probe = progressions(64, length, vocab, torch.Generator().manual_seed(10_000 + args.seed),
                         strides)
    config = {"example": "early_warning_gpt", "lr": peak, "spike_step": spike,
              "spike_factor": factor}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ls.InstabilityWarning)  # collected and printed below
        with ls.Monitor(model, lm_loss, str(out / "run.h5"), optimizer=opt, metrics=metrics(),
                        probe=probe, config=config, mode="w") as mon:
            for step in range(steps):
                for group in opt.param_groups:
                    group["lr"] = learning_rate(step, peak, spike, factor)
                x, y = progressions(batch, length, vocab, g, strides)
                logits = model(x)
                loss = lm_loss(logits, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(step, batch=(x, y), loss=loss, outputs=logits)
            findings = list(mon.findings)

    with ls.Run.open(out / "run.h5") as run:
        blowup, leads = warning_leads(run, findings, after=spike, factor=10.0)
        firsts = {}
        for f in sorted(findings, key=lambda f: f.step):
            if f.step >= spike and f.severity in ("warning", "error") and f.rule not in firsts:
                firsts[f.rule] = f.step
        steps_l, loss_values = run.series("loss", "value")
        pre = float(torch.tensor(loss_values[(steps_l < spike)][-20:]).median())
        files = [out / "run.h5"]
        for metric_name in ("loss", "taylor_radius", "spectral_alignment", "logits"):
            fig = timeline(run, metric_name, log=metric_name == "loss")
            files.append(save_figure(fig, out / f"{metric_name}.png"))
        files.append(plot_warnings(run, spike, blowup, firsts, out / "warnings.png"))

    # every rule watching a metric recorded here (edge_of_stability and rank_collapse watch
    # sharpness and representation, which this run does not record)
    recorded = {m.name for m in metrics()}
    rules = [name for name, cls in RULES.items() if set(cls.metrics) & recorded]
    table = []
    for rule in sorted(set(firsts) | set(rules), key=lambda r: (firsts.get(r, math.inf), r)):
        table.append({"rule": rule, "first_step": firsts.get(rule), "lead": leads.get(rule)})
    pre_spike_warnings = sorted({f.rule for f in findings if f.step < spike
                                 and f.severity in ("warning", "error")})
    summary = {
        "spike_step": spike, "spike_factor": factor, "lr": peak,
        "pre_spike_loss": pre, "blowup_step": blowup, "table": table,
        "pre_spike_warnings": pre_spike_warnings,
        "files": [str(p) for p in files],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"AdamW lr {peak:g}, x{factor:g} from step {spike}; pre-spike loss "
          f"(median of 20 steps) {pre:.4f}")
    print("blow-up (loss > 10x pre-spike): "
          + (f"step {blowup} ({blowup - spike} steps after the spike)" if blowup is not None
             else "none"))
    print(f"{'rule':<16} {'first warning':>13} {'lead (steps)':>12}")
    for row in table:
        first = "-" if row["first_step"] is None else str(row["first_step"])
        lead = "-" if row["lead"] is None else str(row["lead"])
        print(f"{row['rule']:<16} {first:>13} {lead:>12}")
    if pre_spike_warnings:
        print("warnings before the spike: " + ", ".join(pre_spike_warnings))
    print("wrote " + ", ".join(summary["files"]))
    return summary


if __name__ == "__main__":
    main()
