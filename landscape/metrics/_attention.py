"""Attention-logit capture: the largest pre-softmax attention logit of one forward pass.

Attention-logit growth is a precursor of training instability in Transformers: the logits
q·kᵀ/√d grow, the attention softmax saturates to one-hot and its entropy collapses
(Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion Parameters",
arXiv:2302.05442, §3.1.1; Wortsman et al. 2023, "Small-scale proxies for large-scale
Transformer training instabilities", arXiv:2309.14322, §3.1). :class:`AttentionLogits` reads
that maximum without any change to the model: it is a
:class:`torch.overrides.TorchFunctionMode`, installed only inside its ``with`` block, that
sees every call of

* :func:`torch.nn.functional.scaled_dot_product_attention` (PyTorch's attention modules, Hugging
  Face's ``sdpa`` path): the logits are recomputed as ``q @ kᵀ * scale`` (``scale`` defaults to
  1/√d, ``enable_gqa`` repeats the key heads), and the **mask is honoured**: a boolean
  ``attn_mask`` drops the positions where it is False, a float one is added, ``is_causal``
  drops the positions above the diagonal. The value is the largest entry of the matrix the
  softmax receives;
* :func:`torch.nn.functional.multi_head_attention_forward` (``nn.MultiheadAttention`` and the
  ``nn.Transformer*`` layers): the query and key projections are recomputed from its arguments
  (packed or separate weights, ``bias_k``, ``static_k``, ``add_zero_attn``) and ``attn_mask``
  and ``key_padding_mask`` honoured with that function's convention (True = masked out);
* a softmax over the last dimension of a tensor with three or more dimensions
  (``torch.softmax``, ``F.softmax``, ``Tensor.softmax``): the eager attention of many
  implementations (Hugging Face GPT-2's ``eager`` path) feeds its masked logits there. Its
  input is read as it is, so an additive mask is included and a -inf entry never wins.
  A 2-D softmax (a classifier's output distribution) is not read; a model that applies a
  softmax to a 3-D output of its own (e.g. ``(batch, time, vocab)`` probabilities) is read as
  if it were attention.

A NaN logit makes the maximum NaN and an overflowing one +inf: a diverged model does not read
as a healthy one. ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take their
native fast path (which bypasses both functions) only when no ``__torch_function__`` handler
is active, so under this mode they always run the Python path that is intercepted. A
function the mode intercepts runs with the mode popped (PyTorch's rule), which is why the
multi-head function is recomputed from its arguments rather than read inside.

The recomputed products run in float32 (float64 for float64 inputs) in chunks of query rows
of at most ``2**24`` logits, and stay on the device: :meth:`AttentionLogits.maximum` is a 0-d
tensor, read back with the caller's other statistics. Every torch call of the forward goes
through the mode's Python handler, which costs a few microseconds per call; callers use the
mode only on models where it found attention (:class:`~landscape.metrics.Sentinels` tries it
on its first call).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["AttentionLogits"]

_CHUNK = 1 << 24  # logits per recomputed product (64 MiB in float32)
_SDPA = F.scaled_dot_product_attention
_MHA = F.multi_head_attention_forward
_SOFTMAX = frozenset({torch.softmax, F.softmax, torch.Tensor.softmax})
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class AttentionLogits(TorchFunctionMode):
    """Record the largest pre-softmax attention logit of the attention ops run in the block.

    Use::

        with torch.no_grad(), AttentionLogits() as att:
            model(x)
        att.seen, att.maximum()  # whether attention ran; its largest logit (0-d tensor)

    The mode is removed when the block exits, also on an exception. What is read and why:
    the module docstring.

    Attributes:
        maxima: one 0-d tensor per attention op seen, in call order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.maxima: list[torch.Tensor] = []

    @property
    def seen(self) -> bool:
        """Whether an attention op ran inside the block."""
        return bool(self.maxima)

    def maximum(self) -> torch.Tensor | None:
        """The largest logit over the ops seen, as a 0-d float64 tensor (None: none seen)."""
        if not self.maxima:
            return None
        device = self.maxima[0].device
        return torch.stack([m.to(device=device, dtype=torch.float64) for m in self.maxima]).max()

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        """Run ``func``; for an attention op also record its largest logit."""
        kwargs = kwargs or {}
        result = func(*args, **kwargs)  # the op's own errors come first
        if func is _SDPA:
            found = _sdpa_max(*args, **kwargs)
        elif func is _MHA:
            found = _mha_max(args, kwargs)
        elif func in _SOFTMAX:
            found = _softmax_max(args, kwargs)
        else:
            return result
        if found is not None:
            self.maxima.append(found)
        return result


def _softmax_max(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The largest entry of a softmax input over its last dimension (3+ dims), else None."""
    x = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if not isinstance(x, torch.Tensor) or x.dim() < 3 or x.numel() == 0 or dim is None:
        return None
    if dim not in (-1, x.dim() - 1):
        return None
    return x.detach().amax()


def _sdpa_max(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor | None:
    """max(q @ kᵀ · scale + mask) of one ``scaled_dot_product_attention`` call.

    The arguments are those of :func:`torch.nn.functional.scaled_dot_product_attention`
    (Vaswani et al. 2017, "Attention is all you need", Eq. 1: softmax(QKᵀ/√d_k)V).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, masked_when=False, dtype=_compute_dtype(query))
    return _max_logit(query, key, scale=scale, mask=mask, causal=bool(is_causal))


def _mha_max(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """max(q @ kᵀ / √d_h + masks) of one ``multi_head_attention_forward`` call.

    Recomputes the per-head query and key projections of
    :func:`torch.nn.functional.multi_head_attention_forward` (Vaswani et al. 2017, §3.2.2)
    from its arguments; ``attn_mask`` and ``key_padding_mask`` follow its convention
    (boolean True = masked out, float = added).
    """
    a = _MHA_SIGNATURE.bind(*args, **kwargs)
    a.apply_defaults()
    p = a.arguments
    query, key = p["query"], p["key"]
    kpm, attn_mask = p["key_padding_mask"], p["attn_mask"]
    if query.dim() == 2:  # unbatched (L, E)
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        kpm = None if kpm is None else kpm.unsqueeze(0)
    length, batch, dim = query.shape
    heads = int(p["num_heads"])
    head_dim = dim // heads
    if p["use_separate_proj_weight"]:
        w_q, w_k = p["q_proj_weight"], p["k_proj_weight"]
    else:
        w_q, w_k, _ = p["in_proj_weight"].chunk(3)
    b_q = b_k = None
    if p["in_proj_bias"] is not None:
        b_q, b_k, _ = p["in_proj_bias"].chunk(3)
    q = F.linear(query, w_q, b_q)
    k = F.linear(key, w_k, b_k)
    dtype = _compute_dtype(q)
    masks = []
    if attn_mask is not None:
        m = _additive(attn_mask, masked_when=True, dtype=dtype)
        masks.append(m.unsqueeze(0) if m.dim() == 2 else m)  # (1 or N·H, L, S)
    if kpm is not None:
        m = _additive(kpm, masked_when=True, dtype=dtype)  # (N, S)
        masks.append(m.repeat_interleave(heads, dim=0).unsqueeze(1))  # (N·H, 1, S)
    extra = 0
    if p["bias_k"] is not None and p["static_k"] is None:
        k = torch.cat([k, p["bias_k"].repeat(1, batch, 1)])
        extra += 1
    q = q.reshape(length, batch * heads, head_dim).transpose(0, 1)
    if p["static_k"] is None:
        k = k.reshape(k.shape[0], batch * heads, head_dim).transpose(0, 1)
    else:
        k = p["static_k"]
    if p["add_zero_attn"]:
        k = torch.cat([k, k.new_zeros(k.shape[0], 1, k.shape[2])], dim=1)
        extra += 1
    mask = None
    for m in masks:
        m = F.pad(m, (0, extra)) if extra else m
        mask = m if mask is None else mask + m
    return _max_logit(q, k, scale=1.0 / math.sqrt(head_dim), mask=mask)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (half precision is recomputed wider)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _additive(mask: torch.Tensor, *, masked_when: bool, dtype: torch.dtype) -> torch.Tensor:
    """A mask as an additive float mask: -inf where a boolean mask equals ``masked_when``."""
    if mask.dtype == torch.bool:
        drop = mask if masked_when else ~mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            drop, -math.inf
        )
    return mask.detach().to(dtype)


def _max_logit(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor | None:
    """The largest entry of ``q @ kᵀ · scale + mask`` (causal: the lower triangle only).

    Computed in chunks of query rows so that no product holds more than ``_CHUNK`` logits.

    Args:
        q: queries ``(..., L, d)``.
        k: keys ``(..., S, d)``, batch dimensions broadcastable with ``q``'s.
        scale: the logit scale.
        mask: an additive mask broadcastable to ``(..., L, S)``.
        causal: drop the entries above the diagonal (top-left aligned, as SDPA's
            ``is_causal``).

    Returns:
        A 0-d tensor on ``q``'s device, NaN when a logit is NaN; None when there is none.
    """
    length, keys = q.shape[-2], k.shape[-2]
    if length == 0 or keys == 0:
        return None
    dtype = _compute_dtype(q)
    q, kt = q.detach().to(dtype), k.detach().to(dtype).transpose(-2, -1)
    rows = max(1, _CHUNK // (max(1, math.prod(q.shape[:-2])) * keys))
    best = []
    for i in range(0, length, rows):
        j = min(i + rows, length)
        s = torch.matmul(q if j - i == length else q[..., i:j, :], kt).mul_(scale)
        if mask is not None:
            rowwise = mask.dim() >= 2 and mask.shape[-2] != 1 and j - i != length
            s = s + (mask[..., i:j, :] if rowwise else mask)
        if causal:  # an additive -inf mask: a broadcast add is cheaper than masked_fill_
            s.add_(_causal(i, j, keys, s.dtype, s.device))
        best.append(s.amax())
    return best[0] if len(best) == 1 else torch.stack(best).amax()


@functools.lru_cache(maxsize=16)
def _causal(i: int, j: int, keys: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows ``i:j`` of the additive causal mask: -inf above the diagonal, 0 elsewhere."""
    above = torch.ones(j - i, keys, dtype=torch.bool, device=device).triu(i + 1)
    return torch.zeros(j - i, keys, dtype=dtype, device=device).masked_fill(above, -math.inf)
