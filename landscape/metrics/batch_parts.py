"""Which part of a batch is what: inputs, targets, keyword arguments, padding, classes.

The monitor and its metrics take batches in every form a training loop has: an
``(inputs, targets)`` pair, a dict pair (``{"x", "y"}``, ``{"image", "label"}``, ...), a
tokenizer's keyword arguments with ``labels``, a list of micro-batches. These small
pure functions tell their parts apart (docs/monitor.md, "Batches"), and read a model's
outputs against the targets: where the classes are, whether the outputs are logits,
which labels are ignored. They hold no state; :mod:`landscape.metrics.context` builds the
per-step work on them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from landscape._errors import MissingInput
from landscape.batches import PAIR_KEYS, WHOLE_PAIR_KEYS, map_tensors, rebuilt, takes_whole_batch

__all__ = ["as_pair", "batch_targets", "classes_last", "each_batch", "ids_and_labels",
           "ignored_past_classes", "inputs_in", "is_batch_list", "keyword_batch",
           "mask_fits_positions", "soft_labels", "softmax_logits", "split_batch",
           "target_place", "whole_dict_call", "without_labels"]


def _pair_keys(batch: Mapping) -> tuple[str, str] | None:
    """The keys of a dict ``(inputs, targets)`` batch, or None (a keyword batch)."""
    for xk, yk in PAIR_KEYS:
        if xk in batch and yk in batch:
            return xk, yk
    keys = set(batch)
    return next(((xk, yk) for xk, yk in WHOLE_PAIR_KEYS if keys == {xk, yk}), None)


def target_place(batch: Any) -> Any:
    """Where a batch keeps its targets: an index, a key, or None (none told apart).

    The second item of an ``(inputs, targets)`` pair; the target key of a dict pair
    (``{"x", "y"}``, ``{"inputs", "targets"}``, ``{"image", "label"}`` alone, ...);
    ``labels`` / ``label`` of a dict of keyword arguments.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return 1
    if isinstance(batch, Mapping):
        keys = _pair_keys(batch)
        if keys is not None:
            return keys[1]
        return next((k for k in ("labels", "label") if k in batch), None)
    return None


def inputs_in(batch: Any, dtype: torch.dtype) -> tuple[Any, list[torch.dtype]]:
    """``batch`` with the floating-point tensors of its inputs in ``dtype``; targets as given.

    The inputs: the first item of a sequence (an ``(inputs, targets)`` pair's, and of a
    longer one, ``(x, y, w)``, whose parts cannot be told apart), everything but the
    targets of a mapping (:func:`target_place`).
    """
    cast: list[torch.dtype] = []

    def one(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.dtype != dtype:
            if t.dtype not in cast:
                cast.append(t.dtype)
            return t.to(dtype)
        return t

    if isinstance(batch, (tuple, list)):
        out = rebuilt(batch, [map_tensors(v, one) if i == 0 else v for i, v in enumerate(batch)])
    elif isinstance(batch, Mapping):
        place = target_place(batch)
        out = rebuilt(batch, {k: v if k == place else map_tensors(v, one)
                              for k, v in batch.items()})
    else:
        out = map_tensors(batch, one)
    return (out, cast) if cast else (batch, cast)


def each_batch(data: Any, cast: Callable[[Any], tuple[Any, list[torch.dtype]]]
               ) -> tuple[Any, list[torch.dtype]]:
    """``cast(batch)`` of one batch, or of each batch of a list of batches (:func:`inputs_in`).

    Returns:
        The data (itself when nothing was cast) and the dtypes cast, over its batches.
    """
    if not is_batch_list(data):
        return cast(data)
    parts = [cast(b) for b in data]
    dtypes = sorted({d for _, c in parts for d in c}, key=str)
    return (type(data)(b for b, _ in parts) if dtypes else data), dtypes


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch given as a 2-sequence or a dict with those keys.

    A longer sequence is refused: ``(x, y, w)`` (sample weights for a closure) and the
    surfaces' ``(x1, x2, y)`` (several inputs) cannot be told apart, and reading the one as
    the other gives wrong numbers without a word.

    Args:
        batch: ``(inputs, targets)``, or a mapping with the keys ``inputs``/``targets``,
            ``x``/``y``, ``image``/``label``, ``images``/``labels`` or
            ``input_ids``/``labels``.

    Returns:
        ``(inputs, targets)``.

    Raises:
        MissingInput: the batch has neither form.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):  # (a collator's BatchEncoding too)
        keys = _pair_keys(batch) or (("input_ids", "labels")
                                     if "input_ids" in batch and "labels" in batch else None)
        if keys is not None:
            return batch[keys[0]], batch[keys[1]]
    raise MissingInput(
        "this metric needs (inputs, targets) batches; got "
        f"{type(batch).__name__} (pass batch=(x, y) to step(), or probe=(x, y) to the "
        "monitor or callback)"
    )


def as_pair(batch: Any) -> Any:
    """A dict ``(inputs, targets)`` batch (:data:`PAIR_KEYS`) as a tuple; others unchanged."""
    return split_batch(batch) if isinstance(batch, Mapping) and not keyword_batch(batch) \
        else batch


def keyword_batch(batch: Any) -> bool:
    """Whether ``batch`` holds the model's keyword arguments (a tokenizer's output).

    A mapping that is not an ``(inputs, targets)`` pair (:data:`PAIR_KEYS`).
    """
    return isinstance(batch, Mapping) and _pair_keys(batch) is None


_OTHER_POSITIONS = ("decoder_", "encoder_", "cross_", "pixel_", "image", "input_values",
                    "input_features", "audio", "visual", "video")
"""Keys of a keyword batch whose tensors have positions of their own, not the text's."""


def mask_fits_positions(batch: Mapping[str, Any], shape: tuple[int, ...]) -> bool:
    """Whether the ``(N, T)`` ``attention_mask`` of a keyword ``batch`` describes its positions.

    Not when the batch holds inputs with positions of their own (:data:`_OTHER_POSITIONS`:
    pixels, audio, a decoder's ids, an encoder's states for cross-attention) or a tensor
    of three or more dimensions other than one row of features per position ``(N, T, d)``
    (embeddings given for the ids, a layout model's boxes). Ids, labels of any shape and
    ``position_ids`` of ``(1, T)`` are fine.
    """
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or key == "attention_mask":
            continue
        if key.startswith(_OTHER_POSITIONS) and value.shape[0] == shape[0]:
            return False  # (not a per-layer head mask, whose rows are layers)
        if value.dim() >= 3 and (value.dim() > 3 or tuple(value.shape[:2]) != shape):
            return False
    return True


def ids_and_labels(batch: Any) -> bool:
    """Whether a keyword batch is exactly ``{input_ids, labels}``.

    The one keyword batch with a positional reading, ``model(input_ids)``, for a forward
    that takes the ids positionally (nanoGPT's ``forward(idx, targets)``); with any other
    key (an attention mask) that reading would drop it silently.
    """
    return isinstance(batch, Mapping) and set(batch) == {"input_ids", "labels"}


def whole_dict_call(model: nn.Module, batch: Any) -> bool:
    """Whether a keyword batch is passed to ``model`` as the dict itself, ``model(batch)``.

    A ``forward(self, batch)`` (:func:`~landscape.batches.takes_whole_batch`), but not
    nanoGPT's ``forward(idx)`` given ``{input_ids, labels}``, which reads the ids
    (:func:`ids_and_labels`).
    """
    return keyword_batch(batch) and takes_whole_batch(model, batch) \
        and not ids_and_labels(batch)


def without_labels(model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """A keyword batch without ``labels``, for a logits-only forward.

    An encoder-decoder model (T5, BART, Marian, ...) that builds its ``decoder_input_ids``
    from ``labels`` gets them built here, as its own forward would, so that dropping the
    labels does not leave its decoder without inputs.
    """
    keywords = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch.get("labels")
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if (callable(prepare) and isinstance(labels, torch.Tensor)
            and keywords.get("decoder_input_ids") is None
            and keywords.get("decoder_inputs_embeds") is None):
        keywords["decoder_input_ids"] = prepare(labels=labels)
    return keywords


def batch_targets(batch: Any) -> Any:
    """The targets of a batch as :func:`split_batch` finds them, or a dict's ``labels``.

    Args:
        batch: a batch of any form.

    Returns:
        The targets, or None when the batch has none.
    """
    try:
        return split_batch(batch)[1]
    except MissingInput:
        return batch.get("labels") if isinstance(batch, Mapping) else None


def ignored_past_classes(labels: torch.Tensor, classes: int) -> torch.Tensor | None:
    """The mask of the labels that are one ``ignore_index`` past the classes; else None.

    Segmentation masks mark unlabelled pixels with one index past the classes (255 in
    VOC and Cityscapes), which the training loss ignores, as it ignores -100. Labels past
    the classes that take several values are no ignore index (a head too small for the
    labels): None, and the caller's own check says so.
    """
    if labels.is_floating_point() or labels.numel() == 0:
        return None
    past = labels >= classes
    if not bool(past.any()) or int(torch.unique(labels[past]).numel()) != 1:
        return None
    return past


def softmax_logits(outputs: torch.Tensor, targets: Any) -> bool:
    """Whether ``outputs`` ``(..., C)`` are the logits of a softmax over classes.

    The logit statistics and the secant Taylor ratio (docs/monitor.md, "Sentinels") read
    the outputs as softmax logits; this says no on evidence that they are something else
    (docs/conventions.md, "Which outputs are logits"):

    * fewer than two dimensions, or a last dimension of 1 (a regression head, one sigmoid
      logit): a softmax over one class is the constant 1;
    * floating-point targets that are not distributions over the ``C`` classes
      (regression, autoencoders, multi-label BCE); soft labels (mixup, distillation), of
      the outputs' shape with rows of non-negative entries summing to 1, are classes;
    * integer targets that are not one index per logit row (multi-hot labels, per-pixel
      targets of a channels-first map), except ``(B, T)`` targets of ``(B, 1, V)`` outputs:
      a nanoGPT-style model, called without targets, returns only the last position's
      logits, and those say yes.

    Class indices (padding such as -100 included) and a batch without targets say yes.

    Args:
        outputs: the model's output tensor.
        targets: the batch's targets (:func:`batch_targets`), or None.

    Returns:
        True for softmax logits.
    """
    if outputs.dim() < 2 or outputs.shape[-1] < 2:  # (B,): one logit per sample
        return False
    if not isinstance(targets, torch.Tensor):
        return True
    if targets.is_floating_point():
        return targets.shape == outputs.shape and soft_labels(targets)
    if targets.dtype == torch.bool or targets.is_complex():
        return False
    if targets.numel() * outputs.shape[-1] == outputs.numel():
        return True  # one class index per logit row
    # a nanoGPT-style forward without targets returns the last position's logits (B, 1, V)
    # of (B, T) targets; any other misalignment is not class logits of these targets
    # (multi-hot labels, per-pixel targets of a channels-first map at any resolution)
    return (outputs.dim() == 3 and targets.dim() == 2
            and outputs.shape[0] == targets.shape[0]
            and outputs.shape[1] == 1 < targets.shape[1])


def soft_labels(targets: torch.Tensor) -> bool:
    """Whether float ``targets`` are distributions over classes: rows >= 0 summing to 1.

    Soft labels (mixup, distillation, label smoothing) are; multi-hot labels (BCE) and
    regression targets are not. Each stored entry is off by up to half its dtype's epsilon
    (relative), so rows summing to 1 in bfloat16 miss 1 by up to ~eps / 2.
    """
    tol = max(1e-3, torch.finfo(targets.dtype).eps)
    t = targets.detach().double()
    return bool((t >= 0).all()) and bool(((t.sum(-1) - 1).abs() <= tol).all())


def classes_last(outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    """Channels-first class logits with their classes moved to the last dimension.

    ``(N, C, d1, ...)`` logits of ``(N, d1, ...)`` integer targets, ``F.cross_entropy``'s
    convention for per-position classes (a segmentation map), become ``(N, d1, ..., C)``,
    the layout the logit statistics read; any other outputs are returned as they are (also
    those whose classes are last already, as a sequence model's ``(B, T, V)`` of ``(B, T)``
    targets: with ``T == V`` both readings fit, and the last one is kept).

    Args:
        outputs: the model's output tensor.
        targets: the batch's targets, or None.

    Returns:
        ``outputs``, or a view of them with dimension 1 moved last.
    """
    if (isinstance(targets, torch.Tensor) and not targets.is_floating_point()
            and targets.dtype != torch.bool and not targets.is_complex()
            and outputs.dim() >= 3 and targets.dim() == outputs.dim() - 1
            and outputs.shape[1] > 1  # (B, 1, V): a nanoGPT-style last position, not classes
            and targets.shape != outputs.shape[:-1]
            and targets.shape[0] == outputs.shape[0]
            and targets.shape[1:] == outputs.shape[2:]):
        return outputs.movedim(1, -1)
    return outputs


def is_batch_list(value: Any) -> bool:
    """Whether ``value`` is a list of batches; a collated ``[inputs, targets]`` list is one batch.

    A list of bare tensors is one collated batch too, even when its tensors share a shape
    and dtype (a language model's ``[ids[:-1], ids[1:]]``, an autoencoder's ``[x_noisy,
    x]``): several bare-tensor batches cannot be told from it, and are given as one
    tensor (their concatenation: the operators weigh batches by their size anyway).

    Args:
        value: a batch or a list of batches.

    Returns:
        True for a non-empty list whose items are all batches (tuples, lists or mappings:
        a Hugging Face collator's ``BatchEncoding`` too).
    """
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(b, (tuple, list, Mapping)) for b in value))
