"""Early warning of a loss explosion: a tiny GPT, AdamW and a learning-rate ramp, watched by
the default monitor.

A decoder-only transformer (pre-LayerNorm blocks, causal ``F.scaled_dot_product_attention``,
learned positions, untied head; about 100k parameters) learns a synthetic language: each
sequence is an arithmetic progression ``x_t = (a + b t) mod 16`` with random ``a`` and ``b``
(generated locally: no downloads), so every token after the second is predictable from the
two before it. AdamW (betas 0.9, 0.95, weight decay 0.1) warms up linearly to ``--lr``;
from ``--ramp-step`` (300) the learning rate grows geometrically to ``--ramp-to`` (1.0)
over ``--ramp-steps`` (60) steps (a schedule gone wrong), and the loss eventually
explodes. With ``--ramp-steps 40`` this is the ``gpt_lr_ramp`` scenario of the instability
suite (docs/benchmarks.md), up to one step: there the rate first rises at step 301.

The monitor is the default one, ``ls.Monitor(model, loss_fn, path, optimizer=opt)``: no
``metrics=`` (the ``cheap`` preset: loss, gradient norm, update norms and the every-step
sentinels) and no ``probe=`` (it keeps part of the first batch). Its ``taylor_forecast``
rule warns when the update-to-weight ratio keeps growing, or the secant Taylor ratio of the
step reaches the softmax convergence radius (Sao 2026, arXiv:2603.13552; docs/alarms.md).
At the end the script prints, with :func:`landscape.alarms.early_warning`, the first warning,
the loss onset (the first step from which the loss stays >= 1.25x its baseline, the median
of the 50 steps before the ramp, for 3 steps) and the explosion (>= 10x or not finite), and
for each rule its first warning after the ramp and its lead before the explosion. Files
written into ``--out``: ``run.h5``, ``loss.png``, ``sentinels.png``, ``warning.png`` (the
loss and the sentinels with the ramp, the first warning, the onset and the explosion) and
``summary.json``.

    python examples/early_warning_gpt.py --out gpt-out      # ~10-20 s on a CPU
    python examples/early_warning_gpt.py --small            # a few seconds (CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import landscape as ls
from landscape.alarms import early_warning, rule_leads
from landscape.demo import plot_lead, ramp_lr
from landscape.plotting.timelines import save_figure, timeline

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

FULL = {"steps": 380, "ramp_step": 300, "ramp_steps": 60, "lr": 1e-3, "warmup": 50,
        "dim": 64, "depth": 2, "length": 32, "strides": None}
SMALL = {"steps": 200, "ramp_step": 140, "ramp_steps": 45, "lr": 3e-3, "warmup": 20,
         "dim": 32, "depth": 1, "length": 16, "strides": 3}


def learning_rate(step: int, peak: float, warmup: int, ramp_step: int, ramp_steps: int,
                  ramp_to: float) -> float:
    """Linear warm-up to ``peak``, constant, then a geometric ramp to ``ramp_to`` over
    ``ramp_steps`` steps from ``ramp_step`` (:func:`landscape.demo.ramp_lr`)."""
    base = peak * min(1.0, (step + 1) / warmup)
    return ramp_lr(step, base, ramp_step, ramp_steps, ramp_to / peak)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpt-out", help="directory for the run and the plots")
    parser.add_argument("--small", action="store_true",
                        help="1 block, d 32, context 16, ramp at step 140 (CI smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="total steps (380; small 200)")
    parser.add_argument("--ramp-step", type=int, default=None,
                        help="first step of the learning-rate ramp (300; small 140)")
    parser.add_argument("--ramp-steps", type=int, default=None,
                        help="steps the ramp takes (60; small 45)")
    parser.add_argument("--ramp-to", type=float, default=1.0,
                        help="the learning rate at the end of the ramp")
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW learning rate after warm-up (1e-3; small 3e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for models this small)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = dict(SMALL if args.small else FULL)
    for key in ("steps", "ramp_step", "ramp_steps", "lr"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    steps, start, peak = cfg["steps"], cfg["ramp_step"], cfg["lr"]
    vocab, length, batch = 16, cfg["length"], 32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = TinyGPT(vocab, dim=cfg["dim"], depth=cfg["depth"], context=length)
    opt = torch.optim.AdamW(model.parameters(), lr=peak, betas=(0.9, 0.95), weight_decay=0.1)
    config = {"example": "early_warning_gpt", **cfg, "ramp_to": args.ramp_to,
              "seed": args.seed}
    losses: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ls.InstabilityWarning)  # collected and printed below
        # the default monitor: no metrics=, no probe=
        with ls.Monitor(model, lm_loss, str(out / "run.h5"), optimizer=opt, config=config,
                        mode="w") as mon:
            for step in range(steps):
                for group in opt.param_groups:
                    group["lr"] = learning_rate(step, peak, cfg["warmup"], start,
                                                cfg["ramp_steps"], args.ramp_to)
                x, y = progressions(batch, length, vocab, g, cfg["strides"])
                logits = model(x)
                loss = lm_loss(logits, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(step, batch=(x, y), loss=loss, outputs=logits)
                losses.append(float(loss.detach()))
            findings = list(mon.findings)

    lead = early_warning(losses, findings, start)
    leads = rule_leads(findings, start, lead.explosion)
    firsts: dict[str, int] = {}
    for f in sorted(findings, key=lambda f: f.step):
        if f.step >= start and f.severity in ("warning", "error") and f.rule not in firsts:
            firsts[f.rule] = f.step
    with ls.Run.open(out / "run.h5") as run:
        files = [out / "run.h5"]
        for metric_name in ("loss", "sentinels"):
            fig = timeline(run, metric_name, log=metric_name == "loss")
            files.append(save_figure(fig, out / f"{metric_name}.png"))
        files.append(plot_lead(run, lead, out / "warning.png"))

    table = [{"rule": rule, "first_step": firsts[rule], "lead": leads.get(rule)}
             for rule in sorted(firsts, key=lambda r: (firsts[r], r))]
    summary = {
        "ramp_step": start, "ramp_steps": cfg["ramp_steps"], "ramp_to": args.ramp_to,
        "lr": peak, "baseline_loss": lead.baseline,
        "first_warning_step": lead.first_step, "first_warning_rule": lead.first_rule,
        "onset_step": lead.onset, "explosion_step": lead.explosion,
        "lead_to_onset": lead.lead_to_onset, "lead_to_explosion": lead.lead_to_explosion,
        "table": table,
        "warnings_before_ramp": sorted({f.rule for f in lead.early}),
        "lead_line": lead.describe(),
        "files": [str(p) for p in files],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"AdamW lr {peak:g}, ramped to {args.ramp_to:g} over {cfg['ramp_steps']} steps "
          f"from step {start}; baseline loss {lead.baseline:.4f} (median of 50 steps)")
    print(f"{'rule':<16} {'first warning':>13} {'lead (steps)':>12}")
    for row in table:
        lead_s = "after" if row["lead"] is None else str(row["lead"])
        print(f"{row['rule']:<16} {row['first_step']:>13} {lead_s:>12}")
    print("warnings before the ramp: " + (", ".join(summary["warnings_before_ramp"])
                                          if lead.early else "none"))
    print(lead.describe())
    print("wrote " + ", ".join(summary["files"]))
    return summary


if __name__ == "__main__":
    main()
