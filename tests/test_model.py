"""The model: shapes, init, exact likelihood, objectives, precision, presets, bad input."""

import itertools
import math
from pathlib import Path

import pytest
import torch
from conftest import randomize_

from axial_transformer import AxialTransformer, AxialTransformerConfig


def tiny(**overrides) -> AxialTransformerConfig:
    kw = dict(image_size=(5, 7), channels=3, dim=32, heads=4,
              encoder_layers=2, outer_layers=2, inner_layers=2)
    return AxialTransformerConfig(**{**kw, **overrides})


def test_shapes_and_untrained_model_scores_eight_bits():
    model = AxialTransformer(tiny())
    x = torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.uint8)
    assert model(x).shape == (3, 3, 5, 7, 256)
    # Zero-initialised output projections and logits layer: the uniform distribution.
    for images in (x, torch.zeros_like(x), torch.full_like(x, 255)):
        assert torch.allclose(model.bits_per_dim(images), torch.tensor(8.0), atol=1e-4)


def test_distribution_sums_to_one(attention_path):
    # Exact likelihood: with 3 levels, 2 channels and 2x2 pixels there are 3^8 images; their
    # probabilities under the model must sum to 1. A model that sees its own pixel does not.
    cfg = tiny(image_size=(2, 2), channels=2, levels=3)
    images = torch.tensor(list(itertools.product(range(3), repeat=8))).view(-1, 2, 2, 2)

    def total_probability(model):
        with torch.no_grad():
            bits = model.bits_per_dim(images).double() * 8  # bits of each whole image
        return torch.exp2(-bits).sum().item()

    def make():
        return randomize_(AxialTransformer(cfg).set_attention(attention_path).double(), std=0.3)

    assert total_probability(make().eval()) == pytest.approx(1.0, abs=1e-9)

    leaky = make().eval()
    for block in leaky.outer_decoder.blocks:
        block.attn.causal = False
    assert abs(total_probability(leaky) - 1.0) > 1e-3


def test_channel_encoder_sees_pixels_scaled_by_the_levels():
    # The earlier channels enter the encoder as x / (levels - 1): 0..1 whatever the bit depth.
    model = AxialTransformer(tiny(channels=2, levels=3))
    seen = []
    model.encoder_input.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model(torch.full((1, 2, 5, 7), 2))
    values = torch.cat(seen)[:, :2]  # the value planes; the one-hot planes follow
    assert values.max().item() == 1.0


def test_bits_per_dim_is_mean_of_slice_nlls():
    model = randomize_(AxialTransformer(tiny()), std=0.2).eval()
    x = torch.randint(0, 256, (2, 3, 5, 7))
    slice_bits = []
    for c in range(3):
        channel = torch.full((2,), c)
        logp = model.slice_logits(x, channel).double().log_softmax(-1)
        nll = -logp.gather(-1, x[:, c, :, :, None]).squeeze(-1)  # [B, H, W] nats
        slice_bits.append(nll.mean((1, 2)) / math.log(2))
    expected = torch.stack(slice_bits).mean(0)
    assert torch.allclose(model.bits_per_dim(x).double(), expected, atol=1e-4)


def test_random_slice_objective_is_unbiased():
    model = randomize_(AxialTransformer(tiny()), std=0.2).eval()
    x = torch.randint(0, 256, (4, 3, 5, 7))
    per_choice = [model.loss(x, channel=torch.full((4,), c)) for c in range(3)]
    assert torch.allclose(torch.stack(per_choice).mean(), model.loss(x, "all"), atol=1e-4)


def test_random_slice_runs_decoders_on_one_slice_per_image():
    model = AxialTransformer(tiny())
    seen = {}
    for name in ("channel_encoder", "outer_decoder", "inner_decoder"):
        getattr(model, name).register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, args[0].shape[0]))
    x = torch.randint(0, 256, (4, 3, 5, 7))
    model.loss(x, "random", generator=torch.Generator().manual_seed(0))
    assert seen == dict(channel_encoder=4, outer_decoder=4, inner_decoder=4)
    model.loss(x, "all")
    assert seen == dict(channel_encoder=12, outer_decoder=12, inner_decoder=12)


def test_items_of_a_batch_are_independent():
    model = randomize_(AxialTransformer(tiny()), std=0.2).eval()
    x = torch.randint(0, 256, (4, 3, 5, 7))
    together = model(x)
    for b in range(4):
        assert torch.allclose(model(x[b : b + 1])[0], together[b], atol=1e-5)


def test_bf16_autocast_matches_fp32():
    model = randomize_(AxialTransformer(tiny()), std=0.1)
    x = torch.randint(0, 256, (4, 3, 5, 7))
    fp32 = model.loss(x, "all")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.loss(x, "all")
    bf16.backward()
    assert bf16.dtype == torch.float32  # the cross-entropy is taken in fp32
    assert abs(bf16.item() - fp32.item()) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 256, (2, 3, 5, 7))
    grads, calls = [], []
    for flag in (False, True):
        model = randomize_(AxialTransformer(tiny()).set_gradient_checkpointing(flag), std=0.1)
        block = model.inner_decoder.blocks[0]
        block.register_forward_pre_hook(lambda *_, flag=flag: calls.append(flag))
        model.loss(x, "all").backward()
        grads.append([p.grad for p in model.parameters()])
    assert calls == [False, True, True]  # checkpointed, a block runs again in the backward pass
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("preset, expected", [("imagenet32", 341e6), ("imagenet64", 606e6)])
def test_paper_presets_have_the_papers_size(preset, expected):
    with torch.device("meta"):
        model = AxialTransformer(AxialTransformerConfig.from_preset(preset))
    assert model.num_parameters() == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("name, expected", [
    ("imagenet32", ((32, 32), 1536, 16, 8, 0.04)),  # the paper's (official config_imagenet32.py)
    ("imagenet64", ((64, 64), 2048, 16, 8, 0.0)),
    ("cifar10", ((32, 32), 512, 8, 8, 0.1)),  # the imagenet32 preset, its own keys over it
    ("demo", ((16, 16), 64, 4, 2, 0.0)),
])
def test_shipped_configs_name_their_preset_and_what_differs(name, expected):
    from axial_transformer.training.config import load_config

    m = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml").model
    layers = {m.encoder_layers, m.outer_layers, m.inner_layers}
    assert (m.image_size, m.dim, m.heads, *layers, m.dropout) == expected
    assert (m.channels, m.mlp_ratio, m.levels, m.num_classes) == (3, 1.0, 256, 0)


def test_a_model_section_overrides_its_preset_and_an_unknown_one_is_refused(tmp_path):
    from axial_transformer.training.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text("model:\n  preset: small\n  dim: 64\n")
    cfg = load_config(path, ["model.heads=4"]).model
    assert cfg == AxialTransformerConfig.from_preset("small", dim=64, heads=4)
    assert (cfg.dim, cfg.heads, cfg.inner_layers) == (64, 4, 4)
    path.write_text("model:\n  preset: imagenet128\n")
    with pytest.raises(ValueError, match="unknown preset 'imagenet128'"):
        load_config(path)


def test_overfits_two_images():
    torch.manual_seed(0)
    cfg = tiny(image_size=(4, 4), dim=64)
    model = AxialTransformer(cfg)
    x = torch.randint(0, 256, (2, 3, 4, 4))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model.loss(x, "all")
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.eval().bits_per_dim(x).max() < 0.5


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(1, 3, 5, 7), "integer pixel values"),
        (torch.zeros(1, 1, 5, 7, dtype=torch.long), r"shape \[B, 3, 5, 7\]"),
        (torch.zeros(3, 5, 7, dtype=torch.long), r"shape \[B, 3, 5, 7\]"),
        (torch.full((1, 3, 5, 7), 256), "0..255"),
        (torch.full((1, 3, 5, 7), -1), "0..255"),
        (torch.zeros(1, 3, 5, 7, dtype=torch.bool), "integer pixel values"),
    ],
)
def test_bad_input_is_rejected(bad, message):
    model = AxialTransformer(tiny())
    with pytest.raises(ValueError, match=message):
        model(bad)
    with pytest.raises(ValueError, match=message):
        model.loss(bad)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(outer_layers=3), "outer_layers must be a positive even number"),
        (dict(encoder_layers=1), "encoder_layers must be a positive even number"),
        (dict(dim=30, heads=4), "divisible"),
        (dict(image_size=(0, 4)), "image_size"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_unknown_objective_and_preset():
    model = AxialTransformer(tiny())
    with pytest.raises(ValueError, match="objective"):
        model.loss(torch.zeros(1, 3, 5, 7, dtype=torch.long), "some")
    with pytest.raises(ValueError, match="unknown preset"):
        AxialTransformerConfig.from_preset("imagenet128")


@pytest.mark.parametrize("tokens", [4, 40])  # constants on the activations, on the weights
def test_mlp_computes_the_official_sigmoid_gelu(tokens):
    # The MLP runs z sigmoid(1.702 z) as SiLU with 1.702 moved into the weights (many tokens) or
    # onto the activations (few); both are the official GELU approximation.
    from axial_transformer.model.blocks import MLP

    torch.manual_seed(0)
    mlp = MLP(8, 16).double()
    x = torch.randn(tokens, 8, dtype=torch.float64, requires_grad=True)
    inner, _, outer = mlp
    z = inner(x)
    expected = outer(z * torch.sigmoid(1.702 * z))
    grads = torch.autograd.grad(expected.sum(), [x, *mlp.parameters()])
    out = mlp(x)
    assert torch.allclose(out, expected, atol=1e-12)
    for ours, reference in zip(torch.autograd.grad(out.sum(), [x, *mlp.parameters()]), grads,
                               strict=True):
        assert torch.allclose(ours, reference, atol=1e-12)
