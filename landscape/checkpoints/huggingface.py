"""Hugging Face layouts: model folders (``save_pretrained``) and ``Trainer`` output folders.

A model folder holds ``config.json`` and the weights as ``model.safetensors``,
``pytorch_model.bin`` or shards of either with an index file
(https://huggingface.co/docs/transformers/main_classes/model#transformers.PreTrainedModel.save_pretrained).
A ``Trainer`` output folder holds one model folder per save, ``checkpoint-<step>``, each with
``trainer_state.json`` and ``optimizer.pt``
(https://huggingface.co/docs/transformers/main_classes/trainer#checkpoints).
Models are built with ``from_pretrained(folder, local_files_only=True)``: nothing is ever
downloaded.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from landscape._errors import LandscapeError, first_line
from landscape._hf import is_causal_lm
from landscape.loading import STEP_WORDS

__all__ = [
    "build_model",
    "folder_step",
    "is_causal_lm",
    "is_model_folder",
    "load_tokenizer",
    "quiet_transformers",
    "read_weights",
    "trainer_checkpoints",
]

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``save_pretrained`` (``config.json`` in it).

    Args:
        path: a folder.

    Returns:
        True when it holds ``config.json`` and a weight file.
    """
    return (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def trainer_checkpoints(
    path: Path, accept: Callable[[Path], bool] = is_model_folder,
) -> list[Path]:
    """The ``checkpoint-<step>`` model folders of a ``Trainer`` output folder, by step.

    Args:
        path: a folder.
        accept: which ``checkpoint-<step>`` folders count (default: model folders; PEFT
            adapter folders, :mod:`landscape.checkpoints.adapters`).

    Returns:
        The checkpoint folders in increasing step order (empty when there are none).
        Beside accepted ones, a ``checkpoint-<step>`` folder that ``accept`` refuses (a
        save in progress or a crashed one: a ``config.json`` without weights) is left out
        with one warning naming it.
    """
    numbered = [(int(m.group(1)), p) for p in path.iterdir()
                if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name))]
    found = [(step, p) for step, p in numbered if accept(p)]
    refused = sorted(p.name for step, p in numbered if (step, p) not in found)
    if found and refused:
        shown = ", ".join(refused[:3]) + (f" (+{len(refused) - 3} more)" if len(refused) > 3
                                          else "")
        warnings.warn(f"{path}: {shown} {'holds' if len(refused) == 1 else 'hold'} no "
                      "weights of the kind the other checkpoints hold (a save in progress, "
                      "or a crashed one): left out",
                      RuntimeWarning, stacklevel=2)
    return [p for _, p in sorted(found)]


def saved_step(path: Path) -> int | None:
    """``global_step`` of the folder's ``trainer_state.json`` (the Trainer's record), or None.

    Args:
        path: a model folder.
    """
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            step = json.loads(state.read_text()).get("global_step")
            if isinstance(step, int):
                return step
        except (OSError, ValueError):
            pass
    return None


_STEP_NAME = re.compile(rf"(?:{STEP_WORDS})[-_=]?(\d+)", re.IGNORECASE)
"""A model folder's name that gives its step: that of a checkpoint file's folder, but not
``epoch-N`` (epochs are no steps, and would mix with the steps of other folders)."""


def folder_step(path: Path) -> int | None:
    """The training step of a model folder: ``trainer_state.json``, else its name.

    Args:
        path: a model folder.

    Returns:
        :func:`saved_step`, else the N of a folder named ``checkpoint-N`` (also
        ``step-N``, ``ckpt_N``, ``global_step=N``, ``iter-N``), or None.
    """
    step = saved_step(path)
    if step is not None:
        return step
    m = _STEP_NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    return dict(torch.load(path, map_location="cpu", weights_only=True))


def read_weights(folder: Path, files: Sequence[str] = WEIGHT_FILES) -> dict[str, torch.Tensor]:
    """The state dict a model folder holds, its shards joined (tied weights saved once).

    Args:
        folder: a model folder.
        files: the weight files to look for, the first found read (default: a model's).

    Returns:
        The tensors by name, on the CPU.

    Raises:
        LandscapeError: when no weight file is readable.
    """
    for name in files:
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".index.json"):
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
                state: dict[str, torch.Tensor] = {}
                for shard in shards:
                    state.update(_load_file(folder / shard))
                return state
            return _load_file(path)
        except Exception as err:
            first = first_line(err)
            raise LandscapeError(f"{path}: not a readable weight file ({first})") from err
    raise LandscapeError(f"{folder}: no weight file ({', '.join(files)})")


def _in_float32(model: nn.Module) -> nn.Module:
    """``model`` in float32 when its floating weights are 16-bit, else as it is.

    transformers 5 builds a model in the dtype its folder was saved in (``dtype="auto"``),
    transformers 4 in float32: a bfloat16 folder's λ_max was 12.99 under transformers 5
    against 13.04 for its weights in float32, and its surface jagged at small spans.
    16-bit values are exact in float32.
    """
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if floating and floating <= {torch.float16, torch.bfloat16}:
        return model.float()
    return model


def build_model(folder: Path) -> nn.Module:
    """The model of a model folder, built with ``from_pretrained`` from the local files.

    The class is the first of ``config.json``'s ``architectures`` (``GPT2LMHeadModel``),
    else ``AutoModelForCausalLM``, else ``AutoModel``.

    Args:
        folder: a model folder.

    Returns:
        The model, in eval mode.

    Raises:
        LandscapeError: when transformers is not installed or the model cannot be built.
    """
    try:
        import transformers
    except ImportError as err:
        raise LandscapeError(f"{folder}: install 'transformers' to load this model folder") from err
    try:
        arch = (json.loads((folder / "config.json").read_text()).get("architectures") or [None])[0]
    except (OSError, ValueError) as err:
        raise LandscapeError(f"{folder / 'config.json'}: not readable ({err})") from err
    classes = [getattr(transformers, arch)] if arch and hasattr(transformers, arch) else []
    classes += [transformers.AutoModelForCausalLM, transformers.AutoModel]
    errors = []
    with quiet_transformers():
        for cls in classes:
            try:
                model = cls.from_pretrained(str(folder), local_files_only=True).eval()
            except Exception as err:  # the next class may fit
                errors.append(f"{cls.__name__}: {first_line(err, '')}")
                continue
            if is_causal_lm(model) and getattr(model, "loss_type", None) is None:
                model.loss_type = "ForCausalLM"  # transformers' default, without its notice
            return _in_float32(model)
    raise LandscapeError(f"{folder}: cannot build the model ({errors[0]})")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Transformers' info messages and loading bars off while it loads (errors still raise)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in a model folder (``AutoTokenizer``, local files only).

    Args:
        folder: a model folder.

    Returns:
        The tokenizer.

    Raises:
        LandscapeError: when the folder holds no tokenizer.
    """
    try:
        from transformers import AutoTokenizer

        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        first = first_line(err)
        raise LandscapeError(f"{folder}: no usable tokenizer for --text ({first}); "
                             "give token ids with --tokens instead") from err
    # recent transformers build a tokenizer of special tokens alone instead of raising
    if len(tokenizer) <= len(set(getattr(tokenizer, "all_special_tokens", []))):
        raise LandscapeError(f"{folder}: no usable tokenizer for --text (the folder holds "
                             "no tokenizer files); give token ids with --tokens instead")
    return tokenizer
