"""Representation metrics from one shared forward capture.

Spectral alignment of linear layers, neural collapse and VCI, effective rank and uniformity
of the penultimate features; definitions in docs/metrics.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from landscape import distributed as _dist
from landscape import functional as LF
from landscape._deprecation import module_getattr
from landscape._errors import MissingInput, NotApplicable
from landscape._hf import is_causal_lm
from landscape.capture import (
    last_linear,
    layer_bias,
    layer_weight,
    linear_layers,
    resolve_module,
)
from landscape.metrics.base import Metric, register
from landscape.metrics.batch_parts import batch_targets, ignored_past_classes
from landscape.metrics.context import StepContext
from landscape.schedules import every

__all__ = ["Collapse", "Representation", "SpectralAlignment"]


def _tokens(x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    """(N, ..., d) -> (N * ..., d): every position is a sample (tokens, pixels).

    A convolution's input is channels-first, (N, C, *spatial): its channels are the
    features, so they are moved last before the positions are flattened.
    """
    if isinstance(module, nn.modules.conv._ConvNd) and x.dim() >= 3:
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1])


def _real_tokens(x: torch.Tensor, module: nn.Module | None, real: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_tokens` of ``x`` without its padding, and the mask that left it out.

    ``real`` marks the batch's real positions (its ``attention_mask``: ``(N, T)``, or one
    entry per position where a list probe's lengths differ); it applies to a layer input
    laid out ``(N, T, d)``, or ``(N * T, d)``, one row per position in the batch's order,
    and the mask returned is None wherever it did not apply (every row kept).

    Raises:
        MissingInput: every position is padding.
    """
    if real is None or isinstance(module, nn.modules.conv._ConvNd):
        return _tokens(x, module), None
    per_position = x.dim() == real.dim() + 1 and tuple(x.shape[:-1]) == tuple(real.shape)
    if not per_position and x.dim() == 2 and x.shape[0] == real.numel():
        real = real.reshape(-1)  # one row per position, flattened in the batch's order
    elif not per_position:
        return _tokens(x, module), None
    if bool(real.all()):
        return _tokens(x, module), None
    if not bool(real.any()):
        raise MissingInput("every position of the batch is padding (its attention_mask is 0 "
                           "throughout)")
    real = real.to(x.device)
    return x[real], real


def _conv_patches(module: nn.Module, x: torch.Tensor,
                  real: torch.Tensor | None = None) -> torch.Tensor:
    """The rows a convolution's flattened weight ``(out, C*k...)`` multiplies: its patches.

    Any other layer's rows are its input's positions, padding left out (``real``, the
    batch's attention mask: :func:`_real_tokens`).
    """
    if not isinstance(module, nn.modules.conv._ConvNd) or x.dim() < 3:
        return _real_tokens(x, module, real)[0]
    k = tuple(module.kernel_size)
    if module.groups == 1 and all(v == 1 for v in k) and all(v == 1 for v in module.stride):
        return _tokens(x, module)  # a 1x1 convolution: one token per position
    if (isinstance(module, nn.Conv2d) and module.groups == 1 and x.dim() == 4
            and module.padding_mode == "zeros"):
        padding = module.padding
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":  # torch's split: the odd zero goes after (right, bottom)
            h, w = (d * (size - 1) for d, size in zip(module.dilation, k))
            x = torch.nn.functional.pad(x, (w // 2, w - w // 2, h // 2, h - h // 2))
            padding = (0, 0)
        cols = torch.nn.functional.unfold(x, k, module.dilation, padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise MissingInput(f"spectral_alignment: cannot form the input patches of "
                       f"{type(module).__name__} (groups, a padding mode other than zeros, or "
                       "a dimension other than 2-D: not supported)")


def _default_linears(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` that is called as a module.

    ``nn.MultiheadAttention`` reads its ``out_proj`` weight inside
    ``F.multi_head_attention_forward``, so no hook would ever see that layer's input; PEFT's
    ``original_module`` of a ``modules_to_save`` head is never called.
    """
    skip = {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}
    # PEFT keeps a frozen copy of each modules_to_save module beside the trained one, and
    # never calls it: its layers would have no input at any step
    unused = tuple(f"{n}.original_module" for n, m in model.named_modules()
                   if isinstance(getattr(m, "modules_to_save", None), nn.ModuleDict)
                   and isinstance(getattr(m, "original_module", None), nn.Module))
    return [n for n in linear_layers(model) if n not in skip
            and not any(n == u or n.startswith(u + ".") for u in unused)]


@register
class SpectralAlignment(Metric):
    """Sign diversity of per-token cosines between linear layers' inputs and weights.

    The cosines are taken with the top right singular vector of each layer's weight
    (definition in docs/metrics.md, spectral alignment). One row holds, per monitored
    layer, the minority sign fraction (0 = sign collapse), the sign entropy and the mean
    |cos|. The Lanczos solver of v_1 is warm-started across steps. Formerly
    ``SpectralAlignmentMetric``.

    Args:
        layers: names of the monitored layers (default: every ``nn.Linear``).
        **kwargs: ``schedule`` and ``data`` (:class:`~landscape.metrics.Metric`).
    """

    dense_every = 2
    name = "spectral_alignment"
    default_schedule = every(10)

    def __init__(self, layers: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layers: list[str] = list(layers) if layers is not None else []
        self._chosen = not self.layers  # the default layers, chosen again for each model

    def setup(self, model: nn.Module) -> None:
        """Default to every linear layer; check each layer has a weight matrix."""
        if self._chosen:  # (a metric list reused for another model: that model's layers)
            self.layers = _default_linears(model)
        if not self.layers:
            raise NotApplicable("spectral_alignment: the model has no nn.Linear layer to "
                                "monitor; name the layers (layers=[...])")
        for name in self.layers:
            if not isinstance(getattr(resolve_module(model, name), "weight", None), torch.Tensor):
                raise ValueError(f"spectral_alignment: layer {name!r} has no weight matrix")
            # (a DoRA layer has one, not read: its column stays NaN)

    def fields(self) -> dict[str, tuple[int, ...]]:
        """``minority``, ``entropy`` and ``mean_abs_cos``, one value per layer."""
        n = len(self.layers)
        return {"minority": (n,), "entropy": (n,), "mean_abs_cos": (n,)}

    def config(self) -> dict[str, Any]:
        """``layers``."""
        return {"layers": self.layers}

    def captures(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The inputs of the monitored layers."""
        return tuple(self.layers), ()

    def compute(self, ctx: StepContext) -> dict[str, Any]:
        """The alignment statistics of each layer (NaN for a layer that was not called)."""
        cap = ctx.captured(self.data)
        rows = {k: torch.full((len(self.layers),), math.nan) for k in self.fields()}
        for i, name in enumerate(self.layers):
            # FSDP2 (DTensor shards): this one layer is gathered, on every rank alike
            module = resolve_module(ctx.model, name)
            applied = layer_weight(module)  # a LoRA layer's W0 + BA, a Conv1D's transpose
            if applied is None:  # (a DoRA layer: not read)
                continue
            weight = _dist.full_tensor(applied)  # (before the check below: collective)
            if name not in cap.inputs:
                continue
            key = ("alignment_v", name)
            res = LF.spectral_alignment(
                weight.reshape(weight.shape[0], -1),
                _conv_patches(module, cap.inputs[name], ctx.attention_mask(self.data, module)),
                init=ctx.state.get(key),
            )
            if bool(torch.isfinite(res.v).all()) and bool(res.v.any()):
                ctx.state[key] = res.v
            else:  # a zero (LoRA's B before its first step) or diverged layer: no warm
                ctx.state.pop(key, None)  # start for the next step, which starts cold
            rows["minority"][i] = float(res.minority_fraction)
            rows["entropy"][i] = float(res.sign_entropy)
            rows["mean_abs_cos"][i] = float(res.mean_abs_cos)
        return rows


class _PenultimateMetric(Metric):
    """Base for metrics on the input of the classifier layer (the last linear layer by default).

    Args:
        layer: the classifier layer's name (default: the last linear layer,
            :func:`~landscape.capture.last_linear`; a LoRA-wrapped head is the wrapper).
        **kwargs: ``schedule`` and ``data`` (:class:`~landscape.metrics.Metric`).
    """

    default_schedule = every(50)

    def __init__(self, layer: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layer = layer
        self._chosen = layer is None  # the default layer, not the user's

    def setup(self, model: nn.Module) -> None:
        """Default to the last linear layer; check the layer exists."""
        if self._chosen:  # (a metric list reused for another model: that model's layer)
            self.layer = last_linear(model)
        resolve_module(model, self.layer)

    def config(self) -> dict[str, Any]:
        """``layer``."""
        return {"layer": self.layer}

    def captures(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The input of the classifier layer."""
        return (str(self.layer),), ()

    def features(self, ctx: StepContext) -> torch.Tensor:
        """The penultimate features, one row per token or position, padding left out.

        Args:
            ctx: the step context.

        Returns:
            The ``(samples, features)`` matrix.

        Raises:
            MissingInput: the classifier layer was not called.
        """
        return self._features(ctx)[0]

    def _features(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`features`, and the ``(N, T)`` mask of the positions kept (None: all).

        Padding is a position whose ``attention_mask`` is 0 in a keyword batch
        (:meth:`~landscape.metrics.context.StepContext.attention_mask`).
        """
        cap = ctx.captured(self.data)
        if self.layer not in cap.inputs:
            chosen = (" (the last linear layer the model registers, taken for its classifier: "
                      f"name the classifier, {type(self).__name__}(layer=...))"
                      if self._chosen else "")
            raise MissingInput(
                f"layer {self.layer!r} was not called in the forward pass{chosen}")
        module = resolve_module(ctx.model, str(self.layer))
        return _real_tokens(cap.inputs[str(self.layer)], module,
                            ctx.attention_mask(self.data, module))


@register
class Collapse(_PenultimateMetric):
    """Neural collapse NC1–NC4 (Papyan et al. 2020) and the variability-collapse index.

    The index is Xu et al. (2023)'s; both are of the penultimate features, labelled by the
    batch's targets. For a causal language model (a transformers ``...ForCausalLM`` /
    ``...LMHeadModel``) the feature at position t is labelled by the token it predicts,
    t + 1, as in "Linguistic Collapse" (Wu and Papyan 2024, arXiv:2405.17767): the last
    position of each sequence and labels of -100 (padding) are left out.
    """

    name = "collapse"
    FIELDS = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_etf", "nc3", "nc4", "vci")
    default_schedule = every(100)

    def compute(self, ctx: StepContext) -> dict[str, float]:
        """NC1–NC4 and VCI of the penultimate features on ``self.data``."""
        if is_causal_lm(ctx.model):
            feats, labels = self._next_token(ctx)
        else:
            feats, real = self._features(ctx)
            labels = ctx.targets(self.data)
            if labels.is_floating_point():  # said before a shape check can blame the shape
                raise MissingInput(
                    f"collapse needs integer class labels; the {self.data}'s targets are "
                    f"{labels.dtype} (regression targets, soft labels or probabilities): "
                    "leave collapse out of the metrics, or give a probe of class indices")
            labels = labels.reshape(-1)
            if real is not None and labels.shape[0] == real.numel():  # one label a position
                labels = labels[real.reshape(-1).to(labels.device)]
            if labels.shape[0] == feats.shape[0]:
                keep = labels >= 0  # padding / ignore_index (-100), as the cross-entropy does
                feats, labels = feats[keep.to(feats.device)], labels[keep]
        if labels.shape[0] != feats.shape[0]:
            raise MissingInput(
                f"collapse: {labels.shape[0]} labels for {feats.shape[0]} rows of "
                f"penultimate features at layer {self.layer!r} (a sequence model whose "
                "classifier reads every position while the labels are one per sequence?): "
                "pass Collapse(layer=...) naming a layer fed one row per label")
        classifier: Any = resolve_module(ctx.model, str(self.layer))
        weight = layer_weight(classifier)  # a LoRA head's W0 + BA, a Conv1D's transpose
        if weight is None and isinstance(getattr(classifier, "weight", None), torch.Tensor):
            raise MissingInput(f"collapse: layer {self.layer!r} is a DoRA adapter, whose "
                               "weight is not read: NC3 and NC4 need the classifier's")
        n_out = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() >= 1 else None
        if n_out is not None and labels.numel() and int(labels.max()) >= n_out:
            # one index past the classes is an ignore_index (255 on unlabelled pixels),
            # left out as -100 is; several mean the layer is not the classifier
            past = ignored_past_classes(labels, n_out)
            if past is None:
                raise MissingInput(
                    f"collapse: layer {self.layer!r} has {n_out} outputs but the labels "
                    f"reach {int(labels.max())}, so it is not the classifier (a head "
                    "computed with F.linear, e.g. tied to the embedding?); in Python, pass "
                    "Collapse(layer=...) naming the layer whose input is the penultimate "
                    "representation; on the command line, leave collapse out (-m)")
            feats, labels = feats[(~past).to(feats.device)], labels[~past]
        if labels.numel() == 0:
            raise MissingInput(f"collapse: every label of the {self.data} is ignored (-100, "
                               "padding, or an index past the classes): it needs labelled "
                               "samples of at least two classes")
        if int(torch.unique(labels).numel()) < 2:
            # every index is undefined with one class (NaN): a probe drawn from one class
            # (a loader sorted by class) is a mistake worth a line, not a quiet NaN
            raise MissingInput(f"collapse needs at least two classes in the {self.data}; "
                               f"it holds class {int(labels[0])} alone")
        bias = None
        b = layer_bias(classifier)  # a LoRA head's with its adapters' (lora_bias=True)
        if _dist.is_sharded(weight):  # FSDP2: gather this layer
            bias = None if b is None else _dist.full_tensor(b)
            classifier = _dist.full_tensor(weight)
        elif isinstance(weight, torch.Tensor) and (weight.dim() == 2 or all(
                s == 1 for s in weight.shape[2:])):
            # the weight the layer applies; a 1x1 convolution (a segmentation head) is a
            # linear map of each pixel's features
            bias = b
            classifier = weight.reshape(weight.shape[0], -1)
        nc = LF.neural_collapse(feats, labels, classifier=classifier, bias=bias).as_dict()
        vci = LF.variability_collapse_index(feats, labels)
        source = {"nc2_equinorm": "nc2_equinorm_means", "nc2_equiangular": "nc2_equiangular_means",
                  "nc2_etf": "nc2_etf_means"}
        row = {k: float(nc.get(source.get(k, k), math.nan)) for k in self.FIELDS if k != "vci"}
        row["vci"] = float(vci.value)
        return row

    def _next_token(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of positions 0..T-2 and the tokens 1..T-1 they predict (no padding).

        Padding is a label of -100, or a position whose ``attention_mask`` is 0 on either
        side of the prediction (labels copied from ids that hold the pad token). A list
        probe's batches are shifted one by one: their lengths may differ.
        """
        self.features(ctx)  # the capture, and its error when the layer was not called
        raw = ctx.captured(self.data).inputs[str(self.layer)]
        labels = [batch_targets(b) for b in ctx.batches(self.data)]
        if not all(isinstance(t, torch.Tensor) for t in labels):
            raise MissingInput(f"collapse needs the tokens' labels; the {self.data} has none")
        if raw.dim() == 3:  # one length: the (samples, positions) of the labels exactly
            fits = len({t.shape[1:] for t in labels}) == 1 and all(t.dim() == 2 for t in labels) \
                and tuple(raw.shape[:2]) == (sum(t.shape[0] for t in labels), labels[0].shape[1])
        else:  # rows, one per position (lengths that differ, or a head fed N*T rows)
            fits = raw.dim() == 2 and all(t.dim() == 2 for t in labels) \
                and raw.shape[0] == sum(t.numel() for t in labels)
        if not fits:
            raise MissingInput("collapse: labels do not match the (batch, position) features")
        masks = ctx.attention_masks(self.data, resolve_module(ctx.model, str(self.layer)))
        rows = raw.reshape(-1, raw.shape[-1]).split([t.numel() for t in labels])
        feats, targets = [], []
        for i, (h, t) in enumerate(zip(rows, labels)):
            h = h.reshape(*t.shape, -1)
            nxt = t[:, 1:].to(h.device)
            keep = nxt != -100
            if masks is not None and masks[i].shape == t.shape:
                real = masks[i].to(h.device)
                keep &= real[:, :-1] & real[:, 1:]
            feats.append(h[:, :-1][keep])
            targets.append(nxt[keep])
        return torch.cat(feats), torch.cat(targets)


@register
class Representation(_PenultimateMetric):
    """Effective rank and uniformity of the penultimate features.

    Effective rank is RankMe (Garrido et al. 2023); uniformity is Wang and Isola's (2020).
    Features that are all zero (every unit of the layer dead, as after a learning-rate
    spike through ReLUs) record an effective rank of 0, the rank of the zero matrix: RankMe
    itself is undefined there (NaN from :func:`landscape.functional.effective_rank`), and a
    NaN row would leave the total collapse unseen by the ``rank_collapse`` rule
    (docs/metrics.md, "Effective rank").
    """

    name = "representation"
    FIELDS = ("effective_rank", "uniformity")

    def compute(self, ctx: StepContext) -> dict[str, float]:
        """Effective rank and uniformity of the penultimate features on ``self.data``."""
        feats = self.features(ctx)
        rank = LF.effective_rank(feats)
        return {
            "effective_rank": 0.0 if rank.reason == "zero_matrix" else float(rank.value),
            "uniformity": float(LF.uniformity(feats).value),
        }


__getattr__ = module_getattr(
    __name__, {"SpectralAlignmentMetric": "SpectralAlignment"}, globals()
)
