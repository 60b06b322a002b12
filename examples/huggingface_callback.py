"""Monitor a Hugging Face ``Trainer`` run with ``LandscapeTrainerCallback``.

A GPT-2 built from a config (2 layers, width 64, vocabulary 64: no download) learns
sequences from a fixed random first-order Markov chain, so the loss falls from log(64)
towards the chain's entropy rate. The callback records the ``standard`` preset into
``OUT/run.h5``: the Trainer's own per-step loss (read from the model's forward output),
gradient norm, update size and sentinels every step, the logits of the LM head every ten;
sharpness (preconditioned, against AdamW's threshold) every 100 steps and the Hessian
spectrum and trace every 500 (at step 0 in this 200-step run, denser while the sentinels
move) on a held-out probe batch, through the default closure ``model(**batch).loss``.
``taylor_radius``, ``spectral_alignment``, ``collapse`` and ``representation`` are left out
to keep the run short (GPT-2's blocks use ``Conv1D``, so spectral alignment would see only
``lm_head``); all four work on Hugging Face models (docs/integrations.md).

    python examples/huggingface_callback.py --out hf-run      # 200 steps, minutes on CPU
    python examples/huggingface_callback.py --small           # seconds (CI smoke test)
    landscape report hf-run/run.h5 -o report.html

Needs ``pip install 'landscape-for-pytorch[transformers]'`` (transformers and accelerate).
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from pathlib import Path

import torch
import transformers

from landscape import InstabilityWarning, Run
from landscape.integrations import LandscapeTrainerCallback
from landscape.metrics import preset

VOCAB, LENGTH = 64, 32


def markov_chain(seed: int = 123) -> torch.Tensor:
    """A row-stochastic 64x64 transition matrix, each row peaked on a few tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3.0 * torch.randn(VOCAB, VOCAB, generator=g), dim=-1)


def entropy_rate(chain: torch.Tensor) -> float:
    """Entropy rate (nats/token) of the chain at its stationary distribution."""
    evals, evecs = torch.linalg.eig(chain.T.double())
    pi = evecs[:, torch.argmin((evals - 1).abs())].real
    pi = pi / pi.sum()
    return float(-(pi[:, None] * chain.double() * chain.double().log()).sum())


class MarkovText(torch.utils.data.Dataset):
    def __init__(self, chain: torch.Tensor, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.empty(n, LENGTH, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
        for t in range(1, LENGTH):
            ids[:, t] = torch.multinomial(chain[ids[:, t - 1]], 1, generator=g)[:, 0]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="hf-run", help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--small", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --small, else torch's)")
    args = parser.parse_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.small else None)
    if threads:
        torch.set_num_threads(threads)
    steps = args.steps or (6 if args.small else 200)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.h5"
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)

    chain = markov_chain()
    train = MarkovText(chain, 256 if args.small else 4096, seed=0)
    probe_ids = MarkovText(chain, 16, seed=1).ids
    torch.manual_seed(0)
    width = 16 if args.small else 64
    config = transformers.GPT2Config(
        n_layer=1 if args.small else 2, n_embd=width, n_head=4, vocab_size=VOCAB,
        n_positions=LENGTH,
        bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)

    def report(finding) -> None:
        print(f"  finding -> {finding.describe()}\n             hint: {finding.hint}")

    metrics = preset("standard", taylor_radius=None, spectral_alignment=None, collapse=None,
                     representation=None)
    callback = LandscapeTrainerCallback(
        str(path), metrics=metrics, probe={"input_ids": probe_ids, "labels": probe_ids},
        # mode="w": each run of the example starts afresh; a job that resumes from
        # checkpoints leaves mode at "a", and the run file follows it
        on_finding=report, mode="w", warn=False,
    )
    training_args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"), use_cpu=True, report_to=[], save_strategy="no",
        max_steps=steps, per_device_train_batch_size=16, learning_rate=args.lr,
        logging_steps=max(1, steps // 10),
        disable_tqdm=args.small, seed=0,
    )
    trainer = transformers.Trainer(
        model=model, args=training_args, train_dataset=train, callbacks=[callback]
    )
    print(f"training {steps} steps; loss floor (entropy rate) {entropy_rate(chain):.3f} nats, "
          f"uniform {math.log(VOCAB):.3f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InstabilityWarning)  # printed by on_finding instead
        trainer.train()

    with Run.open(path) as run:
        print(f"\n{path}: {len(run.steps('loss'))} steps recorded")
        for metric_name in run.metrics():
            recorded = run.steps(metric_name)
            last = f"last at step {int(recorded[-1])}" if len(recorded) else "none yet"
            print(f"  {metric_name:16s} {len(recorded):4d} rows, {last}")
        _, loss = run.series("loss", "value")
        eig_steps, eig = run.series("top_eigenvalues", "eigenvalues")
        print(f"loss {loss[0]:.3f} -> {loss[-1]:.3f}; top Hessian eigenvalue on the probe "
              + ", ".join(f"{v:.3g} (step {int(s)})" for s, v in zip(eig_steps, eig[:, 0])))
        print(f"{len(run.findings())} findings; `landscape report {path}` renders them")
    return path


if __name__ == "__main__":
    main()
