"""Post-hoc analysis of a Hugging Face ``Trainer`` output folder, with no Python of your own.

A small GPT-2 (built from a ``GPT2Config`` here: nothing is downloaded) learns a random
Markov-chain language with ``transformers.Trainer`` (SGD + momentum), which saves
``checkpoint-N/`` folders (weights, ``optimizer.pt``, ``trainer_state.json``, the tokenizer)
as it always does. Afterwards the ``landscape`` command reads that folder as it is:

1. ``landscape analyze OUT/trainer-out --text OUT/corpus.txt --seq-len 32 --batch-size 8``:
   the model is built from each folder's ``config.json`` with ``from_pretrained`` (local
   files only), the text is encoded by the saved tokenizer, the loss is the model's own
   (labels = input ids, shifted by the model) and the sharpness threshold
   ``(2 + 2 momentum) / lr`` comes from ``optimizer.pt``;
2. ``landscape surface OUT/trainer-out --tokens OUT/ids.npy --directions pca``: the loss
   over the plane of the checkpoint trajectory (``--small``: the line between the two
   checkpoints);
3. ``landscape report OUT/run.h5``: one HTML file.

    python examples/posthoc_huggingface.py --out hf-posthoc    # a minute or two on a CPU
    python examples/posthoc_huggingface.py --small             # seconds (CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

WORDS = [f"w{i}" for i in range(62)]


def corpus(n_words: int, seed: int = 0) -> str:
    """A random Markov chain over ``WORDS`` (each word has 3 successors), 20 words a line."""
    rng = random.Random(0)
    nxt = {w: rng.sample(WORDS, 3) for w in WORDS}
    rng = random.Random(seed)
    word, out = WORDS[0], []
    for i in range(n_words):
        out.append(word + ("\n" if i % 20 == 19 else " "))
        word = rng.choice(nxt[word])
    return "".join(out)


def tokenizer():
    """A word-level tokenizer over ``WORDS`` (built here, saved with the checkpoints)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<eos>")


class Blocks(torch.utils.data.Dataset):
    """Consecutive blocks of ``seq`` tokens as causal-LM examples (labels = input ids)."""

    def __init__(self, ids: torch.Tensor, seq: int) -> None:
        self.x = ids[: len(ids) // seq * seq].reshape(-1, seq)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def train(out: Path, steps: int, save_steps: int, width: int) -> Path:
    """``transformers.Trainer`` with SGD + momentum; checkpoints every ``save_steps``."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    tok = tokenizer()
    ids = torch.tensor(tok(corpus(20000))["input_ids"])
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS) + 2, n_positions=64,
                                       n_embd=width, n_layer=2, n_head=2, bos_token_id=1,
                                       eos_token_id=1, pad_token_id=1))
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, save_steps=save_steps, save_strategy="steps",
        per_device_train_batch_size=16, learning_rate=0.05, optim="sgd",
        optim_args="momentum=0.9", lr_scheduler_type="constant", report_to=[], use_cpu=True,
        logging_steps=max(1, steps // 5), disable_tqdm=True, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=Blocks(ids, 32), processing_class=tok).train()
    return out


def landscape_cli(*args: str, in_process: bool = False) -> tuple[str, float]:
    """Run ``landscape ARGS`` (a subprocess of this interpreter, or in this process)."""
    print("$ landscape " + " ".join(args), flush=True)
    start = time.perf_counter()
    if in_process:
        from click.testing import CliRunner
        from landscape_cli.main import cli

        res = CliRunner().invoke(cli, list(args), prog_name="landscape")
        status, stdout, stderr = res.exit_code, res.stdout, res.stderr
    else:
        done = subprocess.run([sys.executable, "-m", "landscape_cli.main", *args],
                              capture_output=True, text=True)
        status, stdout, stderr = done.returncode, done.stdout, done.stderr
    seconds = time.perf_counter() - start
    if stdout.strip():
        print(textwrap.indent(stdout.rstrip(), "  "))
    print(f"  ({seconds:.1f} s)")
    if status != 0:
        raise SystemExit(f"landscape {args[0]} failed ({status}): {stderr.strip()}")
    return stdout, seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="hf-posthoc", help="directory for every file")
    parser.add_argument("--small", action="store_true", help="reduced size (CI smoke test)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the CLI commands in this process instead of subprocesses")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps, save = (4, 2) if args.small else (300, 50)
    trainer_out = out / "trainer-out"
    train(trainer_out, steps, save, 32 if args.small else 64)
    (out / "corpus.txt").write_text(corpus(3000, seed=1))  # held-out text
    np.save(out / "ids.npy", np.asarray(tokenizer()(corpus(3000, seed=2))["input_ids"]))
    run = out / "run.h5"
    run.unlink(missing_ok=True)

    def landscape(*a: str) -> tuple[str, float]:
        return landscape_cli(*a, in_process=args.in_process)

    lm = ["--seq-len", "16", "--batch-size", "4"] if args.small else ["--seq-len", "32",
                                                                      "--batch-size", "8"]
    few = ["-m", "sharpness", "-m", "collapse", "-k", "1"] if args.small else []
    _, t_analyze = landscape("analyze", str(trainer_out), "--text", str(out / "corpus.txt"),
                             *lm, *few, "-o", str(run), "-q")
    _, t_surface = landscape("surface", str(trainer_out), "--tokens", str(out / "ids.npy"), *lm,
                             "--directions", "interpolate" if args.small else "pca",
                             "--steps", "3" if args.small else "21",
                             "--name", "trajectory", "-o", str(run), "-q")
    landscape("report", str(run), "-o", str(out / "report.html"))

    from landscape import Run

    with Run.open(run) as r:
        steps_done = [int(s) for s, _ in r.checkpoints()]
        _, lam = r.series("sharpness", "lambda_max")
        _, thr = r.series("sharpness", "threshold")
        _, nc1 = r.series("collapse", "nc1")
        surfaces = r.surfaces()
    summary = {
        "steps": steps_done,
        "lambda_max": [float(v) for v in lam],
        "threshold": [float(v) for v in thr],
        "nc1": [float(v) for v in nc1],
        "surfaces": list(surfaces),
        "seconds": {"analyze": t_analyze, "surface": t_surface},
        "files": [str(run), str(out / "report.html")],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("step  lambda_max  threshold (2+2b)/lr  NC1 (next token)")
    for s, a, b, c in zip(steps_done, summary["lambda_max"], summary["threshold"],
                          summary["nc1"]):
        print(f"{s:4d}  {a:10.3f}  {b:19.1f}  {c:8.4f}")
    return summary


if __name__ == "__main__":
    main()
