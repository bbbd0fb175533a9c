"""Causality: no subpixel sees its own value or anything after it in (channel, row, column) order,
and every subpixel sees everything before it (the full receptive field the paper claims).

Each pixel enters the model twice, as an embedding in its own channel and as a real value in the
channel encoder of later channels, so the checks perturb the integer input itself.
"""

import pytest
import torch
from conftest import randomize_

import axial_transformer.model.transformer as model_module
from axial_transformer import AxialTransformer, AxialTransformerConfig

UNCHANGED, CHANGED = 1e-10, 1e-6  # in float64 the two are many orders of magnitude apart


def make_model(channels: int, size: tuple[int, int], attention: str = "auto") -> AxialTransformer:
    cfg = AxialTransformerConfig(image_size=size, channels=channels, dim=32, heads=4,
                                 encoder_layers=2, outer_layers=2, inner_layers=2)
    return randomize_(AxialTransformer(cfg).set_attention(attention).double(), std=0.3).eval()


@torch.no_grad()
def dependency_matrix(model: AxialTransformer, x: torch.Tensor) -> torch.Tensor:
    """D[q, p] = how much the logits at subpixel p move when subpixel q alone changes.

    Positions are flattened in the model's order (c, i, j). One batched forward pass.
    """
    n = x[0].numel()
    flat = x[0].flatten()
    perturbed = flat.repeat(n, 1)
    perturbed[torch.arange(n), torch.arange(n)] = (flat + 128) % 256  # a different value
    base = model(x).flatten(1, 3)[0]  # (N, 256)
    moved = model(perturbed.view(n, *x.shape[1:])).flatten(1, 3)  # (q, p, 256)
    return (moved - base).abs().amax(-1)


@torch.no_grad()
def future_leak(model: AxialTransformer, x: torch.Tensor) -> float:
    """Largest change of the logits at p when every subpixel at or after p is redrawn."""
    n = x[0].numel()
    flat = x[0].flatten()
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 256, (n, n), generator=g)
    at_or_after = torch.arange(n)[None, :] >= torch.arange(n)[:, None]  # row p: positions >= p
    redrawn = torch.where(at_or_after, noise, flat)
    base = model(x).flatten(1, 3)[0]
    logits = model(redrawn.view(n, *x.shape[1:])).flatten(1, 3)
    return (logits[torch.arange(n), torch.arange(n)] - base).abs().max().item()


def assert_causal(model: AxialTransformer) -> None:
    c, (h, w) = model.config.channels, model.config.image_size
    x = torch.randint(0, 256, (1, c, h, w), generator=torch.Generator().manual_seed(0))
    assert future_leak(model, x) < UNCHANGED, "logits at p depend on subpixels at or after p"
    d = dependency_matrix(model, x)
    n = d.shape[0]
    later = torch.arange(n)[None, :] > torch.arange(n)[:, None]  # p after q
    assert d[~later].max() < UNCHANGED, "a subpixel's logits depend on itself or the future"
    assert d[later].min() > CHANGED, "a subpixel does not see all of its past"


@pytest.mark.parametrize("channels, size", [(1, (4, 4)), (3, (4, 4)), (3, (5, 7)), (1, (6, 3))])
def test_model_is_causal_with_full_receptive_field(channels, size, attention_path):
    assert_causal(make_model(channels, size, attention_path))


def test_check_catches_unmasked_outer_column_attention(attention_path):
    model = make_model(3, (5, 7), attention_path)
    for block in model.outer_decoder.blocks:
        block.attn.causal = False
    with pytest.raises(AssertionError, match="at or after p"):
        assert_causal(model)


def test_check_catches_missing_shift_right(monkeypatch):
    model = make_model(3, (5, 7))
    monkeypatch.setattr(model_module, "shift_right", lambda h: h)
    with pytest.raises(AssertionError, match="at or after p"):
        assert_causal(model)


def test_check_catches_missing_shift_down(monkeypatch):
    model = make_model(1, (5, 7))
    monkeypatch.setattr(model_module, "shift_down", lambda u: u)
    with pytest.raises(AssertionError, match="at or after p"):
        assert_causal(model)


def test_check_catches_lost_receptive_field():
    # A masked row layer that sees only its own column misses the pixels to the left.
    model = make_model(1, (4, 4))
    model.inner_decoder.blocks[0].attn.to_out.weight.data.zero_()
    model.inner_decoder.blocks[1].attn.to_out.weight.data.zero_()
    with pytest.raises(AssertionError, match="does not see all of its past"):
        assert_causal(model)


def train_on_noise(model: AxialTransformer, steps: int) -> float:
    """Train on uniform noise images; return bits/dim on held-out noise."""
    c, (h, w) = model.config.channels, model.config.image_size
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x = torch.randint(0, 256, (16, c, h, w), generator=g)
        loss = model.loss(x, "all")
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        held_out = torch.randint(0, 256, (64, c, h, w), generator=g)
        return model.eval().bits_per_dim(held_out).mean().item()


def noise_model() -> AxialTransformer:
    torch.manual_seed(0)
    cfg = AxialTransformerConfig(image_size=(4, 4), channels=3, dim=32, heads=4,
                                 encoder_layers=2, outer_layers=2, inner_layers=2)
    return AxialTransformer(cfg)


def test_noise_cannot_be_compressed():
    # Uniform noise costs 8 bits/dim; a model that leaks the future would score far lower.
    assert train_on_noise(noise_model(), steps=150) >= 7.9


def test_noise_check_catches_a_leaky_model(monkeypatch):
    monkeypatch.setattr(model_module, "shift_right", lambda h: h)
    assert train_on_noise(noise_model(), steps=150) < 7.0
