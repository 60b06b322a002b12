"""Recognise Hugging Face transformers models without importing transformers."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from landscape import distributed as _dist
from landscape._errors import LandscapeError

__all__ = ["counts_next_tokens", "is_causal_lm", "is_pretrained_model", "model_loss",
           "next_token_targets", "output_loss", "peft_base", "task_classes",
           "uses_causal_lm_loss"]


def output_loss(output: Any) -> torch.Tensor | None:
    """The loss in a model's output, read as the Hugging Face ``Trainer`` reads it; or None.

    A ``ModelOutput`` or a dict: its ``loss``. A ``return_dict=False`` tuple: its first
    item when that is a scalar tensor (a model given ``labels`` returns ``(loss, logits,
    ...)``; without them ``(logits, ...)``, which holds no loss).
    """
    if isinstance(output, Mapping):
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)):
        loss = output[0] if output and isinstance(output[0], torch.Tensor) \
            and output[0].dim() == 0 else None
    else:
        loss = getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def model_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The loss a model computes itself from a dict batch: ``model(**batch).loss``.

    Or the first item of a ``return_dict=False`` tuple (:func:`output_loss`).

    The default closure of the Hugging Face callback and of ``landscape analyze`` on dict
    batches. A Hugging Face causal language model given ``labels`` (the input ids) shifts
    them and returns the mean next-token cross-entropy
    (https://huggingface.co/docs/transformers/tasks/language_modeling). It carries
    ``loss_of_model_output = True``: the shared forward pass of the metrics then calls
    ``model(**batch)`` directly (the same outputs; a batch without labels works too).

    Args:
        model: the model.
        batch: keyword arguments of its forward, with ``labels``.

    Returns:
        The scalar loss.

    Raises:
        LandscapeError: the model returned no loss.
    """
    if not isinstance(batch, Mapping):  # model(**batch) would name the whole module tree
        raise LandscapeError(
            f"the model's own loss, model(**batch).loss, needs dict batches (with 'labels'); "
            f"got a {type(batch).__name__}: give the data as a dict, or a loss of your own "
            "(closure= or loss_fn= in Python, --loss module:fn on the command line)")
    loss = output_loss(model(**batch))
    if loss is None:
        raise LandscapeError(
            f"{type(model).__name__} returned no loss for the dict batch (keys "
            f"{', '.join(batch)}): include 'labels', or give a loss of your own (closure= "
            "or loss_fn= in Python, --loss module:fn taking (model, batch) on the command "
            "line)"
        )
    return loss


model_loss.loss_of_model_output = True  # type: ignore[attr-defined]


def is_pretrained_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (only if transformers is loaded).

    Args:
        model: any module.

    Returns:
        True for a Hugging Face model.
    """
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - a broken install
        return False
    return isinstance(model, PreTrainedModel)


def peft_base(model: nn.Module) -> nn.Module:
    """The transformers model a PEFT model wraps (``get_base_model()``), else ``model``.

    A ``PeftModelForCausalLM`` passes its batch to the model it wraps, whose loss it
    returns: that model's class says what the loss is.
    """
    if "peft" not in sys.modules:
        return model
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - a broken install
        return model
    return model.get_base_model() if isinstance(model, PeftModel) else model


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers causal language model (also under PEFT adapters).

    transformers is consulted only when the user's code has imported it already, so a
    plain PyTorch model never pulls it in.

    Args:
        model: any module.

    Returns:
        True for the classes transformers maps to causal language modelling.
    """
    return type(peft_base(model)).__name__ in task_classes("CAUSAL_LM")


def task_classes(*tasks: str) -> set[str]:
    """The class names transformers' ``MODEL_FOR_<task>_MAPPING_NAMES`` list for ``tasks``.

    ``task_classes("CAUSAL_LM", "SEQ_TO_SEQ_CAUSAL_LM")``, for instance. Empty when the
    user's code has not imported transformers (a plain PyTorch model never pulls it in) or
    this transformers has no such mapping.
    """
    if "transformers" not in sys.modules:
        return set()
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover - very old transformers
        return set()
    names: set[str] = set()
    for task in tasks:
        for value in getattr(modeling_auto, f"MODEL_FOR_{task}_MAPPING_NAMES", {}).values():
            names.update((value,) if isinstance(value, str) else value)
    return names


def uses_causal_lm_loss(model: nn.Module) -> bool:
    """Whether ``model``'s loss is transformers' shifted causal-LM mean over the labels.

    A causal LM class (:func:`is_causal_lm`) whose ``forward`` calls ``self.loss_function``
    (transformers' ``ForCausalLMLoss``: the labels shifted by one, their mean over those
    that are not ``-100``), and which nobody replaced on the instance. Some classes the
    causal-LM mapping names compute their own loss instead (XLNet and XLM average over
    unshifted labels; Bart-style decoders, Musicgen, Whisper's decoder): False for them.

    Args:
        model: any module.

    Returns:
        True when a batch's weight in its loss is ``(labels[..., 1:] != -100).sum()``.
    """
    model = peft_base(model)
    if not is_causal_lm(model) or "_loss_function" in vars(model):
        return False
    forward = inspect.unwrap(type(model).forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "loss_function" in code.co_names


def next_token_targets(batch: Any) -> int | None:
    """The labels a causal language model's loss averages over: those that follow a token.

    transformers' causal LM loss shifts the labels by one and takes the mean over the
    ones that are not ``-100`` (its ``ignore_index``), so a batch weighs
    ``(labels[..., 1:] != -100).sum()``. The default ``batch_size`` of the Hugging Face
    callback and of ``landscape analyze`` for a model whose loss is that
    (:func:`uses_causal_lm_loss`) under the default closure, in one process: padded
    batches and micro-batches of them then average exactly as one batch of all their
    tokens would (the operator checks it on the first batch). None (the sample count)
    without labels. Exported as ``landscape.integrations.huggingface.next_token_targets``.
    """
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels.dim() < 1:
        return None
    return int((labels[..., 1:] != -100).sum())


def counts_next_tokens(model: nn.Module, closure: Any, distributed: bool | None = None) -> bool:
    """Whether ``model``'s batches weigh by :func:`next_token_targets` in the curvature.

    Under the default closure (:func:`model_loss`), for a model whose loss is the shifted
    causal-LM mean (:func:`uses_causal_lm_loss`), in one process (``distributed``: the
    monitor's option of that name): across ranks, a rank whose batch held no target token
    would refuse its operator while the others wait for it in the curvature all-reduce.
    The Hugging Face callback and ``landscape analyze`` decide by it.
    """
    return (closure is model_loss and uses_causal_lm_loss(model)
            and not _dist.enabled(distributed))
