"""Recognise Hugging Face transformers models without importing transformers."""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["is_causal_lm"]


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers causal language model.

    transformers is consulted only when the user's code has imported it already, so a
    plain PyTorch model never pulls it in.

    Args:
        model: any module.

    Returns:
        True for the classes transformers maps to causal language modelling.
    """
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - very old transformers
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
