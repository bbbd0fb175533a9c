"""Axial attention layers for CNN feature maps: naive references, causality, layouts, export."""

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from axial_transformer.layers import (
    AxialAttention,
    AxialAttentionBlock,
    AxialPositionalEmbedding,
    AxisAttention,
    ChannelAttention,
)

GOLDEN = Path(__file__).parent / "golden"
# (spatial shape, dim_index): 2-D and 3-D, channels first, channels last and in between
LAYOUTS = [((4, 5), 1), ((4, 5), -1), ((3, 4, 5), 1), ((3, 4, 5), -1), ((3, 4, 5), 2)]


def feature_map(shape: tuple[int, ...], dim: int, dim_index: int, seed: int = 0) -> torch.Tensor:
    """A float64 input [2, *shape] with `dim` features inserted at `dim_index`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *shape, dim, generator=g, dtype=torch.float64)  # channels last
    return x.movedim(-1, dim_index).contiguous()


def naive_axis_attention(m: AxisAttention, x: torch.Tensor) -> torch.Tensor:
    """m's attention written out: a Python loop over every line along m.axis of a channels-last
    [B, *S, D] tensor, each head a plain softmax(q k^T / sqrt(e)) v."""
    heads, dim = m.heads, x.shape[-1]
    e = dim // heads
    w_qkv = m.to_qkv.weight.view(heads, 3, e, dim)  # fused features are laid out (n i e)
    b_qkv = m.to_qkv.bias.view(heads, 3, e)
    line_axis = 1 + m.axis
    t = x.shape[line_axis]
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    out = torch.empty_like(x)
    others = [range(s) for a, s in enumerate(x.shape[:-1]) if a != line_axis]
    for index in itertools.product(*others):
        index = (*index[:line_axis], slice(None), *index[line_axis:])
        line = x[index]  # (t, D)
        per_head = []
        for n in range(heads):
            q, k, v = (line @ w_qkv[n, i].T + b_qkv[n, i] for i in range(3))
            scores = q @ k.T / math.sqrt(e)
            if m.causal:
                scores = scores.masked_fill(future, -math.inf)
            per_head.append(torch.softmax(scores, dim=-1) @ v)
        out[index] = torch.cat(per_head, dim=-1) @ m.to_out.weight.T + m.to_out.bias
    return out


def naive_axial_attention(m: AxialAttention, x: torch.Tensor) -> torch.Tensor:
    h = x.movedim(m.dim_index, -1)
    if m.sum_axes:
        out = sum(naive_axis_attention(a, h) for a in m.axes)
    else:
        out = h
        for a in m.axes:
            out = naive_axis_attention(a, out)
    return out.movedim(-1, m.dim_index)


@torch.no_grad()
@pytest.mark.parametrize("shape,dim_index", LAYOUTS)
def test_each_axis_matches_naive_reference(shape, dim_index):
    torch.manual_seed(0)
    m = AxialAttention(8, 2, len(shape), dim_index).double()
    x = feature_map(shape, 8, dim_index)
    h = x.movedim(dim_index, -1)
    for axis_attention in m.axes:
        torch.testing.assert_close(axis_attention(h), naive_axis_attention(axis_attention, h))
    torch.testing.assert_close(m(x), naive_axial_attention(m, x))


@torch.no_grad()
@pytest.mark.parametrize("shape,dim_index", LAYOUTS)
def test_axes_in_sequence_match_naive_reference(shape, dim_index):
    torch.manual_seed(1)
    m = AxialAttention(8, 2, len(shape), dim_index, sum_axes=False).double()
    x = feature_map(shape, 8, dim_index)
    torch.testing.assert_close(m(x), naive_axial_attention(m, x))


@torch.no_grad()
@pytest.mark.parametrize("shape,dim_index", LAYOUTS)
def test_causal_axes_match_naive_reference(shape, dim_index):
    torch.manual_seed(2)
    causal = tuple(a % 2 == 0 for a in range(len(shape)))  # mask the first (and third) axis
    m = AxialAttention(8, 2, len(shape), dim_index, causal=causal).double()
    assert [a.causal for a in m.axes] == list(causal)
    x = feature_map(shape, 8, dim_index)
    torch.testing.assert_close(m(x), naive_axial_attention(m, x))


@torch.no_grad()
def test_naive_reference_catches_a_wrong_axis_or_mask():
    """Negative control: the comparison above fails for attention along another axis, and for
    a mask the layer does not have."""
    torch.manual_seed(3)
    m = AxialAttention(8, 2, 2, dim_index=-1).double()
    x = feature_map((4, 5), 8, -1)
    row = m.axes[1]
    wrong_axis = AxisAttention(8, 2, axis=0).double()
    wrong_axis.load_state_dict(row.state_dict())
    assert not torch.allclose(row(x), naive_axis_attention(wrong_axis, x))
    row.causal = True
    assert not torch.allclose(row(x), naive_axis_attention(AxisAttention(8, 2, 1).double(), x))
    wrong_mask = AxisAttention(8, 2, axis=1, causal=False).double()
    wrong_mask.load_state_dict(row.state_dict())
    assert not torch.allclose(row(x), naive_axis_attention(wrong_mask, x))


@torch.no_grad()
def test_channels_first_and_last_agree():
    torch.manual_seed(4)
    first = AxialAttentionBlock(8, 2, 3, dim_index=1, channel_attention=True)
    last = AxialAttentionBlock(8, 2, 3, dim_index=-1, channel_attention=True)
    last.load_state_dict(first.state_dict())
    first.channel_attention.beta.fill_(0.5)
    last.channel_attention.beta.fill_(0.5)
    x = torch.randn(2, 8, 3, 4, 5)
    out = first(x)
    assert out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, last(x.movedim(1, -1)).movedim(-1, 1))


# ---------------------------------------------------------------------------------------------
# Causal masks per axis: later positions along a masked axis never reach earlier outputs.


def future_leaks(layer: nn.Module, x: torch.Tensor, axis: int, cut: int) -> bool:
    """Whether changing x at positions >= cut along `axis` changes any output before cut."""
    with torch.no_grad():
        before = layer(x)
        x = x.clone()
        x.narrow(axis, cut, x.shape[axis] - cut).normal_()
        after = layer(x)
    early = (slice(None),) * axis + (slice(0, cut),)
    return not torch.allclose(before[early], after[early], atol=1e-6, rtol=0)


CAUSAL_CASES = [
    # (shape of x, layer factory taking `causal`, the tensor axis of each spatial axis)
    ((2, 8, 5, 6), lambda c: AxialAttention(8, 2, 2, 1, causal=c), (2, 3)),
    ((2, 3, 4, 5, 8), lambda c: AxialAttention(8, 2, 3, -1, causal=c), (1, 2, 3)),
    ((2, 8, 5, 6), lambda c: AxialAttentionBlock(8, 2, 2, 1, causal=c), (2, 3)),
    ((2, 8, 5, 6), lambda c: AxialAttentionBlock(8, 2, 2, 1, causal=c, sum_axes=False), (2, 3)),
    ((2, 3, 4, 5, 8), lambda c: AxialAttentionBlock(8, 2, 3, -1, causal=c), (1, 2, 3)),
]


@pytest.mark.parametrize("shape,make,tensor_axes", CAUSAL_CASES)
def test_causal_axis_hides_the_future(shape, make, tensor_axes):
    torch.manual_seed(5)
    x = torch.randn(shape)
    for masked, axis in enumerate(tensor_axes):
        causal = tuple(a == masked for a in range(len(tensor_axes)))
        layer = make(causal)
        for cut in range(1, shape[axis]):
            assert not future_leaks(layer, x, axis, cut), (causal, cut)
        # Negative control: the same check on the same weights without the mask catches a leak.
        unmasked = make(False)
        unmasked.load_state_dict(layer.state_dict())
        assert future_leaks(unmasked, x, axis, 1)
        # Unmasked axes do see the future.
        for other, other_axis in enumerate(tensor_axes):
            if other != masked:
                assert future_leaks(layer, x, other_axis, 1)


# ---------------------------------------------------------------------------------------------
# Channel attention (DANet) and positions.


def naive_channel_attention(m: ChannelAttention, x: torch.Tensor) -> torch.Tensor:
    """DANet's equations (3) and (4) with loops over channel pairs: s_ji = exp(A_i . A_j) /
    sum_i exp(A_i . A_j) over the flattened maps, E_j = beta sum_i s_ji A_i + A_j."""
    a = x.movedim(m.dim_index, 1)
    b, c = a.shape[:2]
    out = torch.empty_like(a)
    for n in range(b):
        maps = a[n].reshape(c, -1)
        energy = torch.tensor([[maps[j] @ maps[i] for i in range(c)] for j in range(c)])
        s = torch.softmax(energy.to(a.dtype), dim=1)  # s[j, i]
        for j in range(c):
            out[n, j] = m.beta * sum(s[j, i] * a[n, i] for i in range(c)) + a[n, j]
    return out.movedim(1, m.dim_index)


@torch.no_grad()
@pytest.mark.parametrize("shape,dim_index", LAYOUTS)
def test_channel_attention_matches_naive_reference(shape, dim_index):
    m = ChannelAttention(6, len(shape), dim_index).double()
    x = feature_map(shape, 6, dim_index) * 0.3  # keeps the softmax away from one-hot
    torch.testing.assert_close(m(x), x)  # beta starts at 0: the identity
    m.beta.fill_(0.7)
    out = m(x)
    torch.testing.assert_close(out, naive_channel_attention(m, x))
    # Negative control: the official code's softmax(max(E) - E) is a different module.
    a = x.movedim(dim_index, -1).flatten(1, -2)
    energy = a.transpose(1, 2) @ a
    flipped = torch.softmax(energy.amax(-1, keepdim=True) - energy, dim=-1)
    other = x + 0.7 * (a @ flipped.transpose(1, 2)).view(x.movedim(dim_index, -1).shape).movedim(
        -1, dim_index
    )
    assert not torch.allclose(out, other)


@torch.no_grad()
def test_positional_embedding_is_a_sum_of_per_axis_tables():
    pos = AxialPositionalEmbedding(4, (3, 5, 6), dim_index=-1)
    assert [tuple(t.shape) for t in pos.tables] == [(1, 3, 1, 1, 4), (1, 1, 5, 1, 4),
                                                   (1, 1, 1, 6, 4)]
    x = torch.randn(2, 3, 5, 6, 4)
    added = pos(x) - x
    t0, t1, t2 = (t.flatten(0, -2) for t in pos.tables)
    for i, j, k in itertools.product(range(3), range(5), range(6)):
        torch.testing.assert_close(added[1, i, j, k], t0[i] + t1[j] + t2[k])
    first = AxialPositionalEmbedding(4, (5, 6), dim_index=1)
    assert [tuple(t.shape) for t in first.tables] == [(1, 4, 5, 1), (1, 4, 1, 6)]
    with pytest.raises(ValueError, match="spatial shape"):
        first(torch.randn(2, 4, 6, 5))


def test_bad_arguments_and_inputs_raise():
    with pytest.raises(ValueError, match="divisible"):
        AxialAttention(10, 3)
    with pytest.raises(ValueError, match="one per spatial axis"):
        AxialAttention(8, 2, 2, causal=(True,))
    with pytest.raises(ValueError, match="non-batch axis"):
        AxialAttention(8, 2, 2, dim_index=0)
    with pytest.raises(ValueError, match="non-batch axis"):
        AxialAttention(8, 2, 2, dim_index=4)
    with pytest.raises(ValueError, match="cannot be causal"):
        AxialAttentionBlock(8, 2, causal=(True, False), channel_attention=True)
    with pytest.raises(ValueError, match="4-d tensor"):
        AxialAttention(8, 2)(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="8 features on axis 1"):
        AxialAttentionBlock(8, 2)(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match="8 features on axis 3"):
        ChannelAttention(8, dim_index=-1)(torch.randn(2, 8, 5, 5))


# ---------------------------------------------------------------------------------------------
# In a CNN: training, compilation, export.


class TinyCNN(nn.Module):
    def __init__(self, channel_attention: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = AxialAttentionBlock(16, heads=2, channel_attention=channel_attention)
        self.head = nn.Conv2d(16, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(F.gelu(self.stem(x)))).mean(dim=(2, 3))


@pytest.mark.parametrize("channel_attention", [False, True])
def test_cnn_with_the_block_trains(channel_attention):
    torch.manual_seed(6)
    model = TinyCNN(channel_attention)
    x = torch.randn(16, 3, 8, 8)
    y = (x[:, 0, :4].mean(dim=(1, 2)) > 0).long()  # depends on the top half of the red channel
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    if channel_attention:
        assert model.attn.channel_attention.beta.grad is not None


def test_blocks_saved_by_earlier_versions_compute_the_same_function():
    """tests/golden/layers_v1.safetensors: a block of each kind with its input and output, saved
    when the layers had their own attention (fused rows [heads, 3, e], norms attn_norms.k,
    exact GELU). Loaded now, each gives the same output; loaded as the model's [3, heads, e]
    rows, it would not (the negative control)."""
    saved = load_file(GOLDEN / "layers_v1.safetensors")
    for name, kw in {"parallel": dict(sum_axes=True),
                     "sequence": dict(sum_axes=False, causal=(True, False))}.items():
        state = {k.removeprefix(f"{name}."): v for k, v in saved.items()
                 if k.startswith(f"{name}.") and k != f"{name}.output"}
        block = AxialAttentionBlock(16, heads=4, **kw).eval()
        block.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(block(saved["input"]), saved[f"{name}.output"])
            for axis in block.attn.axes:  # read as the model reads its own rows
                axis.qkv_parameters = lambda a=axis: (a.to_qkv.weight, a.to_qkv.bias)
            assert not torch.allclose(block(saved["input"]), saved[f"{name}.output"], atol=1e-3)


def test_export_block():
    torch.manual_seed(7)
    block = AxialAttentionBlock(8, 2, causal=(True, False), sum_axes=False).eval()
    x = torch.randn(2, 8, 5, 6)
    exported = torch.export.export(block, (x,))
    torch.testing.assert_close(exported.module()(x), block(x))


@pytest.mark.slow
def test_compile_block():
    torch.manual_seed(8)
    block = AxialAttentionBlock(8, 2, 3, channel_attention=True)
    compiled = torch.compile(block)
    x = torch.randn(2, 8, 3, 4, 5, requires_grad=True)
    out = compiled(x)
    torch.testing.assert_close(out, block(x), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert x.grad is not None and x.grad.isfinite().all()
