"""Helpers that let a diagnostic look at a model without changing training.

A monitored run must give bitwise the same parameters as an unmonitored one (docs/conventions.md,
"Never perturb training"). The pieces here are shared by every
module that evaluates a model on the side:

* :func:`isolated` saves and restores the RNG state (CPU, and the CUDA devices the model
  is on or computed on: :func:`cuda_devices`),
  every module's ``training`` flag, each parameter's ``requires_grad`` and ``.grad``
  (the very tensor object, or ``None``), and can put the model in eval mode meanwhile;
  ``torch.compile``d code inside the model runs eagerly in the block
  (:func:`eager_compiled_code`).
* :func:`same_rng` (:func:`rng_rewind`) rewinds the RNG to one state, so two evaluations
  of a stochastic model (dropout in train mode) draw the same noise.
* :func:`sdpa_math` switches ``F.scaled_dot_product_attention`` to its math backend, the
  only one with double backward and forward-mode AD on every device.
* :func:`stateless_call` and :func:`stateless_closure` evaluate the model through
  :func:`torch.func.functional_call` with substituted parameters and *cloned* buffers, so
  BatchNorm running statistics and ``num_batches_tracked`` are never touched.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import random
import re
import sys
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from landscape.distributed import all_gather_objects, broadcast_tensors_, is_sharded, unwrap

__all__ = [
    "AUTOCAST_DEVICES", "EAGER_COMPILED", "ClosureModule", "autocast_off", "buffers_kept",
    "cuda_devices", "differentiable", "eager_compiled_code", "isolated",
    "loader_randomness_kept", "measuring", "no_grad_forward", "normalises_by_batch",
    "on_batch_statistics", "parameters_of", "rank_zero_buffers", "rng_rewind", "same_rng",
    "sdpa_math", "stateless_call", "stateless_closure", "torch_notes_hidden",
    "without_autocast",
]


EAGER_COMPILED = True
"""Whether measurements run ``torch.compile``d code eagerly (:func:`eager_compiled_code`).

Set it to ``False`` for a model whose compiled parts must stay compiled to fit in memory
(``torch.compile(flex_attention)`` materializes the whole score matrix eagerly); their
curvature products then fall back to the first-order product."""


def eager_compiled_code() -> contextlib.AbstractContextManager[Any]:
    """Run ``torch.compile``d functions eagerly in the block, leaving their compiled code alone.

    A diagnostic calls the model in contexts training never uses: under ``torch.no_grad()``,
    ``torch.func`` transforms, double backward. Dynamo guards on them, so a compiled
    function inside the model (``self.block = torch.compile(block)``) would be recompiled
    for each (seconds each, entries in its limited cache), and a recompilation under a
    functorch transform changed the later compiled *training* steps in the last bits (4e-9
    after one Taylor-radius JVP, seen with torch 2.13). Eagerly, the diagnostic's products
    are exact (the compiled code has no double backward) and training's compiled graphs are
    never touched. ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6); nothing to do when
    dynamo was never imported (nothing is compiled), on older torch, inside code dynamo is
    compiling (a compiled training step that calls the monitor), or with
    :data:`EAGER_COMPILED` off.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if (not EAGER_COMPILED or set_stance is None or "torch._dynamo" not in sys.modules
            or torch.compiler.is_compiling()):  # dynamo refuses to trace set_stance
        return contextlib.nullcontext()
    return set_stance("force_eager")


def _autocast_devices() -> tuple[str, ...]:
    named = getattr(torch._C, "_get_privateuse1_backend_name", lambda: "privateuse1")()
    return ("cpu", "cuda", "xpu", "mps", "hpu", "xla", named)


AUTOCAST_DEVICES = _autocast_devices()
"""The device types :func:`autocast_off` looks at when it is given none (with an
out-of-tree backend's own name, such as ``"npu"``); one autocast does not know is off."""


def _autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` here."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device type argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return device_type == "cuda" and bool(torch.is_autocast_enabled())
    except RuntimeError:  # a device type autocast does not know
        return False


@contextlib.contextmanager
def autocast_off(device_types: Iterable[str] = AUTOCAST_DEVICES) -> Iterator[None]:
    """``torch.autocast`` and its weight cache off inside the block.

    A training loop may call the monitor inside its own ``torch.autocast`` block. The
    diagnostics would then run in the autocast dtype (the products, and the solvers' own
    matrix products), and a forward pass would read the low-precision copies of the
    weights that autocast caches until its block ends: copies made before the optimizer
    step, so one step late. With autocast off they read the weights themselves, in the
    model's dtype, as they do when called outside the block (docs/curvature.md,
    "Precision"). Autocast is switched off (``enabled=False`` entered) for each of
    ``device_types`` it is on for; where it is off nothing is entered (leaving an
    outermost autocast block would clear its cache). The weight cache is off whatever the
    state, with the caller's cache kept for its own block: a model that opens its own
    autocast block in ``forward``, inside a loop's block (even a disabled one,
    ``enabled=use_amp``), would otherwise read the copies the training forward cached.
    """
    on = sorted({d for d in device_types if _autocast_enabled(d)})
    cached = torch.is_autocast_cache_enabled()
    if cached:
        torch.set_autocast_cache_enabled(False)
    try:
        with full_float32(), contextlib.ExitStack() as stack:
            for device_type in on:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            yield
    finally:
        if cached:
            torch.set_autocast_cache_enabled(True)


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """TF32 off inside the block, the caller's settings restored on exit.

    On Ampere and later GPUs cuDNN's convolutions use TF32 by default, and every float32
    matrix product does after ``torch.set_float32_matmul_precision("high")``: a 10-bit
    mantissa, about 1e-3 relative, the size of the solvers' default tolerance, so Lanczos
    would stall at it and the micro-batch check would compare noise. The measurements run
    in full float32 (docs/curvature.md, "Precision"); training keeps its settings.
    """
    try:
        matmul = torch.backends.cuda.matmul.allow_tf32
        conv = torch.backends.cudnn.allow_tf32
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:  # torch >= 2.9 after its per-backend settings were used
        with _ieee_float32():
            yield
        return
    # only what differs is set, and put back in the order a user sets it (the flags, then
    # the precision): torch >= 2.9 refuses to read them after other mixes of its two APIs
    if matmul:
        torch.backends.cuda.matmul.allow_tf32 = False
    if conv:
        torch.backends.cudnn.allow_tf32 = False
    try:  # the CUDA flag alone reads as "high": then the precision of every backend stays
        lowered = torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        lowered = precision != "highest"
    if lowered:
        torch.set_float32_matmul_precision("highest")
    # per-backend settings the old flags do not show (oneDNN's convolutions in bf16)
    lower = [(o, n, v) for o, n in _precision_settings() if (v := getattr(o, n)) in
             ("tf32", "bf16")]
    for owner, name, _ in lower:
        setattr(owner, name, "ieee")
    try:
        yield
    finally:
        for owner, name, value in reversed(lower):
            setattr(owner, name, value)
        if matmul:
            torch.backends.cuda.matmul.allow_tf32 = True
        if conv:
            torch.backends.cudnn.allow_tf32 = True
        try:  # torch < 2.9: the flag and the precision are one setting, "high" now
            back = lowered or torch.get_float32_matmul_precision() != precision
        except RuntimeError:
            back = True
        if back:
            torch.set_float32_matmul_precision(precision)


@functools.cache
def _precision_settings() -> tuple[tuple[Any, str], ...]:
    """The per-backend ``fp32_precision`` settings of torch >= 2.9 (those that exist).

    Looked up once: which settings torch has does not change, and every monitor step's
    measurements enter :func:`full_float32` (the lookup took half its time).
    """
    backends = torch.backends
    owners = [getattr(backends.cuda, "matmul", None),
              getattr(getattr(backends, "cudnn", None), "conv", None),
              getattr(getattr(backends, "cudnn", None), "rnn", None),
              getattr(getattr(backends, "mkldnn", None), "matmul", None),
              getattr(getattr(backends, "mkldnn", None), "conv", None),
              getattr(getattr(backends, "mkldnn", None), "rnn", None)]
    return tuple((o, "fp32_precision") for o in owners
                 if o is not None and hasattr(o, "fp32_precision"))


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    """IEEE float32 through torch's ``fp32_precision`` settings, each restored on exit.

    For a user of torch's per-backend settings (torch >= 2.9), whose older flags
    (``allow_tf32``, ``get_float32_matmul_precision``) then refuse to be read: setting the
    flags here made ``Monitor.start()`` raise. Every leaf setting that is not ``"ieee"`` (a
    user's ``"tf32"`` on CUDA, ``"bf16"`` in oneDNN on the CPU, or ``"none"``, which
    follows a parent that may say either) is set to ``"ieee"`` and put back on exit, in
    reverse order.
    """
    saved = [(owner, name, getattr(owner, name)) for owner, name in _precision_settings()]
    for owner, name, value in saved:
        if value != "ieee":
            setattr(owner, name, "ieee")
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            if getattr(owner, name) != value:
                setattr(owner, name, value)


def without_autocast(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run under :func:`autocast_off` (the solvers called inside a training loop)."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with autocast_off():
            return fn(*args, **kwargs)
    return run


def cuda_devices(tensors: Iterable[torch.Tensor | None]) -> list[int]:
    """The CUDA devices whose generators a measurement on ``tensors`` may draw from.

    Those holding one of ``tensors``, and the current device: weights offloaded to the
    CPU (FSDP2's ``CPUOffloadPolicy``, a ``device_map`` offload) are computed there, and
    their dropout masks drawn from its generator. Empty without walking the tensors when
    CUDA was never initialised in this process (then no tensor can be on a CUDA device,
    and none is computed on one).
    """
    if not torch.cuda.is_initialized():
        return []
    current = torch.cuda.current_device()
    devices = {current}
    for t in tensors:
        if t is not None and t.device.type == "cuda":
            devices.add(current if t.device.index is None else t.device.index)
    return sorted(devices)


def _cuda_devices(modules: list[nn.Module]) -> list[int]:
    """:func:`cuda_devices` of the parameters and buffers ``modules`` hold themselves."""
    return cuda_devices(t for m in modules
                        for t in (*m._parameters.values(), *m._buffers.values()))


def measuring() -> bool:
    """Whether a landscape measurement is running (an :func:`isolated` block is open).

    For your own hooks: the monitor's forward and backward passes run them too, with
    gradients for the curvature products and with BatchNorm in train mode for the
    preconditioned sharpness, so ``module.training`` alone cannot tell them from
    training. ``if landscape.isolation.measuring(): return`` can.
    """
    return bool(_OUTERMOST)


def modules_reached(fn: Any, depth: int = 4) -> list[nn.Module]:
    """The ``nn.Module`` objects a loss function or closure holds.

    A loss with state need not be an ``nn.Module`` itself: ``lambda out, y: crit(out, y)``,
    ``functools.partial(crit, ...)``, a bound method of a trainer object, a closure over a
    GAN's discriminator, a list of losses, a submodule of the model (``model.criterion``).
    This finds the modules such a callable reaches: itself, a bound method's object, a
    partial's function and arguments, a function's closure cells, defaults and the
    globals its code (and the code nested in it: a generator expression) names, the
    attributes of an object and the first :data:`_ITEMS` items of a built-in list, tuple
    or dict (a lazy mapping is not read), breadth first to ``depth`` levels. Functions of
    the libraries in :data:`_LIBRARIES` are not looked into (``F.cross_entropy`` holds no
    state of yours), and an object that raises when looked at is passed over.

    Args:
        fn: the loss function or closure (None: nothing).
        depth: how many levels of holders to look through.

    Returns:
        The modules found, each once (their submodules are not listed: :func:`buffers_kept`
        walks them).
    """
    found: dict[int, nn.Module] = {}
    seen: set[int] = {id(fn)}
    level: list[Any] = [fn]
    for _ in range(depth + 1):  # breadth first: each object at the shortest path to it
        below: list[Any] = []
        for obj in level:
            try:  # user objects: a dead weakref proxy, a property that raises
                if isinstance(obj, nn.Module):
                    found.setdefault(id(obj), obj)
                    continue
                held = list(_held(obj))
            except Exception:
                continue
            for item in held:
                try:
                    if item is None or id(item) in seen or isinstance(item, _LEAVES):
                        continue
                except Exception:  # isinstance on a dead proxy raises
                    continue
                seen.add(id(item))
                below.append(item)
        level = below
    return list(found.values())


def _held(obj: Any) -> Iterable[Any]:
    """What ``obj`` holds that may hold a module, for :func:`modules_reached`."""
    if isinstance(obj, functools.partial):
        return (obj.func, *obj.args, *obj.keywords.values())
    if inspect.ismethod(obj):
        return (obj.__self__, obj.__func__)
    if inspect.isfunction(obj):
        if (getattr(obj, "__module__", None) or "").split(".")[0] in _LIBRARIES:
            return ()
        cells = [c.cell_contents for c in obj.__closure__ or () if _cell_is_set(c)]
        named = [obj.__globals__[n] for n in _names_in(obj.__code__) if n in obj.__globals__]
        return (*cells, *(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values(), *named)
    if type(obj) in (list, tuple, set, frozenset):  # builtin containers only: a lazy
        return itertools.islice(obj, _ITEMS)          # mapping would load what it holds
    if type(obj) is dict:
        return itertools.islice(obj.values(), _ITEMS)
    if hasattr(obj, "__dict__"):  # an object: a trainer holding its discriminator
        return itertools.islice(vars(obj).values(), 4 * _ITEMS)
    return ()


def _names_in(code: types.CodeType) -> list[str]:
    """The global names ``code`` and the code objects nested in it use."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_names_in(const))
    return names


_ITEMS = 64
"""Items of a list, tuple or dict :func:`modules_reached` looks at (a list of losses, not a
dataset)."""

_LEAVES = (str, bytes, int, float, complex, bool, torch.Tensor, type, types.ModuleType,
           torch.Generator, torch.dtype, torch.device)
"""What holds no module: :func:`modules_reached` does not look into these."""

_LIBRARIES = frozenset({"torch", "numpy", "landscape", "transformers", "lightning",
                        "pytorch_lightning", "functools", "builtins"})
"""Top-level packages whose functions :func:`modules_reached` does not look into."""


def _cell_is_set(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Put every buffer of ``module`` back on exit: the same tensor, with its values.

    For a loss function with state (an ``nn.Module`` that updates a running centre in its
    forward, as DINO's does): the curvature metrics call it on the probe. A buffer
    replaced by assignment gets its object back; one written in place (also through
    ``.data``, which moves no version counter: values are compared) gets its values back.
    A TorchScript module's buffers (not a dict) get their values back.
    """
    held = [(m, name, b, b.detach().clone())
            for m in module.modules() for name, b in m.named_buffers(recurse=False)]
    try:
        yield
    finally:
        for m, name, b, values in held:
            if isinstance(m, torch.jit.ScriptModule):  # its buffers are attributes in C++
                if getattr(m, name) is not b:
                    setattr(m, name, b)
            elif m._buffers.get(name) is not b:
                m._buffers[name] = b
            # (a buffer made under inference_mode can only be written there)
            with torch.inference_mode() if b.is_inference() else torch.no_grad():
                if not torch.equal(b, values):
                    b.copy_(values)


@contextlib.contextmanager
def rank_zero_buffers(model: nn.Module) -> Iterator[None]:
    """Every rank measures with rank 0's buffers in the block; its own come back after.

    DDP broadcasts rank 0's buffers at the start of each forward (``broadcast_buffers``),
    so between a training forward and the next the ranks' BatchNorm running statistics
    differ; a measurement reduced over the ranks would mix the ranks' functions, none the
    one training goes on with (a top eigenvalue 4 % off). Every rank calls it together
    (a collective): the ranks first agree that they hold the same buffers (names, dtypes,
    shapes, devices: one object all-gather), else each keeps its own (a cache grown apart
    on each rank); then one broadcast per device and dtype
    (:func:`landscape.distributed.broadcast_tensors_`). :func:`buffers_kept` puts each
    rank's own values back. A buffer that overlaps itself (an expanded one) stays as it is.
    """
    named = [(n, b) for n, b in model.named_buffers() if not is_sharded(b)]
    signature = [(n, str(b.dtype), tuple(b.shape), str(b.device)) for n, b in named]
    agreed = all(s == signature for s in all_gather_objects(signature))
    shared = [b for _, b in named if not any(
        st == 0 and size > 1 for st, size in zip(b.stride(), b.shape))]
    if not agreed or not shared:
        yield
        return
    with buffers_kept(model):
        broadcast_tensors_(shared)
        yield


def _loader_generators(data: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a ``DataLoader`` and its samplers draw from."""
    holders = [data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None),
               getattr(getattr(data, "batch_sampler", None), "sampler", None)]
    found: dict[int, torch.Generator] = {}
    for holder in holders:
        g = getattr(holder, "generator", None)
        if isinstance(g, torch.Generator):
            found.setdefault(id(g), g)
    return list(found.values())


@contextlib.contextmanager
def loader_randomness_kept(data: Any) -> Iterator[None]:
    """Iterate a user's loader in the block without moving what training draws from.

    Each iterator a ``DataLoader`` makes draws a seed from the loader's ``generator`` (or
    torch's global one), and a shuffling ``RandomSampler`` draws its order from its own (or
    the global one): reading a validation loader for a measurement would change every
    later shuffle and dropout mask of training. Restored on exit: the global CPU generator
    and every generator the loader and its samplers hold (PyTorch's reproducibility recipe
    passes ``generator=g``).
    """
    generators = _loader_generators(data)
    states = [g.get_state() for g in generators]
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            for g, state in zip(generators, states):
                g.set_state(state)


def parameters_of(modules: list[nn.Module]) -> list[nn.Parameter]:
    """Every parameter of ``modules`` once (tied weights appear once), in module order.

    For the modules of ``model.modules()``: ``model.parameters()``, without a second walk
    of the module tree.
    """
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m._parameters.values():
            if p is not None:
                seen.setdefault(id(p), p)
    return list(seen.values())


_GENERATORS: weakref.WeakKeyDictionary[nn.Module, tuple[int, int, list[torch.Generator]]] = (
    weakref.WeakKeyDictionary())
"""Per model: its number of modules, how often they were walked, and the generators they
hold."""

_GENERATOR_WALKS = 3
"""Walks of a model's modules before its generators are taken as known: the monitor's
start, and its first steps, after training's first forward passes (a layer may make its
generator there, on the input's device)."""


def module_generators(model: nn.Module, modules: list[nn.Module]) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that ``modules`` hold as attributes.

    A noise layer may draw from a generator seeded per module. The modules are walked on
    the first :data:`_GENERATOR_WALKS` calls for ``model`` and whenever their number
    changes; a generator made later than that, or replaced by another, is not seen.
    """
    cached = _GENERATORS.get(model)
    if cached is None or cached[0] != len(modules) or cached[1] < _GENERATOR_WALKS:
        found: dict[int, torch.Generator] = {}
        for m in modules:
            for value in vars(m).values():
                # also a generator per device kept in a dict, list or tuple attribute
                inner = (value.values() if isinstance(value, dict)
                         else value if isinstance(value, (list, tuple)) else ())
                for g in (value, *inner):
                    if isinstance(g, torch.Generator):
                        found.setdefault(id(g), g)
        walks = 1 if cached is None or cached[0] != len(modules) else cached[1] + 1
        cached = _GENERATORS[model] = (len(modules), walks, list(found.values()))
    return cached[2]


def written_in_forward(modules: list[nn.Module]) -> list[torch.Tensor]:
    """The parameters that a forward pass of ``modules`` writes in place, in any mode.

    ``nn.Embedding`` and ``nn.EmbeddingBag`` with ``max_norm`` renormalise the rows they look
    up (``torch.embedding_renorm_``, without gradients, in eval mode too), so a measurement's
    forward on other inputs than training's would change the weights.
    """
    seen: dict[int, torch.Tensor] = {}
    for m in modules:
        # a parametrized weight is computed afresh at each read: the renormalisation writes
        # into that copy, never into the parameter
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None \
                and not parametrize.is_parametrized(m, "weight"):
            seen.setdefault(id(m.weight), m.weight)
    return list(seen.values())


def _set_training(modules: list[nn.Module], modes: list[bool]) -> None:
    """Set each module's ``training`` flag, skipping ``nn.Module.__setattr__``'s lookups.

    A TorchScript module keeps its flag in C++: only its own ``__setattr__`` reaches it (a
    plain attribute would shadow it in Python and stay behind, the scripted code running
    on in train mode).
    """
    for m, mode in zip(modules, modes):
        if m.training is not mode:
            if isinstance(m, torch.jit.ScriptModule):
                m.training = mode
            else:
                object.__setattr__(m, "training", mode)


def normalises_by_batch(module: nn.Module) -> bool:
    """Whether ``module`` normalises by the batch's statistics in train mode.

    BatchNorm and InstanceNorm (``torch.nn.modules.batchnorm._NormBase``), except
    ``SyncBatchNorm``, whose train mode all-reduces the statistics over the process group:
    a measurement on one rank's data must not start a collective the other ranks never join.
    """
    return (isinstance(module, nn.modules.batchnorm._NormBase)
            and not isinstance(module, nn.SyncBatchNorm))


_OUTERMOST: dict[int, tuple[list[nn.Module], list[bool]]] = {}
"""Per model (by ``id`` of the module inside any DDP or ``torch.compile`` wrapper,
:func:`landscape.distributed.unwrap`) inside an :func:`isolated` block: its modules and their
``training`` flags when the outermost block began, before any block changed them."""


def _modes_on_entry(key: int, modules: list[nn.Module], modes: list[bool]) -> list[bool]:
    """Each module's ``training`` flag before the outermost enclosing :func:`isolated` block.

    The monitor puts the model in eval mode around every metric; a curvature operator
    inside needs the modes the user trains in. ``key``: the model's :data:`_OUTERMOST` key.
    Modules not known there keep ``modes``.
    """
    outer = _OUTERMOST.get(key)
    if outer is None:
        return modes
    known = {id(m): mode for m, mode in zip(*outer)}
    return [known.get(id(m), mode) for m, mode in zip(modules, modes)]


def on_batch_statistics(model: nn.Module) -> list[nn.Module]:
    """The modules that ``isolated(model, batch_statistics=True)`` runs on batch statistics.

    Those that normalise by batch (:func:`normalises_by_batch`) and were in train mode
    before the outermost enclosing :func:`isolated` block (the monitor's), or now when
    there is none: a BatchNorm the user froze in eval mode keeps its running statistics.

    Args:
        model: the model (inside any DDP or ``torch.compile`` wrapper).
    """
    modules = list(model.modules())
    flags = _batch_statistics_flags(id(unwrap(model)), modules, [m.training for m in modules])
    return [m for m, on_batch in zip(modules, flags) if on_batch]


def _batch_statistics_flags(key: int, modules: list[nn.Module], modes: list[bool]) -> list[bool]:
    """Per module, whether ``batch_statistics=True`` runs it on batch statistics.

    It normalises by batch and was in train mode before the outermost enclosing block
    (:func:`_modes_on_entry`; ``modes``: the flags now).
    """
    trained = _modes_on_entry(key, modules, modes)
    return [normalises_by_batch(m) and was for m, was in zip(modules, trained)]


def overrides_train(module: nn.Module) -> bool:
    """Whether ``module``'s class overrides ``nn.Module.train`` (honoured in train mode)."""
    return type(module).train is not nn.Module.train


@contextlib.contextmanager
def isolated(
    model: nn.Module, *, eval_mode: bool = True, copy_grads: bool = False,
    batch_statistics: bool = False, modules: list[nn.Module] | None = None,
) -> Iterator[nn.Module]:
    """Run a block with the model's observable state saved and restored on exit.

    Restored on exit (also on exceptions): the CPU RNG state and that of every CUDA device
    holding a parameter or buffer, and Python's ``random`` state (not NumPy's global one);
    each submodule's ``training`` flag; each parameter's ``requires_grad`` and its
    ``.grad`` attribute (the same tensor object, or ``None``); and
    the values of weights that a forward pass writes in place (an ``nn.Embedding`` with
    ``max_norm``: a copy of its weight is kept for the outermost block).
    The model is put in ``eval()`` inside the block, or with ``eval_mode=False`` in
    ``train()`` (dropout active, BatchNorm on batch statistics), whatever mode it was in.

    Eval mode is entered by setting every ``training`` flag directly, never through a
    ``train()`` / ``eval()`` that a module overrides: an eval-mode measurement needs only
    the flags, and an override may change the weights (loralib's LoRA layers merge their
    low-rank update into the weight on ``eval()`` and subtract it again on ``train()``,
    which would leave the weights rounded differently, or merged twice). Train mode
    (``eval_mode=False``) goes through ``model.train()`` when a module overrides it, so an
    override that keeps BatchNorm frozen is honoured, and on exit each overriding module's
    ``train()`` is called again with its own original mode, from the root down (a parent's
    call reaches its children first, their own call then sets them back), before the flags
    are restored. ``torch.compile``d code inside the model runs eagerly in the block
    (:func:`eager_compiled_code`).

    With ``batch_statistics=True`` in eval mode, the layers that normalise by batch
    statistics in train mode (BatchNorm, InstanceNorm; :func:`normalises_by_batch`) and
    were in train mode are in train mode, everything else in eval mode: the function the
    optimizer descends, without dropout's noise. A BatchNorm the user froze in eval mode
    (fine-tuning) keeps its running statistics. "Were" means before the outermost
    enclosing block of this model (the monitor's, which puts it in eval mode around its
    metrics). Their running statistics are then written by a forward pass: run it on
    copies of the buffers (:func:`stateless_call`).

    ``.grad`` tensors are restored by reference. Code inside the block should not write
    into them in place (``torch.autograd.grad`` and ``torch.func`` never do); if it might
    (``loss.backward()`` accumulates in place), pass ``copy_grads=True`` to also restore
    their values, at the cost of one copy of the gradients.

    The monitor enters this block at every step, so it walks the module tree once and
    reuses that list for the modes, the parameters and the devices; ``modules`` passes a
    walk the caller made itself (``list(model.modules())``, taken just before), which the
    monitor shares with the sentinels' buffer guard.
    """
    if modules is None:
        modules = list(model.modules())
    modes = [m.training for m in modules]
    params = parameters_of(modules)
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    values = [None if g is None else g.detach().clone() for g in grads] if copy_grads else None
    # an override's own train(): only for train mode (frozen BatchNorm), and undone on exit
    overriders = [] if eval_mode else [
        (m, mode) for m, mode in zip(modules, modes) if overrides_train(m)
    ]
    key = id(unwrap(model))  # a wrapper's block covers the operators on its inner module
    outermost = key not in _OUTERMOST
    # weights that a forward pass writes in place (renormalised embedding rows): copied on
    # entry to the outermost block, written back on exit
    written = written_in_forward(modules) if outermost else []
    saved = [w.detach().clone() for w in written]
    eager = eager_compiled_code() if outermost else contextlib.nullcontext()
    # measured in the model's dtype, on the weights themselves, inside a caller's autocast
    autocast = autocast_off() if outermost else contextlib.nullcontext()
    notes = torch_notes_hidden() if outermost else contextlib.nullcontext()
    # Python's generator too (a layer-drop drawn with random.uniform before the model tests
    # self.training: older Hugging Face encoders); 10 us. NumPy's global one is not (60 us)
    python_rng = random.getstate() if outermost else None
    # and the generators that modules hold themselves (a noise layer seeded per module)
    own_rng = ([(g, g.get_state()) for g in module_generators(unwrap(model), modules)]
               if outermost else [])
    with torch.random.fork_rng(devices=_cuda_devices(modules)), eager, autocast, notes:
        try:
            if outermost:
                _OUTERMOST[key] = (modules, modes)
            if overriders:
                model.train(True)
            elif eval_mode and batch_statistics:
                _set_training(modules, _batch_statistics_flags(key, modules, modes))
            else:
                _set_training(modules, [not eval_mode] * len(modules))
            yield model
        finally:
            if outermost:
                del _OUTERMOST[key]
            if python_rng is not None:
                random.setstate(python_rng)
            for g, state in own_rng:
                g.set_state(state)
            if written:
                with torch.no_grad():
                    for w, value in zip(written, saved):
                        w.copy_(value)
            for m, mode in overriders:  # pre-order: the root first
                m.train(mode)
            _set_training(modules, modes)
            for i, (p, flag, g) in enumerate(zip(params, flags, grads)):
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
                if p.grad is not g:
                    p.grad = g
                if values is not None and g is not None:
                    with torch.no_grad():
                        g.copy_(values[i])


def rng_rewind(tensors: Iterable[torch.Tensor | None]) -> Callable[[], None]:
    """A function that rewinds the CPU and CUDA generators to their state now.

    The CUDA ones of ``tensors`` (:func:`cuda_devices`).
    """
    devices = cuda_devices(tensors)
    cpu = torch.get_rng_state()
    cuda = [torch.cuda.get_rng_state(d) for d in devices]

    def rewind() -> None:
        torch.set_rng_state(cpu)
        for d, s in zip(devices, cuda):
            torch.cuda.set_rng_state(s, d)

    return rewind


@contextlib.contextmanager
def same_rng(model: nn.Module) -> Iterator[Any]:
    """Yield a function that rewinds the CPU (and model's CUDA) RNG to the entry state."""
    yield rng_rewind([*model.parameters(), *model.buffers()])


@contextlib.contextmanager
def differentiable() -> Iterator[None]:
    """Gradients on, also inside the caller's ``torch.no_grad()`` or ``inference_mode()``.

    A logging or evaluation block may wrap a curvature measurement; without this its
    products would differentiate nothing (an exact product fails, a first-order one is 0).
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


TORCH_NOTES = (
    # torch.utils.checkpoint(use_reentrant=True) run without gradients (a no-grad forward)
    "None of the inputs have requires_grad",
    # vmap of an op without a batching rule (a weight_norm parametrization's backward)
    "There is a performance drop because we have not yet implemented the batching rule",
    # the first forward-mode JVP of a process loads torch's JVP decompositions, which
    # torch.jit.script's (18 DeprecationWarnings under pytest or -W always)
    "`torch.jit.script` is deprecated",
)
"""The starts of torch's warnings about how a measurement calls the model, which
:func:`torch_notes_hidden` leaves out: they concern no code of the user's."""


_NOTES_FILTER = ("ignore", re.compile("|".join(re.escape(n) for n in TORCH_NOTES)), Warning,
                 None, 0)


@contextlib.contextmanager
def torch_notes_hidden() -> Iterator[None]:
    """Ignore torch's :data:`TORCH_NOTES` raised inside the block; every other warning as set.

    A measurement calls the model in ways training does not: a reentrant activation
    checkpoint warns that no input needs gradients in a no-grad forward pass, and
    ``vmap`` of the batched products warns of a slow fallback. An ``"ignore"`` entry is put
    at the front of ``warnings.filters`` for the block and taken out after, by identity
    (blocks may end in any order). Not through ``warnings.catch_warnings`` or
    ``filterwarnings``: they reset Python's once-per-location registry, so the training
    loop's own warnings would be shown again after every measurement. Unlike a hook on
    ``warnings.showwarning``, ``"ignore"`` wins over an ``"error"`` filter (``pytest -W
    error``) and leaves no mark in the registry, so the user's own forward still shows the
    note. While the block runs, other threads' notes are ignored too.
    """
    with _filter_in_front(_NOTES_FILTER):
        yield


@contextlib.contextmanager
def warnings_ignored() -> Iterator[None]:
    """Ignore every warning raised inside the block, as :func:`torch_notes_hidden` does.

    For a computation of the monitor's whose warnings are not the user's to see (a loss
    function called per sample to tell a few outliers): ``catch_warnings`` with
    ``simplefilter("ignore")`` reset Python's once-per-location registry, and the training
    loop's own warning was shown again at every step the loss metric read its samples.
    """
    with _filter_in_front(("ignore", None, Warning, None, 0)):
        yield


@contextlib.contextmanager
def _filter_in_front(template: tuple[Any, ...]) -> Iterator[None]:
    """``template``, a filter entry, first in the warning filters inside the block.

    Taken out by identity after (blocks may end in any order), and without telling the
    warnings module its filters changed: that resets the once-per-location registry.
    """
    entry = (*template,)  # a tuple of its own: the one this block takes out
    with _filters_lock():
        filters = _active_filters()
        filters.insert(0, entry)
    try:
        yield
    finally:
        with _filters_lock():
            # a user's catch_warnings inside the block swaps the list
            for held in (filters, _active_filters()):
                for i, f in enumerate(held):
                    if f is entry:
                        del held[i]
                        break


def _active_filters() -> list[Any]:
    """The warning filters in force here.

    ``warnings.filters``, or on Python 3.14 with context-aware warnings the list of the
    ``catch_warnings`` context that is active.
    """
    get = getattr(warnings, "_get_filters", None)
    return get() if callable(get) else warnings.filters


def _filters_lock() -> contextlib.AbstractContextManager[Any]:
    """The warnings module's own lock where it has one (Python 3.14), else nothing."""
    lock = getattr(warnings, "_lock", None)
    return lock if lock is not None and hasattr(lock, "__enter__") else contextlib.nullcontext()


@contextlib.contextmanager
def no_grad_forward() -> Iterator[None]:
    """``torch.no_grad()`` without the note of a reentrant checkpoint that no input needs grad.

    ``torch.utils.checkpoint`` (``use_reentrant=True``) warns "None of the inputs have
    requires_grad=True" whenever it runs without gradients; in a forward that is meant to
    run without them (a loss value, a logit difference) the note misleads
    (:func:`torch_notes_hidden`).
    """
    with torch.no_grad(), torch_notes_hidden():
        yield


@contextlib.contextmanager
def sdpa_math() -> Iterator[None]:
    """Force the math backend of ``F.scaled_dot_product_attention`` inside the block.

    Fused attention kernels (flash, memory-efficient, the CPU flash kernel) have no double
    backward and no forward-mode derivative; the math backend is plain differentiable ops.
    Uses ``torch.nn.attention.sdpa_kernel`` (torch >= 2.3) and falls back to
    ``torch.backends.cuda.sdp_kernel`` (torch 2.2), which also governs the CPU dispatch.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch 2.2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ctx = torch.backends.cuda.sdp_kernel(
                enable_flash=False, enable_math=True, enable_mem_efficient=False
            )
        with ctx:
            yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _cuda_recurrent(model: nn.Module) -> bool:
    """Whether ``model`` holds a recurrent layer (``nn.RNNBase``) with CUDA weights."""
    return any(isinstance(m, nn.RNNBase) and any(p.is_cuda for p in m.parameters(recurse=False))
               for m in model.modules())


@contextlib.contextmanager
def rnn_differentiable(model: nn.Module) -> Iterator[None]:
    """Turn cuDNN off inside the block when ``model`` has recurrent layers on a GPU.

    cuDNN's RNN kernels refuse a backward in eval mode ("cudnn RNN backward can only be
    called in training mode") and have no double backward: a measurement that
    differentiates an LSTM, GRU or RNN on a GPU (the curvature products, SAM, the Taylor
    radius) runs them on the native kernels instead. Other layers keep cuDNN only where
    the model has no recurrent layer on a GPU; on the CPU nothing changes.
    """
    if not _cuda_recurrent(model):
        yield
        return
    # the switch alone: cudnn.flags() would also set benchmark, determinism and TF32 to
    # its own defaults for the block (restored after, but not the user's inside it)
    cudnn = torch.backends.cudnn
    enabled = cudnn.enabled
    cudnn.enabled = False
    try:
        yield
    finally:
        cudnn.enabled = enabled


def substitution(model: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = ""
                 ) -> dict[str, torch.Tensor]:
    """``state`` (keyed by parameter and buffer names) as ``functional_call`` needs it.

    One key per module and attribute, each module once: a module registered under two
    names (``nn.ModuleList([block] * 3)``, a block beside its ``torch.compile`` wrapper)
    is swapped once, and a parameter two modules share (tied embeddings) is swapped in
    both, to the same tensor. Call it with ``tie_weights=False``. torch's own tying swaps a
    module reached by two names twice, saves the first substitute as the "original" and
    leaves it in the model after the call: the model's parameter replaced by a plain tensor.
    Names missing from ``state`` are left out (that slot keeps the model's tensor).
    """
    name_of = {id(t): n for n, t in model.named_buffers()}
    # a parameter another module registered as a buffer takes the parameter's substitute
    name_of.update({id(t): n for n, t in model.named_parameters()})
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        dot = path + "." if path else ""
        for slots in (module._parameters, module._buffers):
            for attr, t in slots.items():
                name = name_of.get(id(t)) if t is not None else None
                if name is not None and name in state:
                    out[prefix + dot + attr] = state[name]
    return out


def _state_for_call(
    model: nn.Module, params: Mapping[str, torch.Tensor], clone_buffers: bool, prefix: str = ""
) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    unknown = set(params) - set(named)
    if unknown:
        raise ValueError(f"params: not parameters of the model: {', '.join(sorted(unknown))}")
    state = {name: params[name] if name in params else p.detach() for name, p in named.items()}
    for name, b in model.named_buffers():
        state[name] = b.clone() if clone_buffers else b
    return substitution(model, state, prefix)


def stateless_call(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    args: Any = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    clone_buffers: bool = True,
) -> Any:
    """``model(*args, **kwargs)`` with parameters taken from ``params`` (by name).

    Parameters missing from ``params`` are used detached (constants); buffers are cloned
    first, so in-place updates (BatchNorm running statistics in train mode) land on the
    copies. Nothing of ``model`` is modified.
    """
    if not isinstance(args, tuple):
        args = (args,)
    state = _state_for_call(model, params, clone_buffers)
    return functional_call(model, state, args, dict(kwargs or {}), tie_weights=False)


class ClosureModule(nn.Module):
    """Wrap ``closure(model, batch)`` as a module.

    ``functional_call`` on this module then swaps every parameter of ``model`` while the
    closure runs (attribute access included).
    """

    def __init__(self, model: nn.Module, closure: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.inner = model
        self._closure = closure

    def forward(self, batch: Any) -> Any:
        """Return ``closure(model, batch)``."""
        return self._closure(self.inner, batch)


def stateless_closure(
    model: nn.Module,
    closure: Callable[[nn.Module, Any], Any],
    params: Mapping[str, torch.Tensor],
    batch: Any,
    *,
    clone_buffers: bool = True,
) -> Any:
    """``closure(model, batch)`` evaluated with ``model``'s parameters replaced by ``params``.

    The closure receives the real ``model`` object; for the duration of the call its
    parameters are the given tensors (others detached) and its buffers are clones
    (see :func:`stateless_call`).
    """
    wrapper = ClosureModule(model, closure)
    state = _state_for_call(model, params, clone_buffers, prefix="inner.")
    return functional_call(wrapper, state, (batch,), tie_weights=False)
