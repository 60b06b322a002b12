"""Lightning ``.ckpt`` files: weights, step, hyper-parameters and the module's class.

A Lightning checkpoint is a dict with ``state_dict`` (the ``LightningModule``'s, its
submodules' keys prefixed by their attribute name, e.g. ``model.``), ``global_step``,
``hyper_parameters`` (what ``save_hyperparameters()`` recorded) and ``optimizer_states``
(https://lightning.ai/docs/pytorch/stable/common/checkpointing_basic.html#contents-of-a-checkpoint).
``LightningCLI`` also records the module's class path in the hyper-parameters
(``_class_path``), which is how the module is rebuilt without ``--model``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from landscape._errors import LandscapeError
from landscape._hf import is_pretrained_model
from landscape.loading import torch_load

__all__ = [
    "CLASS_KEYS", "build_module", "inner_module", "is_last_copy", "read_ckpt", "recorded_class",
]

CLASS_KEYS = ("_class_path", "class_path", "__class__")


def is_last_copy(path: str | Path) -> bool:
    """Whether ``path`` is ``last*.ckpt``, Lightning's copy of the latest checkpoint.

    ``ModelCheckpoint(save_last=True)`` writes it beside the checkpoint it repeats, so it
    holds a step another file holds.
    """
    name = Path(path).name
    return name.startswith("last") and name.endswith(".ckpt")


def read_ckpt(path: Path, *, trust: bool = False) -> dict[str, Any]:
    """The dict a ``.ckpt`` file holds (``torch.load``, weights only unless trusted).

    Args:
        path: the file.
        trust: allow pickled objects (can run arbitrary code).

    Returns:
        The checkpoint dict.

    Raises:
        LandscapeError: an unreadable file, or one without ``state_dict``.
    """
    obj = torch_load(path, trust=trust, kind="Lightning checkpoint")
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        raise LandscapeError(f"{path}: not a Lightning checkpoint (no 'state_dict' entry)")
    return dict(obj)


def recorded_class(ckpt: Mapping[str, Any]) -> str | None:
    """The ``module.Class`` path the hyper-parameters record (``LightningCLI``), or None.

    Args:
        ckpt: the checkpoint dict.

    Returns:
        The dotted class path, or None.
    """
    hp = ckpt.get("hyper_parameters") or {}
    for key in CLASS_KEYS:
        value = hp.get(key) if isinstance(hp, Mapping) else None
        if isinstance(value, str) and "." in value:
            return value
    return None


def _import_class(dotted: str, path: Path) -> type:
    """The ``LightningModule`` class a checkpoint records, refused unless it is one.

    The file chooses the name, so nothing it names is called, and no module of the
    standard library (``this``, ``antigravity`` do things on import) or ``__main__`` is
    imported; what is imported must be a ``LightningModule`` class (``LightningCLI``
    records only those), checked before anything calls it.
    """
    module, _, name = dotted.replace(":", ".").rpartition(".")
    top = module.split(".")[0]
    refuse = LandscapeError(f"{path}: the recorded class {dotted!r} is not a LightningModule "
                            "class; pass --model package.module:LitClass")
    if not module or top == "__main__" or top in sys.stdlib_module_names:
        raise refuse
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception as err:
        raise LandscapeError(f"{path}: cannot import the recorded class {dotted!r} ({err}); "
                             "pass --model package.module:LitClass") from err
    if not (isinstance(cls, type) and issubclass(cls, _lightning_module())):
        raise refuse
    return cls


def _lightning_module() -> type:
    """Lightning's ``LightningModule`` (either package), or ``nn.Module`` without Lightning."""
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name).LightningModule
        except ImportError:
            continue
    return nn.Module


def build_module(ckpt: Mapping[str, Any], path: Path, cls: type | None = None) -> nn.Module:
    """The ``LightningModule`` of a checkpoint, built from its hyper-parameters.

    Args:
        ckpt: the checkpoint dict.
        path: its file (named in errors).
        cls: the class (``--model pkg.mod:LitClass``); default: the recorded one.

    Returns:
        ``cls(**hyper_parameters)`` (entries starting with ``_`` left out), weights not loaded.

    Raises:
        LandscapeError: no class given or recorded, or the constructor fails.
    """
    if cls is None:
        dotted = recorded_class(ckpt)
        if dotted is None:
            raise LandscapeError(f"{path}: the checkpoint does not record its LightningModule "
                                 "class; pass --model package.module:LitClass")
        cls = _import_class(dotted, path)
    # checked before the call: a checkpoint that names any other callable (subprocess.Popen)
    # would have it run with arguments of the file's choosing, without --trust-checkpoint
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise LandscapeError(f"{path}: {getattr(cls, '__qualname__', type(cls).__name__)} "
                             "is not a torch.nn.Module class (the LightningModule the "
                             "checkpoint belongs to); pass --model package.module:LitClass")
    hp = {k: v for k, v in dict(ckpt.get("hyper_parameters") or {}).items()
          if not str(k).startswith("_") and k not in CLASS_KEYS}
    try:
        module = cls(**hp)
    except Exception as err:
        raise LandscapeError(f"{path}: {cls.__name__}(**hyper_parameters) raised "
                             f"{type(err).__name__}: {err}") from err
    return module


def defines_forward(module: nn.Module) -> bool:
    """Whether the class of ``module`` (not Lightning's or torch's) defines ``forward``."""
    for klass in type(module).__mro__:
        if klass.__module__.split(".")[0] in ("lightning", "pytorch_lightning", "torch"):
            return False
        if "forward" in vars(klass):
            return True
    return False


def inner_module(module: nn.Module) -> tuple[nn.Module, str]:
    """The network a ``LightningModule`` wraps, and the state-dict prefix it has.

    A module whose parameters all belong to one child (``self.model = ...``) is analyzed
    through that child (its forward and, for a Hugging Face model, its loss) when the
    module defines no ``forward`` of its own (the child is called in ``training_step``) or
    the child is a Hugging Face model (a ``forward(**batch)`` that passes the batch on: the
    model's own checks, loss and next-token labels apply); otherwise the module itself: a
    ``forward`` that normalises or reshapes its inputs before the network is part of the
    function the checkpoint computes.

    Args:
        module: the ``LightningModule``.

    Returns:
        ``(network, prefix)``, the prefix ``"model."`` or ``""``.
    """
    total = sum(1 for _ in module.parameters())
    for name, child in module.named_children():
        n = sum(1 for _ in child.parameters())
        if n and n == total and (not defines_forward(module) or is_pretrained_model(child)):
            return child, f"{name}."
    return module, ""
