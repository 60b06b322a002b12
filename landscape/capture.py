"""Scoped forward hooks that capture layer inputs and outputs during one forward pass.

The hooks exist only inside the ``with capture(...)`` block and are removed on exit, on
errors too, so a monitored model never carries a hook between diagnostics
(docs/conventions.md, "Never perturb training"). Captured tensors are detached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from landscape._errors import NotApplicable

__all__ = [
    "Captured",
    "capture",
    "first_tensor",
    "last_child_output",
    "last_linear",
    "layer_bias",
    "layer_weight",
    "linear_layers",
    "output_logits",
    "predictions_per_sample",
    "resolve_module",
]


class _Inputs(dict):
    """Captured layer inputs: a missing layer's ``KeyError`` names the fix."""

    kind = "inputs"

    def __missing__(self, name: str) -> torch.Tensor:
        raise KeyError(f"the {self.kind} of layer {name!r} were not captured: list the "
                       f"layer in the metric's captures() (captured: "
                       f"{', '.join(repr(k) for k in self) or 'none'})")


class _Outputs(_Inputs):
    """Captured layer outputs: a missing layer's ``KeyError`` names the fix."""

    kind = "outputs"


@dataclass
class Captured:
    """What one forward pass produced, per requested module name.

    ``inputs[name]`` is the first positional argument of the module (its first keyword
    argument when called without one), ``outputs[name]`` its output. A name not captured
    raises a ``KeyError`` that says to list it in the metric's ``captures()``.
    """

    inputs: dict[str, torch.Tensor] = field(default_factory=_Inputs)
    outputs: dict[str, torch.Tensor] = field(default_factory=_Outputs)


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (``""`` is the model itself); ValueError lists some.

    Any name the module is registered under resolves, an alias too (``self.fc =
    self.classifier``), although ``named_modules()`` lists each module once.
    """
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    try:
        return model.get_submodule(name)
    except AttributeError:
        some = ", ".join(n for n in list(modules)[1:12] if n)
        raise ValueError(
            f"layer {name!r} is not a submodule of the model (some are: {some})") from None


def _conv1d(module: Any) -> bool:
    """A transformers ``Conv1D`` (GPT-2's blocks): a linear layer storing ``(in, out)``."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) \
        and getattr(module, "nf", None) == weight.shape[-1]


def _lora(module: nn.Module) -> bool:
    """A PEFT LoRA layer around a linear one (``nn.Linear`` or ``Conv1D``: ``base_layer``)."""
    base = getattr(module, "base_layer", None)
    return (isinstance(base, nn.Linear) or _conv1d(base)) \
        and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def _applied_adapters(module: nn.Module) -> list[str]:
    """The adapters a PEFT LoRA layer adds to its base layer's map.

    None when they are merged into its weight or disabled; else its active ones.
    """
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return []
    return [a for a in getattr(module, "active_adapters", ()) if a in module.lora_A]


def linear_layers(model: nn.Module) -> list[str]:
    """Names of every linear layer, in registration order.

    Every ``nn.Linear``, except that a PEFT LoRA layer stands for its ``base_layer`` and the
    layers inside its adapters (``lora_A``, ``lora_B``) are left out: the layer the model
    calls is the wrapper, whose input is the base layer's and whose weight is
    :func:`layer_weight`'s (the adapters' inputs are a rank-r bottleneck). A LoRA layer
    around a transformers ``Conv1D`` is left out as a plain ``Conv1D`` is.
    """
    modules = dict(model.named_modules())
    wrappers = {n for n, m in modules.items() if _lora(m)}
    names = []
    for n, m in modules.items():
        if not isinstance(m, nn.Linear):
            continue
        parts = n.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                      if ".".join(parts[:i]) in wrappers), None)
        if owner is None:
            names.append(n)
        elif n == f"{owner}.base_layer":  # the wrapper stands for it
            names.append(owner)
    return names


def layer_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight matrix a linear layer applies, ``(out, in)``, detached; None if none.

    A PEFT LoRA layer applies ``W0 + Σ_a s_a B_a A_a`` over its active adapters (PEFT's
    ``get_delta_weight``; ``W0`` alone when merged or its adapters are disabled); a
    Hugging Face ``Conv1D`` (GPT-2's blocks) stores its weight ``(in, out)``, and so does
    PEFT's delta for a LoRA layer around one. Any other module: its ``weight``. None for a
    DoRA adapter (it rescales the columns by a learned magnitude) and for a quantized base
    (an integer ``W0``): not read.
    """
    if _lora(module):
        base = module.base_layer
        weight = base.weight.detach()
        if not weight.is_floating_point():
            return None
        active = _applied_adapters(module)
        if any(getattr(module, "use_dora", {}).get(a, False) for a in active):
            return None
        with torch.no_grad():
            for a in active:
                weight = weight + module.get_delta_weight(a).to(weight.dtype)
        return weight.t() if _conv1d(base) else weight
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    return weight.detach().t() if _conv1d(module) else weight.detach()


def layer_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias a linear layer adds, detached; None if none.

    A PEFT LoRA layer adds its base layer's and, with ``lora_bias=True``, each active
    adapter's ``s_a`` times its ``lora_B`` bias (none when merged or disabled).
    """
    lora = _lora(module)
    bias = getattr(module.base_layer if lora else module, "bias", None)
    bias = bias.detach() if isinstance(bias, torch.Tensor) else None
    if not lora:
        return bias
    with torch.no_grad():
        for a in _applied_adapters(module):
            extra = getattr(module.lora_B[a], "bias", None)
            if isinstance(extra, torch.Tensor):
                add = extra.detach() * module.scaling[a]
                bias = add if bias is None else bias + add.to(bias.dtype)
    return bias


def last_linear(model: nn.Module) -> str:
    """Name of the last linear layer in registration order: the classifier by convention.

    Its input is the penultimate representation used for neural collapse and effective
    rank (:func:`linear_layers`: a LoRA-wrapped head is the wrapper).
    """
    names = linear_layers(model)
    if not names:
        raise NotApplicable(
            "the model has no nn.Linear layer; name the classifier layer explicitly")
    return names[-1]


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor that stands for a module's input or output (and a model's logits).

    That is the value itself; its ``"logits"`` entry or ``.logits`` attribute when that is a
    tensor (Hugging Face ``ModelOutput``, dataclass outputs); else the first tensor of a
    mapping's values or of a sequence, searched depth first (a tuple output such as
    ``(logits, aux)`` or Hugging Face's ``return_dict=False`` tuple gives its first tensor,
    passing over scalars when a later tensor has dimensions: ``(loss, logits)`` gives the
    logits).
    Hooks of :func:`capture`, :meth:`~landscape.metrics.StepContext.logits` and
    :class:`~landscape.metrics.Sentinels` read model outputs through this one function.

    Args:
        value: a tensor, a mapping, a sequence or an object with a ``logits`` attribute.

    Returns:
        The tensor, or None when there is none.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        named = named_logits(value)
        return named if named is not None else first_tensor(tuple(value.values()))
    if isinstance(value, (tuple, list)):
        # a leading scalar is a loss: Hugging Face's return_dict=False outputs are
        # (loss, logits, ...) when given labels; stop at the first tensor with dimensions
        scalar = None
        for a in value:
            t = first_tensor(a)
            if t is not None and t.dim() > 0:
                return t
            scalar = t if scalar is None else scalar
        return scalar
    return named_logits(value)


def named_logits(value: Any) -> torch.Tensor | None:
    """The tensor an output names ``logits``: a mapping's entry or an attribute, else None.

    A Hugging Face ``ModelOutput`` (a mapping), a dict, a dataclass. Unlike
    :func:`first_tensor` no other tensor stands in for it: a tuple's first tensor may be
    features (``(features, logits)``).
    """
    logits = value.get("logits") if isinstance(value, Mapping) else getattr(value, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def predictions_per_sample(value: Any) -> bool:
    """Whether a model's output is a list of per-sample prediction dicts.

    A torchvision detection or segmentation model in eval mode returns one
    ``{"boxes", "labels", "scores", ...}`` per image: no logits, though
    :func:`first_tensor` would find the first image's boxes.
    """
    return isinstance(value, (tuple, list)) and bool(value) and all(
        isinstance(v, Mapping) for v in value)


def output_logits(value: Any) -> torch.Tensor | None:
    """The logits in a model's output: :func:`first_tensor`, None for per-sample predictions.

    The default reading of the monitor's ``output_fn`` (the model's own output, and
    :meth:`~landscape.metrics.StepContext.logits_of`): a list of per-sample prediction
    dicts (:func:`predictions_per_sample`) holds no logits.
    """
    return None if predictions_per_sample(value) else first_tensor(value)


@contextlib.contextmanager
def capture(
    model: nn.Module, *, inputs: Iterable[str] = (), outputs: Iterable[str] = (),
    output_fn: Callable[[Any], torch.Tensor | None] | None = None,
) -> Iterator[Captured]:
    """Capture module inputs and outputs during the forward passes run inside the block.

    A module called several times in one forward (weight sharing) keeps its last call.

    Args:
        model: the model whose submodules are hooked.
        inputs: names (as in ``named_modules``) of the modules whose input is kept.
        outputs: names of the modules whose output is kept.
        output_fn: reads the tensor kept for the model's own output (the name ``""``) from
            what its forward returned, e.g. ``lambda out: out[1]`` for a ``(features,
            logits)`` tuple; by default :func:`output_logits` (and for every other module
            :func:`first_tensor`).

    Yields:
        A :class:`Captured` that fills as forwards run; the hooks are removed on exit, also
        after an error.
    """
    found = Captured()
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def make_hook(name: str, want_input: bool, want_output: bool):
        read = (output_fn or output_logits) if name == "" else first_tensor

        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if want_input:  # (a layer called as layer(input=x): its keyword arguments)
                t = first_tensor(args) if args else first_tensor(kwargs)
                if t is not None:
                    found.inputs[name] = t.detach()
            if want_output:
                t = read(output)
                if isinstance(t, torch.Tensor):
                    found.outputs[name] = t.detach()

        return hook

    in_names, out_names = list(dict.fromkeys(inputs)), list(dict.fromkeys(outputs))
    try:
        for name in dict.fromkeys(in_names + out_names):
            module = resolve_module(model, name)
            handles.append(
                module.register_forward_hook(make_hook(name, name in in_names, name in out_names),
                                             with_kwargs=True)
            )
        yield found
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def last_child_output(
    model: nn.Module, output_fn: Callable[[Any], torch.Tensor | None] | None = None,
) -> Iterator[list[torch.Tensor]]:
    """Keep the output of the last direct child of ``model`` called with logits-like output.

    For a closure that calls a submodule instead of the model itself (a Lightning
    ``training_step`` doing ``self.net(x)``): the root module's own output, which the
    logits metrics read, is then never produced. The kept tensor is the first tensor of the
    last child call whose output has at least two dimensions (a loss or a metric module
    called after the network returns a scalar, and is passed over).

    Args:
        model: the model whose direct children are hooked.
        output_fn: reads the tensor from a child's output (the monitor's ``output_fn``: a
            ``self.net`` returning ``(features, logits)``); by default :func:`output_logits`.

    Yields:
        A list that holds the kept (detached) output once a child produced one; the hooks
        are removed on exit, also after an error.
    """
    kept: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if output_fn is None:
            t = output_logits(output)
        else:
            try:  # written for the network's output: a loss or metric child may not fit it
                t = output_fn(output)
            except Exception:
                return
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            kept[:] = [t.detach()]

    handles = [child.register_forward_hook(hook) for child in model.children()]
    try:
        yield kept
    finally:
        for h in handles:
            h.remove()
