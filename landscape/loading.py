"""Loading user code and checkpoints for post-hoc analysis: factories, losses, state dicts.

Every failure is a :class:`~landscape.LandscapeError` with one line that names the file or the
factory, so the command line can print it without a traceback.

* factories: ``"pkg.module:callable"`` or ``"path/to/file.py:callable"``;
* losses: a name (``cross_entropy``, ``mse``, ``nll``, ``bce_with_logits``) or a factory spec;
* checkpoints: a state dict, a dict holding one under a common key (``model``,
  ``state_dict``, ``model_state_dict``, ``module``, ``net``, ``weights``), or a
  ``.safetensors`` file (when the ``safetensors`` package is installed). ``torch.load``
  runs with ``weights_only=True`` unless the caller trusts the file (pickled code can run
  arbitrary code).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import numbers
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from landscape._checks import shown
from landscape._errors import LandscapeError, first_line
from landscape._hf import model_loss
from landscape.batches import leading_size, to_device

__all__ = [
    "LOSSES",
    "Checkpoint",
    "load_checkpoint",
    "load_factory",
    "load_state_into",
    "model_loss",
    "pickled_model",
    "prepare",
    "refuse_mismatch",
    "resolve_loss",
    "resolve_objective",
    "step_from_name",
    "torch_load",
]

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "nll": F.nll_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
}
STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
STEP_KEYS = ("step", "global_step", "iteration", "epoch")
"""Entries of a checkpoint dict that give its step, in order; ``epoch`` only when the file
name gives none (``ckpt_2000.pt`` saved within epoch 0 is step 2000)."""
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "optim", "opt")
"""Entries of a checkpoint dict that hold ``Optimizer.state_dict()`` (the PyTorch tutorial's
``optimizer_state_dict`` included)."""


def _factory_file(spec: str) -> Path | None:
    """The file of a ``file.py:attr`` spec, or None for ``module:attr``."""
    target = spec.rpartition(":")[0]
    if target.endswith(".py") or "/" in target or "\\" in target:
        return Path(target)
    return None


@contextlib.contextmanager
def folder_on_path(spec: str) -> Iterator[None]:
    """The folder of a factory file first on ``sys.path`` while it is imported and called.

    So a factory file can import the modules next to it, as ``python file.py`` would let it,
    without ``PYTHONPATH=.``. A ``module:name`` spec gets the current folder, last (an
    installed package of the same name wins), as ``python -m`` finds the modules there;
    a console command such as ``landscape`` does not put it on ``sys.path`` itself. The
    folder is removed again afterwards unless it was there.
    """
    path = _factory_file(spec) if ":" in spec else None
    if ":" in spec and path is None:
        folder, first = os.getcwd(), False
    else:
        folder = str(path.resolve().parent) if path is not None and path.is_file() else None
        first = True
    if folder is None or folder in sys.path:
        yield
        return
    if first:
        sys.path.insert(0, folder)
    else:
        sys.path.append(folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def load_factory(spec: str, what: str = "factory", *, need_callable: bool = True) -> Any:
    """The callable named by ``spec`` (``module:attr`` or ``file.py:attr``).

    A file's folder is on ``sys.path`` while the file is imported, so it can import its
    neighbours. With ``need_callable=False`` any object is returned (a list of rules).
    """
    if ":" not in spec:
        raise LandscapeError(f"{what} {spec!r}: expected 'package.module:name' or 'file.py:name'")
    target, _, attr = spec.rpartition(":")
    path = _factory_file(spec)
    if path is not None:
        if not path.is_file():
            raise LandscapeError(f"{what} {spec!r}: file {str(path)!r} not found")
        name = f"_landscape_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise LandscapeError(f"{what} {spec!r}: cannot import {str(path)!r}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            with folder_on_path(spec):
                module_spec.loader.exec_module(module)
        except SystemExit as err:
            del sys.modules[name]
            raise LandscapeError(f"{what} {spec!r}: {_exited(err, f'importing {path}')}") \
                from None
        except Exception as err:
            del sys.modules[name]
            raise LandscapeError(f"{what} {spec!r}: importing {path} failed: {err}") from err
    else:
        try:
            with folder_on_path(spec):
                module = importlib.import_module(target)
        except SystemExit as err:
            raise LandscapeError(f"{what} {spec!r}: {_exited(err, f'importing {target}')}") \
                from None
        except Exception as err:
            raise LandscapeError(f"{what} {spec!r}: cannot import {target!r}: {err}") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LandscapeError(f"{what} {spec!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if need_callable and not callable(obj):
        raise LandscapeError(f"{what} {spec!r} is not callable")
    return obj


def _exited(err: SystemExit, doing: str) -> str:
    """What to say when user code called ``sys.exit`` (an argument parser at import)."""
    return (f"{doing} called sys.exit({err.code!r}) (does it parse command-line arguments "
            "or run a script when imported? guard that with if __name__ == '__main__':)")


def call_factory(spec: str, what: str) -> Any:
    """Load and call a zero-argument factory, turning its exceptions into one line.

    A factory file's folder is on ``sys.path`` during the call too (for imports inside the
    function).
    """
    with folder_on_path(spec):
        factory = load_factory(spec, what)
        try:
            return factory()
        except SystemExit as err:
            raise LandscapeError(f"{what} {spec!r}: {_exited(err, 'calling it')}") from None
        except Exception as err:
            raise LandscapeError(f"{what} {spec!r} raised {type(err).__name__}: {err}") from err


def load_rules(spec: str) -> list[Any]:
    """The alarm rules named by ``spec`` (``module:attr`` or ``file.py:attr``).

    ``attr`` is a rule, a list or tuple of rules, a rule class (made with its defaults)
    or a zero-argument function returning a rule or a list of them (or yielding them): what
    ``landscape check --rules`` evaluates besides the built-in rules
    (:func:`landscape.alarms.with_rules`).

    Raises:
        LandscapeError: ``spec`` cannot be imported, or names no rules (one line).
    """
    from landscape.alarms import Rule

    with folder_on_path(spec):
        obj = load_factory(spec, "rules", need_callable=False)
        if (isinstance(obj, type) and issubclass(obj, Rule)) or (
                callable(obj) and not isinstance(obj, (Rule, type))):
            try:
                obj = obj()
                if isinstance(obj, Iterator):  # a generator function: its rules, drawn here
                    obj = list(obj)
            except SystemExit as err:
                raise LandscapeError(f"rules {spec!r}: {_exited(err, 'calling it')}") from None
            except Exception as err:
                raise LandscapeError(f"rules {spec!r} raised {type(err).__name__}: {err}") \
                    from err
    rules = [obj] if isinstance(obj, Rule) else obj
    if not isinstance(rules, (list, tuple)):
        raise LandscapeError(f"rules {spec!r}: expected a Rule, a list of rules, a Rule class "
                             f"or a function returning them, got {type(obj).__name__}")
    for i, rule in enumerate(rules):
        if not isinstance(rule, Rule):
            hint = (f" (a class: list {rule.__name__}() instead)" if isinstance(rule, type)
                    else "")
            raise LandscapeError(f"rules {spec!r}: item {i} of the list is "
                                 f"{shown(rule, typed=True)}, not a Rule{hint}")
    from landscape.alarms import OnlineAlarms

    try:  # validated as the alarms will (a metrics string, a bad number): one line, here
        OnlineAlarms(list(rules))
    except ValueError as err:
        raise LandscapeError(f"rules {spec!r}: {err}") from None
    return list(rules)


def resolve_loss(spec: str | Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A loss function from a name in :data:`LOSSES`, a factory spec, or a callable."""
    if callable(spec):
        return spec
    if spec in LOSSES:
        return LOSSES[spec]
    if ":" in spec:
        return load_factory(spec, "loss")
    raise LandscapeError(f"unknown loss {spec!r}; use one of {', '.join(LOSSES)}, model (the "
                         "model's own loss) or module:fn")


def resolve_objective(
    spec: str | Callable[..., torch.Tensor] | None, batches: list[Any],
) -> tuple[Callable[..., torch.Tensor] | None, Callable[..., torch.Tensor] | None]:
    """``(loss_fn, closure)`` for ``--loss`` and the data: exactly one is not None.

    ``(inputs, targets)`` batches use ``loss_fn(model(inputs), targets)`` (default
    ``cross_entropy``). Dict batches use a closure ``closure(model, batch)``: the model's
    own loss (:func:`model_loss`; ``--loss model`` asks for it explicitly) or a
    ``module:fn`` taking ``(model, batch)``.

    Args:
        spec: ``--loss``: None, ``"model"``, a name in :data:`LOSSES`, a factory spec or a
            callable.
        batches: the data, as :func:`prepare` returns it.

    Returns:
        ``(loss_fn, None)`` or ``(None, closure)``.

    Raises:
        LandscapeError: a named loss with dict batches, or an unknown name.
    """
    dicts = bool(batches) and isinstance(batches[0], Mapping)
    if spec is None:
        return (None, model_loss) if dicts else (LOSSES["cross_entropy"], None)
    if spec == "model":
        if not dicts:
            raise LandscapeError(
                "--loss model (the model's own loss, model(**batch).loss) needs dict "
                "batches; the data are (inputs, targets) pairs: leave --loss out "
                f"(cross_entropy) or name one ({', '.join(LOSSES)}, module:fn)")
        return None, model_loss
    if dicts:
        if isinstance(spec, str) and spec in LOSSES:
            raise LandscapeError(
                f"--loss {spec} needs (inputs, targets) batches; the data are dict batches, "
                "whose loss is the model's own (leave --loss out) or a module:fn taking "
                "(model, batch)"
            )
        return None, resolve_loss(spec)
    return resolve_loss(spec), None


class _Deferred(Mapping):
    """A mapping read from its file only when first used (a released optimizer state)."""

    def __init__(self, read: Callable[[], Mapping[str, Any]]) -> None:
        self._read = read
        self._value: Mapping[str, Any] | None = None

    def _get(self) -> Mapping[str, Any]:
        if self._value is None:
            self._value = self._read()
        return self._value

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


class Checkpoint:
    """A checkpoint: its ``state_dict``, the ``step`` it belongs to and its ``path``.

    ``shapes`` (each tensor's shape by name) stays when the weights are released:
    :func:`refuse_mismatch` checks a checkpoint against a model without reading it again.

    ``optimizer`` holds the optimizer's settings saved with it, when the checkpoint has them
    (:func:`landscape.checkpoints.optimizer_settings`). With ``reload`` (a function that
    reads the file again), :meth:`release` drops the weights and the optimizer's saved
    state until they are used again: ``analyze`` holds every checkpoint it is given, one
    in memory at a time.

    A ``partial`` checkpoint holds only the weights training moved (PEFT adapters saved
    alone, :mod:`landscape.checkpoints.adapters`): the model's other weights stay as they
    are when it is loaded, and :meth:`rename` gives its saved names the model's.
    """

    def __init__(self, path: Path, state_dict: dict[str, torch.Tensor], step: int | None,
                 optimizer: dict[str, Any] | None = None, *,
                 reload: Callable[[], Checkpoint] | None = None, partial: bool = False):
        self.path, self.step, self.partial = path, step, partial
        self._names: dict[str, str] = {}  # saved name -> the model's (rename())
        self._state_dict: dict[str, torch.Tensor] | None = state_dict  # under saved names
        # kept after release(): whether the checkpoint fits a model needs no second reading
        # (None for an entry that is not a tensor: a module's extra state)
        self._saved_shapes: dict[str, tuple[int, ...] | None] = {
            k: tuple(v.shape) if isinstance(v, torch.Tensor) else None
            for k, v in state_dict.items()}
        self.optimizer = optimizer
        self._reload = reload
        #: the checkpoint's saved ``epoch`` when its step came from the file name (whose
        #: number may name the architecture, resnet18.pt): the order's fallback
        self.epoch: int | None = None
        #: the file is a whole pickled model (``torch.save(model)``), which can be the
        #: model itself: :func:`pickled_model`
        self.whole_model = False

    @property
    def shapes(self) -> dict[str, tuple[int, ...] | None]:
        """Each tensor's shape by name (None for an entry that is not a tensor)."""
        return self._renamed(self._saved_shapes)

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights by name (read from the file again after :meth:`release`)."""
        if self._state_dict is None:
            assert self._reload is not None
            fresh = self._reload()
            self._state_dict = fresh._state_dict
            if fresh.optimizer is not None:  # its saved state too, from the same reading
                self.optimizer = fresh.optimizer
        assert self._state_dict is not None
        return self._renamed(self._state_dict)

    def rename(self, names: Mapping[str, str]) -> None:
        """Name the weights as the model does: ``names`` maps a saved name to the model's.

        Names it does not map stay as saved; a second call replaces the first.
        """
        self._names = dict(names)

    def _renamed(self, state: dict[str, Any]) -> dict[str, Any]:
        return {self._names.get(k, k): v for k, v in state.items()} if self._names else state

    def release(self) -> None:
        """Drop the weights and the optimizer's saved state; they are read again when used.

        Nothing happens for a checkpoint that cannot be read again (no ``reload``).
        """
        if self._reload is None:
            return
        self._state_dict = None
        if self.optimizer and "state_dict" in self.optimizer:
            reload = self._reload
            self.optimizer = {**self.optimizer, "state_dict": _Deferred(
                lambda: (reload().optimizer or {}).get("state_dict") or {})}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, step={self.step})"


STEP_WORDS = "checkpoint|ckpt|step|global_step|iter|iteration"
"""The words before a step number in a checkpoint folder's name (``checkpoint-40``)."""

_STEP_FOLDER = re.compile(rf"(?:{STEP_WORDS}|epoch)[-_=]?(\d+)", re.IGNORECASE)
_STEP_IN_NAME = re.compile(rf"(?<![a-z])(?:{STEP_WORDS})[-_=]?(\d+)", re.IGNORECASE)


def _whole_number(value: Any) -> int | None:
    """``value`` as an int when it is a whole number, else None (a bool included).

    A Python or numpy integer, or a one-element integer tensor (``{"step":
    torch.tensor(500)}``).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_floating_point() \
                or value.is_complex():
            return None
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def step_from_name(path: str | Path) -> int | None:
    """The step a checkpoint's path names, or None.

    The number after a step word in the file name (``step``, ``global_step``, ``iter``,
    ``iteration``, ``ckpt``, ``checkpoint``, then ``-``, ``_``, ``=`` or nothing; the last
    such: ``epoch=3-step=400-val_loss=0.52.pt`` -> 400, ``model_step10_loss1.001.pt`` ->
    10, ``ckpt-000500-acc93.pt`` -> 500); without one, the last integer in the file name
    (``model_1200.pt`` -> 1200); when the file name has none, the step of a checkpoint
    folder (``checkpoint-40/model.safetensors`` -> 40, the layout of Hugging Face's
    ``Trainer``; also ``ckpt-N``, ``step-N``, ``epoch=N``, and a folder named by its
    number alone, ``1500/model.pt``).
    """
    path = Path(path)
    named = _STEP_IN_NAME.findall(path.stem)
    if named:  # a metric's value or a date beside it is no step
        return int(named[-1])
    numbers = re.findall(r"\d+", path.stem)
    if numbers:
        return int(numbers[-1])
    if path.parent.name.isdigit():
        return int(path.parent.name)
    folder = _STEP_FOLDER.fullmatch(path.parent.name)
    return int(folder.group(1)) if folder else None


def _looks_like_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def torch_load(path: Path, *, trust: bool = False, kind: str = "torch checkpoint") -> Any:
    """``torch.load`` on the CPU, tensors only unless the user trusts the file.

    Args:
        path: the file.
        trust: allow pickled objects beyond tensors (``--trust-checkpoint``; can run
            arbitrary code).
        kind: what the file should be, for the error message.

    Returns:
        The loaded object.

    Raises:
        LandscapeError: the file holds pickled objects and is not trusted, or is unreadable
            (one line naming the file).
    """
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"\x89HDF"):
        raise LandscapeError(f"{path}: is an HDF5 file (a landscape run file?), not a {kind}")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # zip, or a pickle
        raise LandscapeError(f"{path}: not a {kind} (neither a zip archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as err:
        if not trust and "weights_only" in str(err):
            raise LandscapeError(
                f"{path}: holds pickled objects beyond tensors; if you trust the file, pass "
                "--trust-checkpoint (it can run arbitrary code)"
            ) from err
        first = first_line(err)
        hint = ""
        if isinstance(err, (AttributeError, ModuleNotFoundError)):  # torch.save(model)
            hint = ("; it pickles a whole model whose class cannot be imported here: save "
                    "model.state_dict() instead and pass --model FACTORY")
        raise LandscapeError(f"{path}: not a readable {kind} ({first}){hint}") from err


def load_checkpoint(path: str | Path, *, trust: bool = False) -> Checkpoint:
    """Load ``path`` (see module docstring); the step comes from the file or its name."""
    path = Path(path)
    if path.is_dir():
        raise LandscapeError(f"{path}: is a directory, expected a checkpoint file")
    if not path.is_file():
        raise LandscapeError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise LandscapeError(f"{path}: install 'safetensors' to read this file") from err
        try:
            return Checkpoint(path, dict(load_file(str(path))), step_from_name(path),
                              reload=lambda: load_checkpoint(path, trust=trust))
        except Exception as err:
            raise LandscapeError(f"{path}: not a readable safetensors file ({err})") from err
    from landscape.checkpoints.optim import optimizer_settings  # it imports this module

    obj = torch_load(path, trust=trust, kind="torch checkpoint")
    whole = isinstance(obj, nn.Module)
    if whole:
        obj = obj.state_dict()
    step = epoch = optimizer = None
    if isinstance(obj, Mapping) and not _looks_like_state_dict(obj):
        for key in STEP_KEYS:
            value = _whole_number(obj.get(key))
            if value is not None:
                if key == "epoch":
                    epoch = value
                else:
                    step = value
                    break
        for key in OPTIMIZER_KEYS:
            optimizer = optimizer_settings(obj.get(key))
            if optimizer is not None:
                break
        for key in STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if _looks_like_state_dict(inner):
                obj = inner
                break
    if not _looks_like_state_dict(obj):
        raise LandscapeError(
            f"{path}: no state dict found (expected tensors by name, or one under "
            f"{', '.join(repr(k) for k in STATE_KEYS)})"
        )
    named = step is None and step_from_name(path) is not None
    if step is None:
        step = step_from_name(path)
    ckpt = Checkpoint(path, dict(obj), step if step is not None else epoch, optimizer,
                      reload=lambda: load_checkpoint(path, trust=trust))
    if named:  # the file name's number: analysis falls back to the epoch when they collide
        ckpt.epoch = epoch
    ckpt.whole_model = whole
    return ckpt


def pickled_model(ckpt: Checkpoint) -> nn.Module:
    """The model a whole-model pickle holds (``torch.save(model)``), read again.

    Its weights are those of this checkpoint; loading each checkpoint's state into it
    (:func:`load_state_into`) gives the others'. Only for a checkpoint loaded with
    ``trust`` (a whole pickle needs it).
    """
    obj = torch_load(ckpt.path, trust=True, kind="torch checkpoint")
    assert isinstance(obj, nn.Module)
    return obj


def _strip_prefix(state: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with the prefix that makes its keys the model's removed.

    A DDP wrapper saves ``module.``-prefixed keys, a ``LightningModule`` its submodules'
    (``model.``), ``torch.compile`` ``_orig_mod.``, and they nest (``module._orig_mod.``):
    the prefix of up to three dotted names under which the state holds the most of the
    model's keys, when more than as it is; only its keys are kept (a LightningModule's loss
    and metric modules are not the model's).

    Raises:
        LandscapeError: two prefixes (or the keys as they are and a prefix) each hold as
            many of the model's keys as any, with other values (a model and its EMA copy,
            a student and its teacher; a tied weight saved once may leave both short of
            one key): which one is meant cannot be told.
    """
    state = dict(state)
    hits = sum(k in own for k in state)
    # keys as they are that hold the whole model: only a prefix of the other keys can
    # hold a second copy
    foreign = [k for k in state if k not in own] if own and hits == len(own) else list(state)
    candidates = set()
    for k in foreign:
        parts = k.split(".")
        candidates.update(".".join(parts[:i]) + "." for i in range(1, min(len(parts), 4)))
    scored = [("", state, hits)]
    for prefix in sorted(candidates):  # (a prefix the model's own keys share too, a
        # LightningModule's model.model.layers for model.layers, is tried like any other)
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        scored.append((prefix, sub, sum(k in own for k in sub)))
    most = max(n for _, _, n in scored)
    tops = [(prefix, sub) for prefix, sub, n in scored if n == most and n > 0]
    if len(tops) > 1 and _differ(*(sub for _, sub in tops)):
        names = ", ".join(repr(p) if p else "the keys as they are" for p, _ in tops)
        raise LandscapeError(
            f"the checkpoint holds copies of the model under {names} (a model and its "
            "EMA, a student and its teacher): which one to analyze cannot be told; save "
            "that one's state_dict() on its own")
    if not tops:
        return state
    prefix, best = tops[0]
    if len(tops) > 1 and not prefix:  # copies alike (or shapes alone, which cannot tell):
        # the model's own keys, without the other copies' (the values then decide)
        return {k: v for k, v in best.items() if k in own}
    return best


def _differ(*states: Mapping[str, Any]) -> bool:
    """Whether two of the state dicts hold different tensors under one key.

    False for views of shapes only (:func:`refuse_mismatch`'s), which cannot tell.
    """
    first = states[0]
    for other in states[1:]:
        for k, v in first.items():
            w = other.get(k)
            if isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor) and (
                    v.shape != w.shape or not torch.equal(v, w)):
                return True
    return False


def _shared_names(model: nn.Module) -> list[list[str]]:
    """The state-dict names of ``model`` that hold one tensor, each group of two or more.

    Tied weights (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``), a block
    registered under several names (``nn.ModuleList([block] * 3)``).
    """
    by_storage: dict[tuple, list[str]] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor) and t.numel():  # (a transposed view is not one)
            by_storage.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(),
                                   tuple(t.shape), t.stride(), t.dtype), []).append(k)
    return [names for names in by_storage.values() if len(names) > 1]


def _restore_tied(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Fill keys a checkpoint left out because the model ties them to a saved one.

    ``save_pretrained`` (safetensors) stores a tensor shared by several names once, e.g.
    GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``. ``state`` maps names to
    tensors, or to what stands for them (their shapes, :func:`refuse_mismatch`).
    """
    for names in _shared_names(model):
        saved = next((n for n in names if n in state), None)
        if saved is not None:
            for n in names:
                state.setdefault(n, state[saved])
    return state


def _refuse_untied(state: Mapping[str, Any], model: nn.Module, path: Any) -> None:
    """Raise when the model shares one tensor between names the checkpoint holds apart.

    Loading would keep the last name's values and drop the others' without a word: a
    factory that ties weights (or reuses a block) training did not tie measures another
    function.
    """
    for names in _shared_names(model):
        held = [n for n in names if isinstance(state.get(n), torch.Tensor)]
        for other in held[1:]:
            a, b = state[held[0]], state[other]
            if a.shape == b.shape and a.stride() == b.stride() \
                    and a.data_ptr() == b.data_ptr():
                continue  # saved as one tensor (NaN in it: a run that blew up)
            same = a.shape == b.shape and a.dtype == b.dtype and (
                torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)
                if a.is_floating_point() else torch.equal(a, b))
            if not same:
                raise LandscapeError(
                    f"{path}: the model holds {held[0]} and {other} as one tensor (tied "
                    f"weights, a block reused), but the checkpoint holds different values "
                    f"for them: build the model as it was trained (without tying or "
                    f"sharing them)")


def refuse_mismatch(model: nn.Module, ckpt: Checkpoint) -> None:
    """Raise a one-line error when ``ckpt`` does not fit ``model``; nothing is loaded.

    The check :func:`load_state_into` makes, on the names and shapes the checkpoint keeps
    after :meth:`Checkpoint.release` (the file is not read again). Prefixes of wrappers
    (``module.`` of DDP, ``model.`` of a ``LightningModule``) are removed and tied weights
    saved once count as saved.

    A partial checkpoint (:class:`Checkpoint`) may leave out what the model does not train:
    only its trainable parameters count as missing.

    Raises:
        LandscapeError: keys missing, unexpected or of another shape.
    """
    own = model.state_dict()
    shapes = _restore_tied(_strip_prefix(ckpt.shapes, own), model)
    missing = [k for k in own if k not in shapes]
    frozen: list[str] = []
    if ckpt.partial:  # the weights it leaves out stay the model's (a frozen base model)
        trained = {k for k, p in model.named_parameters() if p.requires_grad}
        missing = [k for k in missing if k in trained]
        # and it holds what training moved: a weight the model does not train (a head
        # saved as modules_to_save, frozen in a model built without it) would be measured
        # as a constant
        frozen = [k for k, p in model.named_parameters() if k in shapes and not p.requires_grad]
    unexpected = [k for k in shapes if k not in own]
    mismatched = [
        f"{k} {shapes[k]} vs model {tuple(own[k].shape)}"
        for k in own if shapes.get(k) is not None and isinstance(own[k], torch.Tensor)
        and tuple(own[k].shape) != shapes[k]
    ]
    if missing or unexpected or mismatched or frozen:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("shape mismatch", mismatched),
                            ("trained but frozen in the model", frozen)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        hint = ""
        if any(".lora_A." in k or ".lora_B." in k for k in unexpected):
            hint = ("; it looks like PEFT adapter weights saved alone (their keys lack the "
                    "adapter's name): give the folder PeftModel.save_pretrained writes (with "
                    "its adapter_config.json) instead, or the merged model")
        raise LandscapeError(
            f"{ckpt.path}: checkpoint does not match the model ({'; '.join(parts)}){hint}"
        )


def load_state_into(model: nn.Module, ckpt: Checkpoint) -> None:
    """``model.load_state_dict`` with a one-line error naming what does not match.

    Prefixes of wrappers (``module.`` of DDP, ``model.`` of a ``LightningModule``) are
    removed and tied weights saved once are restored.

    Args:
        model: the model.
        ckpt: the checkpoint.

    Raises:
        LandscapeError: keys missing, unexpected or of another shape
            (:func:`refuse_mismatch`), or names the model holds as one tensor with
            different values in the checkpoint.
    """
    refuse_mismatch(model, ckpt)
    own = model.state_dict()
    state = _strip_prefix(ckpt.state_dict, own)
    _refuse_untied(state, model, ckpt.path)
    model.load_state_dict(_restore_tied(state, model), strict=not ckpt.partial)


MAX_DATA_BATCHES = 1000
"""The most batches a data factory's iterator without a length is read for (an endless
one, such as ``itertools.cycle(loader)``, filled the memory)."""


def _numpy_as_tensors(data: Any) -> Any:
    """``data`` with its numpy arrays as tensors (``torch.from_numpy``).

    Inside plain tuples, lists and dicts (a factory returning scikit-learn's arrays);
    anything else (a loader, tensors) as it is. An array torch can share is not copied.
    """
    if isinstance(data, np.ndarray):
        # torch takes neither negative strides (X[::-1]) nor read-only memory (np.load's
        # mmap_mode="r") without a note: those are copied
        keep = data.flags.c_contiguous and data.flags.writeable
        try:
            return torch.from_numpy(data if keep else np.array(data, order="C"))
        except TypeError:  # strings, objects (a DataFrame's .values), float128
            raise LandscapeError(f"data: the data factory returned a numpy array of dtype "
                                 f"{data.dtype}, which torch cannot hold: return numeric "
                                 "arrays (class indices for labels) or tensors") from None
    if type(data) in (tuple, list):
        return type(data)(_numpy_as_tensors(v) for v in data)
    if type(data) is dict:
        return {k: _numpy_as_tensors(v) for k, v in data.items()}
    return data


def as_batches(data: Any) -> list[Any]:
    """A data factory's result as a list of batches (one ``(x, y)`` batch or an iterable).

    One batch is told from several as the curvature operators tell it
    (:func:`~landscape.curvature._batches.is_single_batch`): ``(inputs, targets)`` with
    inputs a tensor, a mapping or a tuple of tensors (a model of several inputs), or a dict.
    An iterator without a length (a generator) is read for at most
    :data:`MAX_DATA_BATCHES` batches, with a warning when it holds more; a list or a
    ``DataLoader`` whole.
    """
    from landscape.curvature._batches import is_single_batch

    data = _numpy_as_tensors(data)
    if is_single_batch(data, closure_mode=False):
        return [tuple(data)]
    if isinstance(data, dict):
        return [data]
    if isinstance(data, nn.Module):
        raise LandscapeError(f"the data factory returned a {type(data).__name__}, a "
                             "torch.nn.Module (does --data name the model factory?)")
    if isinstance(data, (str, bytes, os.PathLike)):  # iterable, but of characters
        raise LandscapeError(
            f"data: the data factory returned a {type(data).__name__} ({str(data)[:40]!r}), "
            "not batches: return a batch (inputs, targets) or an iterable of them (a "
            "DataLoader); to read a token file, use --tokens")
    if isinstance(data, (tuple, list)) and data and all(
            isinstance(t, torch.Tensor) for t in data):
        raise LandscapeError(
            f"data: the data factory returned {len(data)} tensors; a batch is (inputs, "
            "targets): return those two (a third, such as sample weights, needs a loss of "
            "your own: --loss module:fn taking (model, batch))")
    if isinstance(data, Iterable):
        if hasattr(data, "__len__"):  # a list, a DataLoader: finite, read whole
            return list(data)
        batches = list(itertools.islice(iter(data), MAX_DATA_BATCHES + 1))
        if len(batches) > MAX_DATA_BATCHES:
            warnings.warn(f"data: the data factory's iterator yields more than "
                          f"{MAX_DATA_BATCHES} batches (an endless one?); the first "
                          f"{MAX_DATA_BATCHES} are used", UserWarning, stacklevel=2)
            del batches[MAX_DATA_BATCHES:]
        return batches
    raise LandscapeError(f"data: expected a batch (inputs, targets) or batches, got {type(data)}")


def prepare(
    model: nn.Module | Callable[[], nn.Module], data: Any, device: torch.device | str | None
) -> tuple[nn.Module, list[Any]]:
    """The model and the data, ready to evaluate.

    Returns the model (called first when it is a factory), moved to ``device`` when given,
    and the data as a non-empty list of batches on the model's device.
    """
    if isinstance(model, nn.Module):
        net = model
    elif callable(model) and not isinstance(model, (tuple, list, dict)):
        net = model()
    else:
        net = model
    if not isinstance(net, nn.Module):
        raise LandscapeError(
            f"the model factory returned a {type(net).__name__}, not a torch.nn.Module "
            "(does --model name the data factory?)"
        )
    if device is not None and str(device).partition(":")[0] == "meta":
        raise LandscapeError("device 'meta': tensors there hold no values to evaluate; "
                             "choose cpu or an accelerator")
    if any(p.is_meta for p in net.parameters()):
        raise LandscapeError(
            "the model factory built its parameters on the meta device (torch.device('meta'))"
            ", which hold no values to load a checkpoint into; build the model on the CPU in "
            "the factory")
    if device is not None:
        try:
            net = net.to(device)
        except (RuntimeError, AssertionError, ValueError) as err:  # no such device here
            first = first_line(err)
            raise LandscapeError(f"device {str(device)!r}: cannot move the model there ({first})") \
                from None
    target = next((p.device for p in net.parameters()), torch.device("cpu"))
    batches = [to_device(b, target) for b in as_batches(data)]
    if not batches:
        raise LandscapeError("the data factory produced no batches")
    empty = [i for i, b in enumerate(batches) if leading_size(b) == 0]
    if empty:  # its loss is a mean over nothing: NaN, which read as a diverged model
        raise LandscapeError(f"the data factory produced an empty batch (0 samples; batch "
                             f"{empty[0]} of {len(batches)})")
    _materialize_lazy(net, batches[0])
    return net, batches


def _materialize_lazy(net: nn.Module, batch: Any) -> None:
    """Give lazy modules (``nn.LazyLinear``, ...) their shapes: one forward on ``batch``.

    As a training script does before it trains; the values they draw are replaced by the
    checkpoint's. Without it every count of the parameters failed ("Attempted to use an
    uninitialized parameter").
    """
    from landscape.params import has_lazy_parameters

    if not has_lazy_parameters(net):
        return
    from landscape.batches import model_call
    from landscape.isolation import isolated
    from landscape.metrics.batch_parts import split_batch

    try:
        inputs = split_batch(batch)[0] if not isinstance(batch, Mapping) else batch
        args, kwargs = model_call(net, inputs)
        with isolated(net), torch.no_grad():
            net(*args, **kwargs)
    except Exception as err:
        first = first_line(err)
        raise LandscapeError(f"the model has lazy modules, and a forward pass on the first "
                             f"batch to give them their shapes failed: {first}") from None
