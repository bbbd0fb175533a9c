"""Axial self-attention: the explicit bf16 path, chunking, and cached decoding."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from axial_transformer.model import attention
from axial_transformer.model.attention import (
    AxialSelfAttention,
    attend,
    decoding_positions,
    explicit_attention,
)


def qkv(t_q: int = 6, t_k: int = 6, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 2, t, 8, generator=g, dtype=dtype) for t in (t_q, t_k, t_k)]


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_attention_matches_sdpa(causal):
    q, k, v = qkv()
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert torch.allclose(explicit_attention(q, k, v, causal), expected, atol=1e-12)


def test_explicit_attention_in_bf16_is_close_to_fp32():
    q, k, v = qkv(dtype=torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = explicit_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), True)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=5e-2)


def test_chunked_sdpa_matches_one_call(monkeypatch):
    q, k, v = qkv()
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    monkeypatch.setattr(attention, "MAX_FOLDED_BATCH", 4)  # 2 heads: pieces of 2 of the 5
    assert torch.allclose(attend(q, k, v, True, "sdpa"), expected, atol=1e-12)


@pytest.mark.parametrize("axis", ["row", "column"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("path", ["matmul", "sdpa"])
def test_decoding_steps_equal_full_attention(axis, dtype, path):
    torch.manual_seed(0)
    attn = AxialSelfAttention(16, 2, axis, causal=True, path=path).to(dtype)
    x = torch.randn(2, 5, 5, 16, dtype=dtype)
    full = attn(x)
    cache = attn.new_cache(2 * 5, 5, x)
    steps = []
    for position in decoding_positions(5, x):
        t = int(position.index)
        step = x[:, :, t : t + 1] if axis == "row" else x[:, t : t + 1]
        steps.append(attn(step, cache, position))
    cached = torch.cat(steps, dim=2 if axis == "row" else 1)
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    assert torch.allclose(cached.double(), full.double(), atol=tol)


def test_is_causal_against_a_cache_would_be_wrong():
    # Why a cached step attends through its position mask: SDPA's is_causal aligns its mask to
    # the top-left, so one query against t keys would see only key 0.
    q, k, v = qkv(t_q=1, t_k=6)
    whole_cache = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(explicit_attention(q, k, v, causal=True), whole_cache, atol=1e-12)
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(top_left, whole_cache, atol=1e-3)


def test_a_decoding_step_takes_one_position():
    attn = AxialSelfAttention(16, 2, "row", causal=True)
    x = torch.randn(1, 1, 2, 16)
    cache = attn.new_cache(1, 2, x)
    with pytest.raises(ValueError, match="one new position"):
        attn(x, cache, decoding_positions(2, x)[0])


@pytest.mark.parametrize("path", ["matmul", "sdpa"])
def test_position_mask_hides_later_cache_entries(path):
    # A step at position t must not see what the cache holds after t (an earlier row's keys).
    torch.manual_seed(0)
    attn = AxialSelfAttention(16, 2, "row", causal=True, path=path).double()
    x = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    cache = attn.new_cache(1, 4, x)
    first = attn(x, cache, decoding_positions(4, x)[0])
    cache[:, :, :, 1:] = torch.randn(cache[:, :, :, 1:].shape, dtype=torch.float64)
    again = attn(x, cache, decoding_positions(4, x)[0])
    assert torch.equal(first, again)


def sdpa_reference(attn: AxialSelfAttention, x):
    """The layer written plainly: unscaled fused projection, fold, SDPA, unfold."""
    qkv = attn.to_qkv(x).unflatten(-1, (3, attn.heads, attn.head_dim))
    fold, unfold = {
        "row": ("b h w i n e -> i (b h) n w e", "(b h) n w e -> b h w (n e)"),
        "column": ("b h w i n e -> i (b w) n h e", "(b w) n h e -> b h w (n e)"),
    }[attn.axis]
    q, k, v = rearrange(qkv, fold)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=attn.causal)
    return attn.to_out(rearrange(out, unfold, b=x.shape[0]))


def matmul_path_matches_sdpa(axis: str, causal: bool, shape=(2, 5, 7)) -> bool:
    """Output and every gradient of the plain-matmul path against SDPA, in float64,
    non-square."""
    torch.manual_seed(0)
    attn = AxialSelfAttention(16, 2, axis, causal, path="matmul").double()
    x = torch.randn(*shape, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(*shape, 16, dtype=torch.float64)
    results = []
    for forward in (attn, lambda t: sdpa_reference(attn, t)):
        x.grad = None
        attn.zero_grad()
        out = forward(x)
        out.backward(grad)
        results.append([out, x.grad, *(p.grad for p in attn.parameters())])
    return all(torch.allclose(ours, reference, atol=1e-12)
               for ours, reference in zip(*results, strict=True))


@pytest.mark.parametrize("axis", ["row", "column"])
@pytest.mark.parametrize("causal", [False, True])
# Many tokens scale the queries through the weights, a few (fewer values than the weights) after
# the projection: both must give the same output and gradients.
@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 2, 3)], ids=["many-tokens", "few-tokens"])
def test_matmul_path_forward_and_backward_match_sdpa(axis, causal, shape):
    assert matmul_path_matches_sdpa(axis, causal, shape)


def test_matmul_path_check_catches_a_missing_mask(monkeypatch):
    # Negative control: the plain-matmul path without its causal mask.
    monkeypatch.setattr(attention, "causal_bias", lambda t_q, t_k, like: like.new_zeros(t_q, t_k))
    assert not matmul_path_matches_sdpa("row", True)


def test_matmul_path_in_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    attn = AxialSelfAttention(32, 4, "column", causal=True, path="matmul")
    x = torch.randn(2, 8, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), sdpa_reference(attn, x), atol=3e-2)
