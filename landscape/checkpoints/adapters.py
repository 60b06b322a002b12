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
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from landscape._errors import LandscapeError, first_line
from landscape.checkpoints import huggingface as hf

__all__ = ["ADAPTER_FILES", "build_model", "checkpoint_folder", "chosen_adapter",
           "is_adapter_folder", "model_keys", "read_weights", "refuse_other_config",
           "saved_adapters", "tokenizer_folder", "trainer_checkpoints"]

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_CONFIG = "adapter_config.json"


def is_adapter_folder(path: Path) -> bool:
    """Whether ``path`` holds PEFT adapters: ``adapter_config.json`` and an adapter file."""
    return (path / _CONFIG).is_file() and any((path / f).is_file() for f in ADAPTER_FILES)


def saved_adapters(folder: Path) -> dict[str, Path]:
    """The adapters a ``save_pretrained`` folder holds, by name.

    PEFT writes the one named ``default`` into the folder itself and any other into a
    subfolder of its name.
    """
    found = {"default": folder} if is_adapter_folder(folder) else {}
    if folder.is_dir():  # (a Trainer output folder's checkpoint-N/ are no adapter names)
        found.update((sub.name, sub) for sub in sorted(folder.iterdir())
                     if sub.is_dir() and hf.folder_step(sub) is None
                     and is_adapter_folder(sub))
    return found


def chosen_adapter(folder: Path, warn: bool = True) -> Path | None:
    """The adapter folder to read for ``folder`` (None: it holds no adapters).

    The folder itself when it holds the ``default`` adapter, else its one named adapter
    (``get_peft_model(..., adapter_name="task")`` saves ``checkpoint-N/task/``). With
    several adapters, the ``default`` one, with a warning naming the others' folders (to
    be given instead; ``warn=False``: the caller says it); several named ones alone cannot
    be told apart: an error.

    Raises:
        LandscapeError: several named adapters and no ``default`` one.
    """
    return _choose(folder, saved_adapters(folder), warn)


def _choose(folder: Path, found: dict[str, Path], warn: bool) -> Path | None:
    """:func:`chosen_adapter` of ``folder``, whose :func:`saved_adapters` are ``found``."""
    if len(found) <= 1:
        return next(iter(found.values()), None)
    others = ", ".join(str(path) for name, path in found.items() if name != "default")
    if "default" not in found:
        raise LandscapeError(f"{folder}: holds several PEFT adapters ({', '.join(found)}): "
                             f"give the folder of the one to analyze ({others})")
    if warn:
        warnings.warn(f"{folder}: holds several PEFT adapters ({', '.join(found)}); the one "
                      f"saved in the folder itself (default) is analyzed: give {others} for "
                      "another", stacklevel=3)
    return folder


def trainer_checkpoints(path: Path) -> list[Path]:
    """The adapter folders of a PEFT model's ``Trainer`` output folder, by step.

    Each ``checkpoint-<step>`` folder's :func:`chosen_adapter`; several adapters per
    checkpoint are warned about once for the whole folder.
    """
    held: dict[Path, dict[str, Path]] = {}  # each checkpoint folder's adapters, read once

    def holds_adapters(folder: Path) -> bool:
        held[folder] = saved_adapters(folder)
        return bool(held[folder])

    found = hf.trainer_checkpoints(path, accept=holds_adapters)
    chosen = [c for p in found if (c := _choose(p, held[p], warn=False)) is not None]
    # the other adapters of checkpoints whose default one is read
    names = sorted({n for p in found if "default" in held[p] for n in held[p]} - {"default"})
    if names:  # once for the whole folder
        others = ", ".join(f"{path}/checkpoint-*/{n}" for n in names)
        warnings.warn(f"{path}: its checkpoints hold several PEFT adapters (default, "
                      f"{', '.join(names)}); the one saved in each checkpoint folder itself "
                      f"(default) is analyzed: give {others} for another", stacklevel=3)
    return chosen


def checkpoint_folder(adapter: Path) -> Path:
    """The folder that holds an adapter's ``optimizer.pt`` and gives its step.

    A named adapter's subfolder (``checkpoint-40/task/``) belongs to the checkpoint
    folder above it; any other adapter folder is its own.
    """
    parent = adapter.parent
    if hf.folder_step(adapter) is None and hf.folder_step(parent) is not None \
            and adapter.name in saved_adapters(parent):
        return parent
    return adapter


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


def tokenizer_folder(folder: Path) -> Path | None:
    """Where the tokenizer of an adapter folder is, for ``--text``.

    The folder itself when the Trainer saved one there, else its local base model's folder;
    None when neither holds one (a base model named by its Hub id).
    """
    if (folder / "tokenizer_config.json").is_file():
        return folder
    try:
        return _base_folder(folder)
    except LandscapeError:
        return None


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
        first = first_line(err)
        raise LandscapeError(f"{folder}: the adapters do not fit the base model ({first})") \
            from err
    return model.eval()


_SETUP_ONLY = {"base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
               "peft_version", "init_lora_weights", "lora_dropout", "loftq_config",
               "eva_config", "corda_config", "lora_ga_config", "runtime_config", "task_type"}
"""Adapter-config fields that do not change the function the adapters compute: where the
base came from, how the adapters were initialised, dropout (off in the measurements), the
task (the heads it saves are ``modules_to_save``, compared on their own)."""


def _comparable(value: Any) -> Any:
    """A config value as compared: collections as sets, empty ones as None.

    PEFT extends a loaded model's ``modules_to_save`` with its task's defaults, repeating
    them.
    """
    if isinstance(value, (list, tuple, set, frozenset)):
        return sorted(set(map(str, value))) or None
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value  # an enum (peft_type, task_type)
    return value


def refuse_other_config(folder: Path, model: nn.Module) -> None:
    """Refuse adapters saved with another configuration than the model's active adapter.

    The fields both configurations have are compared, but those of :data:`_SETUP_ONLY`: a
    model built with another ``lora_alpha`` (a scale), rank, target modules or
    ``modules_to_save`` computes another function from the same weights (a ``--model``
    factory's PEFT model, or adapter folders of two runs in one call).

    Raises:
        LandscapeError: naming the first fields that differ.
    """
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - the model could not have been built
        return
    if not isinstance(model, PeftModel):
        return
    saved = _config(folder)
    own = model.peft_config[model.active_adapter].to_dict()
    differ = [f"{k} {_comparable(saved[k])!r} (the model: {_comparable(own[k])!r})"
              for k in sorted(set(saved) & set(own) - _SETUP_ONLY)
              if _comparable(saved[k]) != _comparable(own[k])]
    if differ:
        more = f" (+{len(differ) - 3} more)" if len(differ) > 3 else ""
        raise LandscapeError(
            f"{folder}: its adapters were saved with another configuration than the model's "
            f"adapter {model.active_adapter!r}: {'; '.join(differ[:3])}{more}; build the "
            "PEFT model with the saved configuration, give --model the base model, or "
            "analyze the runs apart")


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
