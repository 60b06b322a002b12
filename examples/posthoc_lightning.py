"""Post-hoc analysis of a Lightning ``.ckpt``, with no Python beyond the module's class.

A ``LightningModule`` holding a small GPT-2 (``self.model``, built from a ``GPT2Config``:
nothing is downloaded) learns a random Markov-chain language with ``lightning.Trainer``
and SGD + momentum; ``ModelCheckpoint`` saves ``.ckpt`` files as it always does. The
class lives in ``OUT/litgpt.py`` (written here, as your project's module would be).
Afterwards:

1. ``landscape analyze OUT/ckpts/*.ckpt --model OUT/litgpt.py:LitGPT --tokens OUT/ids.npy``:
   the module is rebuilt from the checkpoint's hyper-parameters, the GPT-2 inside it is
   analyzed (the ``model.`` prefix of the state dict removed), its own loss is used, the
   step is ``global_step`` and the sharpness threshold comes from ``optimizer_states``;
2. ``landscape surface ... --dims 1``: the loss along a random filter-normalized line
   around the last checkpoint.

    python examples/posthoc_lightning.py --out lit-posthoc    # a minute or two on a CPU
    python examples/posthoc_lightning.py --small              # seconds (CI smoke test)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from posthoc_huggingface import landscape_cli

MODULE = textwrap.dedent('''\
    """The LightningModule of posthoc_lightning.py: a GPT-2 language model."""

    import lightning.pytorch as pl
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel


    class LitGPT(pl.LightningModule):
        def __init__(self, vocab: int = 64, width: int = 32, lr: float = 0.05,
                     momentum: float = 0.9):
            super().__init__()
            self.save_hyperparameters()
            # token 0 as bos/eos: GPT-2's default 50256 lies outside this vocabulary
            self.model = GPT2LMHeadModel(GPT2Config(
                vocab_size=vocab, n_positions=64, n_embd=width, n_layer=2, n_head=2,
                bos_token_id=0, eos_token_id=0))

        def training_step(self, batch, _):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr,
                                   momentum=self.hparams.momentum)
    ''')


def markov_ids(n: int, vocab: int = 64, seed: int = 0) -> np.ndarray:
    """Token ids of a random Markov chain (each token has 3 successors)."""
    rng = random.Random(0)
    nxt = {t: rng.sample(range(vocab), 3) for t in range(vocab)}
    rng = random.Random(seed)
    tok, out = 0, []
    for _ in range(n):
        out.append(tok)
        tok = rng.choice(nxt[tok])
    return np.asarray(out, dtype=np.int64)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lit-posthoc", help="directory for every file")
    parser.add_argument("--small", action="store_true", help="reduced size (CI smoke test)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the CLI commands in this process instead of subprocesses")
    args = parser.parse_args(argv)
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "litgpt.py").write_text(MODULE)
    spec = importlib.util.spec_from_file_location("litgpt", out / "litgpt.py")
    assert spec is not None and spec.loader is not None
    litgpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(litgpt)
    steps, every = (4, 2) if args.small else (300, 100)
    for old in (out / "ckpts").glob("*.ckpt"):
        old.unlink()
    torch.manual_seed(0)
    train = torch.from_numpy(markov_ids(20000)[: 600 * 32].reshape(600, 32))
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True)
    saver = ModelCheckpoint(dirpath=out / "ckpts", filename="{step}", every_n_train_steps=every,
                            save_top_k=-1)
    pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[saver]).fit(litgpt.LitGPT(), loader)
    np.save(out / "ids.npy", markov_ids(4000, seed=1))  # held-out tokens
    ckpts = sorted(str(p) for p in (out / "ckpts").glob("*.ckpt"))
    run = out / "run.h5"
    run.unlink(missing_ok=True)

    common = ["--model", f"{out / 'litgpt.py'}:LitGPT", "--tokens", str(out / "ids.npy")]
    common += ["--seq-len", "16", "--batch-size", "4"] if args.small else ["--seq-len", "32"]
    few = ["-m", "sharpness", "-m", "collapse", "-k", "1"] if args.small else []
    _, t_analyze = landscape_cli("analyze", *ckpts, *common, *few, "-o", str(run), "-q",
                                 in_process=args.in_process)
    _, t_surface = landscape_cli("surface", ckpts[-1], *common, "--dims", "1", "--steps",
                                 "3" if args.small else "21", "-o", str(run), "-q",
                                 in_process=args.in_process)

    from landscape import Run

    with Run.open(run) as r:
        steps_done = [int(s) for s, _ in r.checkpoints()]
        _, lam = r.series("sharpness", "lambda_max")
        _, thr = r.series("sharpness", "threshold")
        surfaces = r.surfaces()
    summary = {
        "checkpoints": ckpts,
        "steps": steps_done,
        "lambda_max": [float(v) for v in lam],
        "threshold": [float(v) for v in thr],
        "surfaces": list(surfaces),
        "seconds": {"analyze": t_analyze, "surface": t_surface},
        "files": [str(run)],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("step  lambda_max  threshold (2+2b)/lr")
    for s, a, b in zip(steps_done, summary["lambda_max"], summary["threshold"]):
        print(f"{s:4d}  {a:10.3f}  {b:19.1f}")
    return summary


if __name__ == "__main__":
    main()
