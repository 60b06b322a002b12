"""From what the user names on the command line to loaded checkpoints and a model.

:func:`open_checkpoints` accepts, in any mix:

* checkpoint files as :func:`landscape.loading.load_checkpoint` reads them (state dicts,
  ``.safetensors``);
* Hugging Face model folders (``config.json`` + weights) and ``Trainer`` output folders,
  whose ``checkpoint-<step>`` subfolders become one checkpoint each
  (:mod:`landscape.checkpoints.huggingface`);
* Lightning ``.ckpt`` files (:mod:`landscape.checkpoints.lightning`);
* PEFT adapter folders, and ``Trainer`` output folders of them
  (:mod:`landscape.checkpoints.adapters`).

Without a model factory the model comes from the checkpoints themselves: built with
``from_pretrained`` from the first model folder, the ``LightningModule`` class the
checkpoint records, or the local base model an adapter folder names, its adapters on it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from landscape import _hf
from landscape._errors import LandscapeError
from landscape.checkpoints import adapters
from landscape.checkpoints import huggingface as hf
from landscape.checkpoints import lightning as lit
from landscape.checkpoints.optim import optimizer_settings, read_optimizer_file
from landscape.loading import (
    Checkpoint,
    call_factory,
    folder_on_path,
    load_checkpoint,
    load_factory,
    pickled_model,
    step_from_name,
)

__all__ = ["Opened", "expand", "open_checkpoints", "open_data"]


@dataclass
class Opened:
    """What :func:`open_checkpoints` found.

    Attributes:
        model: the network the checkpoints are loaded into.
        checkpoints: the loaded checkpoints (in the order found).
        folder: the first Hugging Face model folder (its tokenizer reads ``--text``; for
            adapter folders without a tokenizer, their local base model's folder).
        kinds: the kinds of checkpoint met: ``"huggingface"``, ``"peft"``, ``"lightning"``,
            ``"file"``.
    """

    model: nn.Module
    checkpoints: list[Checkpoint]
    folder: Path | None = None
    kinds: set[str] = field(default_factory=set)


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """Each path, with the folders that hold several checkpoints replaced by them.

    A ``Trainer`` output folder by its checkpoint folders (also when a final ``save_model()``
    made it a model folder itself: those weights count only when its ``trainer_state.json``
    dates them after the last checkpoint), a ``Trainer`` output folder of a PEFT model by its
    adapter folders, a folder of Lightning ``.ckpt`` files by those files (``last*.ckpt``
    left out).

    Args:
        paths: files and folders as given.

    Returns:
        Files and model folders.

    Raises:
        LandscapeError: a folder that is neither a model folder nor a Trainer output folder.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.suffix == ".distcp" or (p.is_dir() and (p / ".metadata").is_file() \
                and any(p.glob("*.distcp"))):
            folder = p.parent if p.suffix == ".distcp" else p
            what = "a shard of a" if p.suffix == ".distcp" else "a"
            raise LandscapeError(
                f"{p}: {what} torch.distributed.checkpoint (DCP) folder, which this command "
                "does not read; convert the folder to one file first: torch.distributed."
                f"checkpoint.format_utils.dcp_to_torch_save({str(folder)!r}, 'model.pt')")
        if not p.is_dir():
            out.append(p)
        elif subs := hf.trainer_checkpoints(p):
            out.extend(subs)
            out.extend(_final_save(p, subs[-1], p if hf.is_model_folder(p) else None,
                                   "model"))
        elif subs := adapters.trainer_checkpoints(p):  # a PEFT model's Trainer folder
            out.extend(subs)
            # the adapters save_model() wrote: into the folder itself, or a named one's
            # subfolder (out/task/)
            out.extend(_final_save(p, subs[-1], adapters.chosen_adapter(p, warn=False),
                                   "adapters"))
        elif hf.is_model_folder(p):
            out.append(p)
        elif chosen := adapters.chosen_adapter(p):
            out.append(chosen)
        elif ckpts := sorted(c for c in p.glob("*.ckpt") if c.is_file()):
            # a ModelCheckpoint folder; last.ckpt repeats the latest checkpoint
            out.extend([c for c in ckpts if not lit.is_last_copy(c)] or ckpts)
        else:
            files = sorted({f.suffix for f in p.iterdir() if f.is_file()
                            and f.suffix in (".pt", ".pth", ".bin", ".safetensors")})
            hint = (f"; for the checkpoint files in it, name them: {p}/*{files[0]}"
                    if files else "")
            raise LandscapeError(
                f"{p}: is a directory, but neither a Hugging Face model folder (config.json "
                "and weights), a PEFT adapter folder (adapter_config.json and weights), a "
                "Trainer output folder (checkpoint-N/ folders) nor a folder of Lightning "
                f".ckpt files{hint}")
    # overlapping globs (ckpts/*.pt ckpts/ckpt-3*) name a file twice: once is enough
    seen: set[Path] = set()
    return [q for q in out if not (q.resolve() in seen or seen.add(q.resolve()))]


def _final_save(folder: Path, last: Path, saved: Path | None, what: str) -> list[Path]:
    """The weights a final ``trainer.save_model()`` wrote into a Trainer output folder.

    Counted when ``trainer_state.json`` (``trainer.save_state()``) dates them after the
    last checkpoint folder; left out with a warning otherwise. ``saved``: where in the
    folder such weights are (None: nowhere; ``what``: the model, or a PEFT model's
    adapters).
    """
    if saved is None:
        return []
    final, step = hf.saved_step(folder), hf.folder_step(adapters.checkpoint_folder(last))
    if final is not None and step is not None and final > step:
        return [saved]
    warnings.warn(
        f"{folder}: the {what} saved in the folder itself (trainer.save_model()) "
        f"{'is' if what == 'model' else 'are'} left out, only its checkpoint-N/ folders are "
        f"read: no trainer_state.json there dates "
        f"them after {last.name} (trainer.save_state() writes one)", stacklevel=3)
    return []


def _load(path: Path, trust: bool) -> tuple[Checkpoint, dict[str, Any] | None]:
    """One checkpoint (and the raw Lightning dict, for building its module)."""
    def reload() -> Checkpoint:
        return _load(path, trust)[0]

    if path.is_dir():
        adapter = not hf.is_model_folder(path) and adapters.is_adapter_folder(path)
        # a named adapter's subfolder: its step and optimizer are the checkpoint folder's
        home = adapters.checkpoint_folder(path) if adapter else path
        return Checkpoint(path, adapters.read_weights(path) if adapter else hf.read_weights(path),
                          hf.folder_step(home),
                          optimizer=read_optimizer_file(home / "optimizer.pt"),
                          reload=reload, partial=adapter), None
    if path.suffix == ".ckpt" and path.is_file():
        ck = lit.read_ckpt(path, trust=trust)
        states = ck.get("optimizer_states") or [None]
        step = ck.get("global_step")
        return Checkpoint(path, dict(ck["state_dict"]),
                          step if isinstance(step, int) else step_from_name(path),
                          optimizer=optimizer_settings(states[0]), reload=reload), ck
    return load_checkpoint(path, trust=trust), None


def open_checkpoints(
    paths: Sequence[str | Path], model: str | None = None, *, trust: bool = False,
) -> Opened:
    """Load every checkpoint ``paths`` names and the model to load them into.

    Args:
        paths: checkpoint files, model folders, Trainer output folders, ``.ckpt`` files.
        model: a model factory (``module:fn``, ``file.py:fn``) or, for ``.ckpt`` files, a
            ``LightningModule`` class; None: from the checkpoints (module docstring).
        trust: allow pickled objects in torch checkpoints.

    Returns:
        The model, the checkpoints and the first model folder.

    Raises:
        LandscapeError: an unusable path, or no way to build the model.
    """
    if not paths:
        raise LandscapeError("no checkpoints given")
    # a trusted whole-model pickle names its classes' module (``fac`` for a class defined
    # in fac.py): the factory file's folder is importable while the checkpoints load
    checkpoints: list[Checkpoint] = []
    kinds: set[str] = set()
    lightning: tuple[Checkpoint, dict[str, Any]] | None = None  # its raw dict builds the module
    with folder_on_path(model) if model is not None and trust else contextlib.nullcontext():
        for p in expand(paths):
            ckpt, raw = _load(p, trust)
            kinds.add("peft" if ckpt.partial else "huggingface" if ckpt.path.is_dir()
                      else "lightning" if raw is not None else "file")
            if raw is not None and lightning is None:
                lightning = (ckpt, raw)
            checkpoints.append(ckpt)
            ckpt.release()  # one in memory at a time: read again when used
    folder = next((c.path for c in checkpoints if c.path.is_dir()), None)
    adapter = next((c.path for c in checkpoints if c.partial), None)
    net: Any
    if model is not None:
        obj = load_factory(model, "model factory")
        if lightning is not None and isinstance(obj, type) and issubclass(obj, nn.Module):
            net, _ = lit.inner_module(lit.build_module(lightning[1], lightning[0].path, obj))
        else:
            net = call_factory(model, "model factory")
            if adapter is not None and isinstance(net, nn.Module) \
                    and not adapters.model_keys(net):  # the base model: the adapters go on it
                net = adapters.build_model(adapter, base=net)
    elif lightning is not None:
        net, _ = lit.inner_module(lit.build_module(lightning[1], lightning[0].path))
    elif adapter is not None:
        net = adapters.build_model(adapter)
    elif folder is not None:
        net = hf.build_model(folder)
    elif (whole := next((c for c in checkpoints if c.whole_model), None)) is not None:
        net = pickled_model(whole)  # torch.save(model): the model is in the file
    else:
        raise LandscapeError("--model is needed for these checkpoints: package.module:fn or "
                             "path/to/file.py:fn returning the torch.nn.Module they belong to")
    if not isinstance(net, nn.Module):
        raise LandscapeError(
            f"the model factory returned a {type(net).__name__}, not a torch.nn.Module "
            "(does --model name the data factory?)"
        )
    if adapter is not None:
        _refuse_unusable_adapters(net, checkpoints, kinds)
        names = adapters.model_keys(net)
        for c in checkpoints:
            if c.partial:
                c.rename(names)
        if folder == adapter:  # the tokenizer for --text
            folder = adapters.tokenizer_folder(adapter)
    return Opened(net, checkpoints, folder, kinds)


def _refuse_unusable_adapters(net: nn.Module, checkpoints: list[Checkpoint],
                              kinds: set[str]) -> None:
    """One line for adapter checkpoints that cannot be analyzed on ``net`` as it is.

    Adapters mixed with whole models (one model cannot hold both), a PEFT model whose
    adapters are frozen (``PeftModel.from_pretrained``'s default ``is_trainable=False``:
    nothing to differentiate), adapters saved with another configuration
    (:func:`~landscape.checkpoints.adapters.refuse_other_config`).
    """
    if len(kinds) > 1:
        raise LandscapeError(
            "PEFT adapter folders cannot be analyzed with whole-model checkpoints in one "
            f"call ({', '.join(sorted(kinds - {'peft'}))} given too): analyze them apart, or "
            "save merged models (merge_and_unload().save_pretrained) for all")
    if not any(p.requires_grad for p in net.parameters()):
        raise LandscapeError(
            "the PEFT model's adapters are frozen, so there is nothing to analyze "
            "(PeftModel.from_pretrained loads them with is_trainable=False by default): "
            "pass is_trainable=True, or let --model return the base model")
    for c in checkpoints:
        if c.partial:
            adapters.refuse_other_config(c.path, net)


def _input_embeddings(model: nn.Module) -> nn.Embedding | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return emb if isinstance(emb, nn.Embedding) else None


def _vocab_size(model: nn.Module) -> int | None:
    emb = _input_embeddings(model)
    return None if emb is None else int(emb.num_embeddings)


def _max_positions(model: nn.Module) -> int | None:
    """A Hugging Face model's hard position limit, or None.

    ``n_positions`` / ``max_position_embeddings`` of its config, when the model has a
    learned position table of that many rows (GPT-2's ``wpe``, BERT's
    ``position_embeddings``): a longer sequence indexes past it. Rotary or relative
    positions (Llama, GPT-NeoX, T5) have no such table and take longer sequences.
    """
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            # a table of that many rows besides the token embeddings (a vocabulary as
            # large as the context, 64 and 64, is no reason to skip the check)
            tokens = _input_embeddings(model)
            learned = any(isinstance(m, nn.Embedding) and m.num_embeddings == value
                          and m is not tokens for m in model.modules())
            return value if learned else None
    return None


def open_data(
    opened: Opened,
    data: str | None = None,
    *,
    tokens: str | Path | None = None,
    text: str | Path | None = None,
    seq_len: int = 128,
    batch_size: int = 8,
    n_batches: int = 1,
    pad_id: int | None = None,
) -> Any:
    """The data to evaluate: a data factory's result, or language-model batches.

    Args:
        opened: what :func:`open_checkpoints` returned (the model and tokenizer folder).
        data: a data factory (``module:fn``, ``file.py:fn``).
        tokens: a ``.npy``/``.pt`` file of token ids.
        text: a text file, encoded with the tokenizer of the model folder.
        seq_len: tokens per sequence.
        batch_size: sequences per batch.
        n_batches: number of batches.
        pad_id: the id that pads the rows of ``tokens`` (:func:`~landscape.checkpoints.
            tokens.token_batches`).

    Returns:
        One batch or a list of batches.

    Raises:
        LandscapeError: no data or two kinds of it, or data that cannot be read.
    """
    from landscape.checkpoints.tokens import token_batches

    given = [n for n, v in (("--data", data), ("--tokens", tokens), ("--text", text))
             if v is not None]
    if len(given) != 1:
        raise LandscapeError(
            "give the data as one of --data module:fn, --tokens FILE or --text FILE"
            + (f" (not {' and '.join(given)})" if given else ""))
    if pad_id is not None and tokens is None:
        raise LandscapeError("--pad-id: for --tokens data only (a --data factory gives its "
                             "own attention_mask and labels, --text has no padding)")
    if data is not None:
        return call_factory(data, "data factory")
    tokenizer = None
    if text is not None:
        if opened.folder is None:
            raise LandscapeError("--text needs the tokenizer of a Hugging Face model folder "
                                 "(beside PEFT adapters, or in their local base model's "
                                 "folder); give token ids with --tokens instead")
        tokenizer = hf.load_tokenizer(opened.folder)
    _refuse_not_causal(opened.model, "--tokens" if tokens is not None else "--text")
    return token_batches(tokens=tokens, text=text, tokenizer=tokenizer, seq_len=seq_len,
                         batch_size=batch_size, n_batches=n_batches,
                         vocab_size=_vocab_size(opened.model), pad_id=pad_id,
                         max_positions=_max_positions(opened.model))


_LABELLED_HEADS = ("SEQUENCE_CLASSIFICATION", "TOKEN_CLASSIFICATION", "QUESTION_ANSWERING",
                   "MULTIPLE_CHOICE", "NEXT_SENTENCE_PREDICTION", "TABLE_QUESTION_ANSWERING",
                   "DOCUMENT_QUESTION_ANSWERING", "MASKED_LM")
"""transformers' task mappings whose models do not learn from ``labels`` = the ids: heads
with labels of their own, and masked LMs (whose loss on unmasked ids is copying them)."""


def _labelled_head(model: Any) -> str | None:
    """The class (or base class) of a Hugging Face model that does not learn from the ids.

    A classifier, tagger or question-answering head, or a masked LM
    (:data:`_LABELLED_HEADS`), found along the class's bases (a subclass of
    ``GPT2ForSequenceClassification`` is one too); None for causal and sequence-to-sequence
    language models, models no mapping names, and other libraries' modules.
    """
    base = _hf.peft_base(model)
    if not _hf.is_pretrained_model(base):
        return None
    labelled = _hf.task_classes(*_LABELLED_HEADS)
    # a class a language-model mapping lists is one, whatever else lists it (BART is a
    # masked LM and a sequence-to-sequence one; XLM's LM head a masked and a causal one)
    lms = _hf.task_classes("CAUSAL_LM", "SEQ_TO_SEQ_CAUSAL_LM")
    for cls in type(base).__mro__:
        if cls.__name__ in lms:
            return None
        if cls.__name__ in labelled:
            return cls.__name__
    return None


def _refuse_not_causal(model: Any, option: str) -> None:
    """Refuse token batches for a Hugging Face model that does not learn from the ids.

    They are a causal language model's (``labels`` = the ids): a sequence classifier failed
    on them with torch's "Expected input batch_size (8) to match target batch_size (240)",
    and a masked LM's loss on unmasked ids is that of copying them. Causal and
    sequence-to-sequence LMs, models no mapping names, and models of other libraries (a
    LightningModule around a causal LM) are let through.
    """
    head = _labelled_head(model)
    if head is not None:
        name = type(_hf.peft_base(model)).__name__
        kind = ("a masked LM, which learns from masked inputs"
                if head in _hf.task_classes("MASKED_LM") else "a head that takes labels of its own")
        raise LandscapeError(
            f"{option}: these batches are a causal language model's (the ids are the "
            f"labels), and {name}{'' if head == name else f' (a {head})'} is {kind}; "
            "give its batches with --data module:fn (a dict with its inputs and labels)")


def refuse_unshifted_loss(model: nn.Module, batches: Sequence[Any], closure: Any,
                          option: str) -> None:
    """Refuse token batches for a causal LM whose own loss does not shift its labels.

    Token batches pass the ids as the labels (:func:`~landscape.checkpoints.tokens.
    token_batches`), which is the next-token loss only for a model that shifts them.
    Some classes transformers maps to causal language modelling compute their own loss
    on unshifted labels, ``labels[..., i]`` the target of position ``i`` (XLNet's and
    XLM's LM heads, ``BartForCausalLM`` and other decoders built for a sequence-to-sequence
    model): with the ids as labels that is the loss of copying the token the position
    already reads, whose curvature says nothing about the run. The model's loss on the
    first batch is compared with the cross-entropy of its logits against the labels
    unshifted and shifted by one, on two rows of the first batch: equal to the first and
    not the second, it is refused.

    Only under the model's own loss (``closure`` is :func:`~landscape._hf.model_loss`) and
    for a transformers model that is no encoder-decoder (whose decoder is fed the labels
    shifted right) and whose loss is not transformers' shifted one
    (:func:`~landscape._hf.uses_causal_lm_loss`): one forward pass without gradients.

    Raises:
        LandscapeError: the loss is the unshifted one.
    """
    import torch
    import torch.nn.functional as F

    base = _hf.peft_base(model)
    if (closure is not _hf.model_loss or not batches or not isinstance(batches[0], dict)
            or not _hf.is_pretrained_model(base) or _hf.uses_causal_lm_loss(model)
            or getattr(getattr(base, "config", None), "is_encoder_decoder", False)):
        return
    rows = next((v.shape[0] for v in batches[0].values()
                 if isinstance(v, torch.Tensor) and v.dim() >= 1), 0)
    # two rows of the first batch are enough, and keep the logits' copies small (a large
    # vocabulary's float32 logits of a whole batch, twice)
    batch = {k: v[:2] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows
             else v for k, v in batches[0].items()}
    labels = batch.get("labels")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        output = model(**batch)
    loss, logits = _hf.output_loss(output), getattr(output, "logits", None)
    if (loss is None or not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor)
            or logits.shape[:-1] != labels.shape or labels.dim() != 2):
        return
    flat = logits.float()
    unshifted = F.cross_entropy(flat.flatten(0, 1), labels.flatten(), ignore_index=-100)
    shifted = F.cross_entropy(flat[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                              ignore_index=-100)
    loss = loss.float()
    if not (torch.isfinite(unshifted) and torch.isfinite(shifted) and torch.isfinite(loss)):
        return
    gap_unshifted, gap_shifted = float((loss - unshifted).abs()), float((loss - shifted).abs())
    if gap_unshifted <= 1e-4 * max(float(unshifted.abs()), 1.0) < gap_shifted:
        name = type(base).__name__
        raise LandscapeError(
            f"{option}: these batches pass the ids as the labels, and {name}'s own loss does "
            "not shift them (labels[..., i] is the target of position i), so it would be the "
            "loss of copying each token; give its batches with --data module:fn (labels "
            "shifted by one), or a loss that shifts them with --loss module:fn")
