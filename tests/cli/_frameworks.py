"""Real checkpoints of the frameworks users train with, written into a temporary folder.

A tiny GPT-2 (2 layers, width 32, vocabulary 100) built from a ``GPT2Config`` here (nothing is
downloaded), a word-level tokenizer trained on a generated corpus, and:

* ``save_pretrained`` folders (safetensors, tied input/output embeddings);
* a real ``transformers.Trainer`` run of 4 steps saving ``checkpoint-2`` and ``checkpoint-4``;
* a real ``lightning.Trainer`` fit of 4 steps saving a ``.ckpt`` of :class:`LitGPT`;
* a real ``transformers.Trainer`` run of a LoRA (PEFT) model, saving its adapters alone.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

VOCAB, SEQ = 100, 16
WORDS = [f"w{i}" for i in range(VOCAB - 2)]


def corpus(n_words: int = 3000, seed: int = 0) -> str:
    """A text of a random Markov chain over ``WORDS`` (learnable: each word has 3 successors)."""
    rng = random.Random(seed)
    nxt = {w: rng.sample(WORDS, 3) for w in WORDS}
    word, out = WORDS[0], []
    for i in range(n_words):
        out.append(word)
        word = rng.choice(nxt[word])
        if i % 20 == 19:
            out.append("\n")
    return " ".join(out)


def tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over ``WORDS`` (+ ``<unk>``, ``<eos>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<eos>")


def gpt2(seed: int = 0):
    """A fresh 2-layer GPT-2 (tied embeddings), about 30k parameters."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(config)


def token_ids(text: str | None = None) -> np.ndarray:
    """The corpus as token ids (1-D int64)."""
    return np.asarray(tokenizer()(text or corpus())["input_ids"], dtype=np.int64)


def blocks(n: int = 32) -> torch.Tensor:
    """``n`` training sequences of ``SEQ`` tokens."""
    ids = torch.from_numpy(token_ids())
    return ids[: n * SEQ].reshape(n, SEQ)


def save_pretrained(folder: Path, *, safe: bool = True) -> Path:
    """A trained-for-a-few-steps GPT-2 and its tokenizer, saved with ``save_pretrained``."""
    model = gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = blocks(8)
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(folder)
    if not safe:  # the older format, as transformers 4 wrote it (5 writes safetensors only)
        from safetensors.torch import load_file

        torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    tokenizer().save_pretrained(folder)
    return folder


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def hf_trainer(out: Path, *, steps: int = 4, save_steps: int = 2, adamw: bool = False) -> Path:
    """A real ``transformers.Trainer`` run saving checkpoints.

    SGD (lr 0.05, momentum 0.9), or with ``adamw`` the Trainer's default AdamW (lr 1e-3,
    weight decay 0.01: two parameter groups).
    """
    from transformers import Trainer, TrainingArguments

    model = gpt2()
    optim = ({"learning_rate": 1e-3, "weight_decay": 0.01} if adamw else
             {"learning_rate": 0.05, "optim": "sgd", "optim_args": "momentum=0.9"})
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, save_steps=save_steps, per_device_train_batch_size=4,
        **optim, lr_scheduler_type="constant",
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="steps", seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=_Blocks(blocks(32)),
            processing_class=tokenizer()).train()
    return out


def lora(base: torch.nn.Module, r: int = 2):
    """``base`` with LoRA adapters of rank ``r`` on its attention projections."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=r, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0,
                        fan_in_fan_out=True, init_lora_weights="gaussian")
    return get_peft_model(base, config)


def lora_trainer(out: Path, base_folder: Path, *, steps: int = 4, save_steps: int = 2) -> Path:
    """A real ``Trainer`` run of a LoRA model on the base model saved in ``base_folder``.

    Each ``checkpoint-N`` holds the adapters alone (``adapter_config.json`` naming
    ``base_folder``, ``adapter_model.safetensors``) and the Trainer's AdamW state; no tokenizer
    (it is the base folder's).
    """
    from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

    model = lora(GPT2LMHeadModel.from_pretrained(str(base_folder)))
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, save_steps=save_steps, per_device_train_batch_size=4,
        learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="steps", seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=_Blocks(blocks(32))).train()
    return out


def _lightning_module_class():
    import lightning.pytorch as pl

    class LitGPT(pl.LightningModule):
        """A LightningModule holding a GPT-2 as ``self.model`` (keys ``model.*``)."""

        def __init__(self, n_layer: int = 2, lr: float = 0.1, momentum: float = 0.9):
            super().__init__()
            self.save_hyperparameters()
            self.model = gpt2()

        def training_step(self, batch, _):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr,
                                   momentum=self.hparams.momentum)

    return LitGPT


try:  # importable by name for --model tests.cli._frameworks:LitGPT
    LitGPT = _lightning_module_class()
except ImportError:  # pragma: no cover - lightning not installed
    LitGPT = None


def lightning_fit(out: Path, *, steps: int = 4, record_class: bool = False) -> Path:
    """A real ``lightning.Trainer`` fit of :class:`LitGPT`; returns the ``.ckpt`` path.

    ``record_class`` stores the class path in the hyper-parameters, as ``LightningCLI`` does.
    """
    import lightning.pytorch as pl

    torch.manual_seed(0)
    module = LitGPT()
    if record_class:
        module.hparams["_class_path"] = f"{__name__}.LitGPT"
    loader = torch.utils.data.DataLoader(_Blocks(blocks(16)), batch_size=4)
    trainer = pl.Trainer(max_steps=steps, default_root_dir=str(out), accelerator="cpu",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(module, loader)
    path = out / f"lit-step={steps}.ckpt"
    trainer.save_checkpoint(path)
    return path
