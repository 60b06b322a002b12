"""PEFT adapter folders: the weights a LoRA (or other PEFT) fine-tuning run trained, alone.

``PeftModel.save_pretrained(folder)`` writes ``adapter_config.json`` and
``adapter_model.safetensors`` (or ``adapter_model.bin``), and a ``Trainer`` that trains a
``PeftModel`` writes such a folder as each ``checkpoint-<step>`` (with its
``optimizer.pt`` and ``trainer_state.json``), never the base model's weights
(https://huggingface.co/docs/peft/main/en/developer_guides/checkpoint).

An adapter checkpoint is therefore *partial*: it holds the weights the optimizer moved,
and every other weight is the base model's, as loaded. The model it loads into is a
``PeftModel``: the one ``--model`` builds, ``--model``'s base model with the first
adapter folder's adapters put on it, or, without ``--model``, the base model the adapter
config names (``base_model_name_or_path``) when it is a local model folder. Nothing is
downloaded. The saved keys lack the adapter's name (``...lora_A.weight`` for the model's
``...lora_A.default.weight``); :func:`model_keys` maps them with PEFT's own
``get_peft_model_state_dict``, which names the model's tensors as it saves them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from landscape._errors import LandscapeError
from landscape.checkpoints import huggingface as hf

__all__ = ["ADAPTER_FILES", "build_model", "is_adapter_folder", "model_keys", "read_weights",
           "tokenizer_folder", "trainer_checkpoints"]

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_CONFIG = "adapter_config.json"


def is_adapter_folder(path: Path) -> bool:
    """Whether ``path`` holds PEFT adapters: ``adapter_config.json`` and an adapter file."""
    return (path / _CONFIG).is_file() and any((path / f).is_file() for f in ADAPTER_FILES)


def trainer_checkpoints(path: Path) -> list[Path]:
    """The ``checkpoint-<step>`` adapter folders of a ``Trainer`` output folder, by step."""
    return hf.trainer_checkpoints(path, accept=is_adapter_folder)


def read_weights(folder: Path) -> dict[str, Any]:
    """The adapter weights of ``folder`` by their saved names, on the CPU.

    Raises:
        LandscapeError: no adapter file, or one that cannot be read.
    """
    return hf.read_weights(folder, files=ADAPTER_FILES)


def _config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / _CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise LandscapeError(f"{folder / _CONFIG}: not readable ({err})") from err
    if not isinstance(config, dict):
        raise LandscapeError(f"{folder / _CONFIG}: not an adapter config (a JSON object)")
    return config


def _base_folder(folder: Path) -> Path:
    """The local model folder the adapter config names as its base model.

    ``base_model_name_or_path`` is what ``from_pretrained`` was given when training began: a
    path (relative to where training ran: tried from the current folder, then from the
    folders above the adapters) or a Hub id.

    Raises:
        LandscapeError: no base named, or none of those places is a model folder.
    """
    named = _config(folder).get("base_model_name_or_path")
    if not isinstance(named, str) or not named:
        raise LandscapeError(f"{folder}: its {_CONFIG} names no base model; pass --model with "
                             "a factory that returns the base model (or the PEFT model)")
    for root in (Path.cwd(), *folder.resolve().parents):
        candidate = Path(named) if Path(named).is_absolute() else root / named
        if hf.is_model_folder(candidate):
            return candidate
    raise LandscapeError(
        f"{folder}: its base model {named!r} is not a local model folder (nothing is "
        "downloaded); pass --model with a factory that returns the base model, built from "
        "local files, or the PEFT model")


def tokenizer_folder(folder: Path) -> Path:
    """Where the tokenizer of an adapter folder is, for ``--text``.

    The folder itself when the Trainer saved one there, else its local base model's folder
    (else ``folder``, which ``--text`` then refuses).
    """
    if (folder / "tokenizer_config.json").is_file():
        return folder
    try:
        return _base_folder(folder)
    except LandscapeError:
        return folder


def build_model(folder: Path, base: nn.Module | None = None) -> nn.Module:
    """The ``PeftModel`` the adapters of ``folder`` load into, its adapters trainable.

    Args:
        folder: an adapter folder (its config and weights give the adapters' layout).
        base: the base model; None: the local model folder the adapter config names.

    Returns:
        The model, in eval mode; its trainable parameters are the adapters'.

    Raises:
        LandscapeError: peft is not installed, the base model cannot be found or built, or
            the adapters do not fit it.
    """
    try:
        from peft import PeftModel
    except ImportError as err:
        raise LandscapeError(f"{folder}: install 'peft' to load PEFT adapter folders") from err
    if base is None:
        base = hf.build_model(_base_folder(folder))
    try:
        with hf.quiet_transformers():
            model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LandscapeError(f"{folder}: the adapters do not fit the base model ({first})") \
            from err
    return model.eval()


def model_keys(model: nn.Module) -> dict[str, str]:
    """The model's state-dict key of each key an adapter file saves, for a ``PeftModel``.

    PEFT saves ``get_peft_model_state_dict(model)``: the model's own tensors under names
    without the adapter's. Each is found again in ``model.state_dict()`` by its storage
    (the active adapter's: a ``--model`` factory may name it other than ``default``).
    Empty for a model that is not a ``PeftModel`` (or without peft).
    """
    try:
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict
    except ImportError:
        return {}
    if not isinstance(model, PeftModel):
        return {}
    own = {(t.data_ptr(), t.storage_offset(), tuple(t.shape)): k
           for k, t in model.state_dict().items()}
    saved = get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    keys = {name: own.get((t.data_ptr(), t.storage_offset(), tuple(t.shape)))
            for name, t in saved.items()}
    return {name: k for name, k in keys.items() if k is not None}
