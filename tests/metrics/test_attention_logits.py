"""AttentionLogits: the largest pre-softmax attention logit, against hand computations.

The references are dot products written out in float64 loops (not the capture's matmul):
SDPA with and without masks, an eager softmax implementation, nn.MultiheadAttention with
its masks and bias options. Masks are built so that the unmasked maximum sits at a masked
position, so honouring the mask is what the test checks.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.metrics import _attention
from landscape.metrics._attention import AttentionLogits


def _hand_max(q, k, scale, keep=None, add=None):
    """max over (b, h, i, j) of scale * sum_d q[b,h,i,d] k[b,h,j,d] (+ add), keep[i, j] only."""
    q, k = q.double().tolist(), k.double().tolist()
    best = -math.inf
    for b in range(len(q)):
        for h in range(len(q[b])):
            for i, qi in enumerate(q[b][h]):
                for j, kj in enumerate(k[b][h]):
                    if keep is not None and not keep(b, h, i, j):
                        continue
                    z = scale * sum(x * y for x, y in zip(qi, kj))
                    best = max(best, z + (add(b, h, i, j) if add else 0.0))
    return best


def _qkv(b=2, h=3, lq=5, lk=5, d=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for n in (lq, lk, lk)]


def _plant_above_diagonal(q, k):
    """Make q[0,0,0]·k[0,0,4] the largest logit: a causal mask must hide it."""
    q[0, 0, 0] = 3.0
    k[0, 0, 4] = 3.0
    return q, k


def _no_mode_installed():
    return torch._C._len_torch_function_stack() == 0


def test_sdpa_default_scale_and_causal_mask():
    q, k, v = _qkv()
    q, k = _plant_above_diagonal(q, k)
    with AttentionLogits() as att:
        F.scaled_dot_product_attention(q, k, v)
    full = _hand_max(q, k, 0.5)
    assert att.maximum().item() == pytest.approx(full, rel=1e-12)
    with AttentionLogits() as att:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    causal = _hand_max(q, k, 0.5, keep=lambda b, h, i, j: j <= i)
    assert causal < full - 1  # the planted maximum is above the diagonal
    assert att.maximum().item() == pytest.approx(causal, rel=1e-12)
    assert att.maximum().dtype == torch.float64 and att.maximum().dim() == 0


def test_sdpa_explicit_scale_boolean_and_additive_masks_and_gqa():
    q, k, v = _qkv(lq=4, lk=6)
    q, k = _plant_above_diagonal(q, k)
    keep = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[0, 4] = False
    keep[:, 0] = True  # no row fully masked
    with AttentionLogits() as att:
        F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3)
    want = _hand_max(q, k, 0.3, keep=lambda b, h, i, j: bool(keep[i, j]))
    assert att.maximum().item() == pytest.approx(want, rel=1e-12)

    bias = torch.randn(2, 1, 4, 6, generator=torch.Generator().manual_seed(2), dtype=q.dtype)
    with AttentionLogits() as att:
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    want = _hand_max(q, k, 0.5, add=lambda b, h, i, j: float(bias[b, 0, i, j]))
    assert att.maximum().item() == pytest.approx(want, rel=1e-12)

    # grouped-query attention: 6 query heads share 3 key heads
    q6 = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(3), dtype=q.dtype)
    with AttentionLogits() as att:
        F.scaled_dot_product_attention(q6, k, v, enable_gqa=True)
    k6 = k.repeat_interleave(2, dim=1)
    assert att.maximum().item() == pytest.approx(_hand_max(q6, k6, 0.5), rel=1e-12)


class EagerAttention(nn.Module):
    """GPT-2's eager path: masked logits (finfo.min) into a softmax over the last dim."""

    def __init__(self, softmax):
        super().__init__()
        self.softmax = softmax

    def forward(self, q, k, v):
        w = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        t = q.shape[-2]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        w = torch.where(causal, w, torch.finfo(w.dtype).min)
        return self.softmax(w) @ v


@pytest.mark.parametrize(
    "softmax",
    [
        lambda w: F.softmax(w, dim=-1),
        lambda w: torch.softmax(w, -1),
        lambda w: w.softmax(dim=3),
        nn.Softmax(dim=-1),
    ],
    ids=["F.softmax", "torch.softmax", "Tensor.softmax", "nn.Softmax"],
)
def test_eager_softmax_path(softmax):
    q, k, v = _qkv()
    q, k = _plant_above_diagonal(q, k)
    with AttentionLogits() as att:
        EagerAttention(softmax)(q, k, v)
    want = _hand_max(q, k, 0.5, keep=lambda b, h, i, j: j <= i)
    assert len(att.maxima) == 1
    assert att.maximum().item() == pytest.approx(want, rel=1e-12)


def test_softmax_over_other_dims_or_of_a_classifier_is_not_read():
    x = torch.randn(4, 5, 6)
    with AttentionLogits() as att:
        x.softmax(dim=1)
        F.softmax(torch.randn(8, 3), dim=-1)  # a classifier's output distribution
        F.log_softmax(x, dim=-1)
    assert not att.seen and att.maximum() is None


def _mha_hand(mha, query, key, attn_keep=None, key_keep=None, extras=True):
    """max logit of a batch_first nn.MultiheadAttention from its weights."""
    e, h = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        w_q, w_k = mha.in_proj_weight[:e], mha.in_proj_weight[e : 2 * e]
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b_q = b_k = 0.0
    if mha.in_proj_bias is not None:
        b_q, b_k = mha.in_proj_bias[:e], mha.in_proj_bias[e : 2 * e]
    n, lq, lk = query.shape[0], query.shape[1], key.shape[1]
    q = (query @ w_q.T + b_q).reshape(n, lq, h, e // h).transpose(1, 2)
    k = (key @ w_k.T + b_k).reshape(n, lk, h, e // h).transpose(1, 2)
    extra = []
    if mha.bias_k is not None and extras:
        extra.append(mha.bias_k.reshape(1, 1, h, e // h).expand(n, 1, h, e // h).transpose(1, 2))
    if mha.add_zero_attn and extras:
        extra.append(torch.zeros(n, h, 1, e // h, dtype=k.dtype))
    k = torch.cat([k, *extra], dim=2)

    def keep(b, hh, i, j):
        if j >= lk:
            return True  # bias_k and the zero key are never masked
        ok = attn_keep is None or bool(attn_keep[i, j])
        return ok and (key_keep is None or bool(key_keep[b, j]))

    return _hand_max(q.detach(), k.detach(), 1 / math.sqrt(e // h), keep=keep)


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_with_masks(need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, bias=False, batch_first=True, dtype=torch.float64).eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    y = x.clone()
    x[:, 4] *= 0.01  # the last query is small and the last key large: the logits of
    y[:, 4] *= 4  # that key dominate, and the causal and padding masks hide them
    attn_keep = torch.ones(5, 5, dtype=torch.bool).tril()
    key_keep = torch.ones(3, 5, dtype=torch.bool)
    key_keep[:, 4] = False
    key_keep[1, 2:] = False
    cases = [
        ({}, None, None),
        ({"attn_mask": ~attn_keep}, attn_keep, None),
        ({"key_padding_mask": ~key_keep}, None, key_keep),
        ({"attn_mask": ~attn_keep, "key_padding_mask": ~key_keep}, attn_keep, key_keep),
    ]
    unmasked = _mha_hand(mha, x, y)
    for kwargs, ak, kk in cases:
        with torch.no_grad(), AttentionLogits() as att:
            mha(x, y, y, need_weights=need_weights, **kwargs)
        assert len(att.maxima) == 1
        want = _mha_hand(mha, x, y, ak, kk)
        assert att.maximum().item() == pytest.approx(want, rel=1e-10), kwargs
        if kwargs:  # the masks matter here: they hide the unmasked maximum
            assert want < unmasked - 0.1, kwargs


def test_multihead_attention_separate_weights_bias_k_zero_attn_unbatched():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(
        8, 4, kdim=6, vdim=5, add_bias_kv=True, add_zero_attn=True, batch_first=True,
        dtype=torch.float64,
    ).eval()
    with torch.no_grad():
        mha.bias_k.normal_(std=10.0)  # the bias key carries the largest logit
    q, k, v = (torch.randn(2, n, d, dtype=torch.float64) for n, d in ((4, 8), (7, 6), (7, 5)))
    with torch.no_grad(), AttentionLogits() as att:
        mha(q, k, v)
    want = _mha_hand(mha, q, k)
    assert want > _mha_hand(mha, q, k, extras=False) + 1
    assert att.maximum().item() == pytest.approx(want, rel=1e-10)
    with torch.no_grad(), AttentionLogits() as att:  # unbatched (L, E) inputs
        mha(q[0], k[0], v[0])
    assert att.maximum().item() == pytest.approx(_mha_hand(mha, q[:1], k[:1]), rel=1e-10)


def test_transformer_layer_fast_path_is_not_taken_under_the_mode():
    """nn.TransformerEncoderLayer in eval/no-grad would take the native fast path, which
    bypasses multi_head_attention_forward; under the mode it runs the Python path."""
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        ref = layer(x)
        with AttentionLogits() as att:
            out = layer(x)
    assert len(att.maxima) == 1 and torch.isfinite(att.maximum())
    want = _mha_hand(layer.self_attn, layer.norm1(x) if layer.norm_first else x, x)
    assert att.maximum().item() == pytest.approx(want, rel=1e-5)
    assert torch.allclose(out, ref, atol=1e-6)


def test_nan_and_overflow_are_not_hidden():
    q, k, v = _qkv()
    q[1, 2, 3, 0] = math.nan
    with AttentionLogits() as att:
        F.scaled_dot_product_attention(q, k, v)
    assert math.isnan(att.maximum().item())
    w = torch.zeros(2, 3, 4)
    w[0, 0, 1] = math.inf
    w[1, 1, :] = -math.inf  # a masked entry never wins
    with AttentionLogits() as att:
        w.softmax(-1)
    assert att.maximum().item() == math.inf


def test_chunked_product_gives_the_same_maximum(monkeypatch):
    q, k, v = _qkv(lq=9, lk=9)
    q, k = _plant_above_diagonal(q, k)
    bias = torch.randn(9, 9, generator=torch.Generator().manual_seed(5), dtype=q.dtype)
    results = []
    for chunk in (1 << 24, 2 * 3 * 9 * 2):  # everything at once; two query rows at a time
        monkeypatch.setattr(_attention, "_CHUNK", chunk)
        with AttentionLogits() as att:
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
            causal = att.maximum().item()
        with AttentionLogits() as att:
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            added = att.maximum().item()
        results.append((causal, added))
    assert results[0] == pytest.approx(results[1], rel=1e-12)
    assert results[0][0] == pytest.approx(_hand_max(q, k, 0.5, keep=lambda b, h, i, j: j <= i))
    assert results[0][1] == pytest.approx(
        _hand_max(q, k, 0.5, add=lambda b, h, i, j: float(bias[i, j]))
    )


def test_the_mode_is_removed_on_exit_and_on_errors():
    q, k, v = _qkv()
    with AttentionLogits() as att:
        assert not _no_mode_installed()
        F.scaled_dot_product_attention(q, k, v)
    assert _no_mode_installed()
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionLogits() as failing:
            F.scaled_dot_product_attention(q, k, v)
            raise RuntimeError("boom")
    assert _no_mode_installed()
    F.scaled_dot_product_attention(q, k, v)  # outside: not recorded
    assert len(att.maxima) == 1 and len(failing.maxima) == 1


def test_outputs_are_unchanged_by_the_mode():
    q, k, v = _qkv(dtype=torch.float32)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with AttentionLogits():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(out, ref)


def test_hugging_face_gpt2_eager_and_sdpa_paths_agree():
    """GPT-2's eager attention (masked logits into a softmax) and its SDPA path (a mask
    passed to SDPA) give the same largest logit, with and without padding."""
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(1))
    pad = torch.ones(3, 8, dtype=torch.long)
    pad[1, :3] = 0
    found = {}
    for impl in ("eager", "sdpa"):
        cfg = transformers.GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=2,
                                      n_head=2, attn_implementation=impl)
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg).eval()
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight.mul_(30.0)  # logits of order 10, not 0.02
        for name, kwargs in (("plain", {}), ("padded", {"attention_mask": pad})):
            with torch.no_grad(), AttentionLogits() as att:
                model(ids, **kwargs)
            assert len(att.maxima) == 2  # one op per layer
            found[impl, name] = att.maximum().item()
    assert found["eager", "plain"] > 1
    for name in ("plain", "padded"):
        assert found["eager", name] == pytest.approx(found["sdpa", name], rel=1e-5)
