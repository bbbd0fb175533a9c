"""Class-conditional models: the label reaches every subpixel, "no class" is a mode of its own,
guided and plain conditional sampling keep cached = naive, bad labels are refused."""

import pytest
import torch
from conftest import randomize_

from axial_transformer import AxialTransformer, AxialTransformerConfig
from axial_transformer.sampling.sampler import sample, sample_naive


def conditional_model(num_classes=3, channels=3, attention="auto"):
    cfg = AxialTransformerConfig(image_size=(3, 4), channels=channels, dim=16, heads=2,
                                 encoder_layers=2, outer_layers=2, inner_layers=2,
                                 num_classes=num_classes)
    return randomize_(AxialTransformer(cfg).set_attention(attention), std=0.3).double().eval()


def gumbel_noise(shape, seed=0):
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def test_the_label_reaches_every_subpixel():
    model = conditional_model()
    x = torch.randint(0, 256, (1, 3, 3, 4), generator=torch.Generator().manual_seed(0))
    moved = (model(x, torch.tensor([0])) - model(x, torch.tensor([1]))).abs().amax(-1)
    assert moved.min() > 1e-6  # every (c, i, j), the very first subpixel included
    no_class = (model(x, torch.tensor([0])) - model(x, torch.tensor([-1]))).abs().amax(-1)
    assert no_class.min() > 1e-6  # "no class" is a mode of its own


def test_an_unconditional_model_has_no_label_input():
    model = conditional_model(num_classes=0)
    assert not any("class" in name for name, _ in model.named_parameters())
    x = torch.zeros((1, 3, 3, 4), dtype=torch.long)
    with pytest.raises(ValueError, match="not class-conditional"):
        model(x, torch.tensor([0]))
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        sample(model, 1, guidance=2.0)


@pytest.mark.parametrize("labels, message", [
    (None, "pass labels"),
    (torch.tensor([0, 1]), r"shape \[1\]"),
    (torch.tensor([3]), r"0\.\.2"),
    (torch.tensor([-2]), r"0\.\.2"),
    (torch.tensor([0.5]), "integer"),
])
def test_bad_labels_are_refused(labels, message):
    model = conditional_model()
    with pytest.raises(ValueError, match=message):
        model(torch.zeros((1, 3, 3, 4), dtype=torch.long), labels)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cached_sampler_equals_naive_sampler_with_labels(guidance, attention_path):
    model = conditional_model(attention=attention_path)
    labels = torch.tensor([0, 2, 1])
    noise = gumbel_noise((3, 3, 3, 4, 256))
    fast = sample(model, 3, noise=noise, labels=labels, guidance=guidance)
    naive = sample_naive(model, 3, noise=noise, labels=labels, guidance=guidance)
    assert torch.equal(fast, naive)
    # Negative control: other labels give other images from the same noise.
    assert not torch.equal(fast, sample(model, 3, noise=noise, labels=labels.flip(0),
                                        guidance=guidance))


def test_batches_draw_their_share_of_the_request():
    """batch_size splits the images with their noise, labels and known pixels: the cached
    sampler in batches of 2 draws what the naive one draws in one batch."""
    model = conditional_model()
    known = torch.randint(0, 256, (3, 3, 3, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros_like(known, dtype=torch.bool)
    mask[:, :, 0] = True  # the top row of every channel given
    request = dict(noise=gumbel_noise((3, 3, 3, 4, 256)), labels=torch.tensor([0, 2, 1]),
                   known=known, known_mask=mask, guidance=2.0)
    whole = sample_naive(model, 3, **request)
    assert torch.equal(sample(model, 3, batch_size=2, **request), whole)
    assert torch.equal(whole[:, :, 0], known[:, :, 0].to(torch.uint8))
    # Negative control: a batch drawn with the first images' share is not the last image.
    first_share = {k: v[:1] for k, v in request.items() if k != "guidance"}
    assert not torch.equal(sample(model, 1, guidance=2.0, **first_share), whole[2:])


def test_guidance_combines_the_conditional_and_unconditional_logits():
    model = conditional_model(channels=1)
    seen = {}

    def record(guidance):
        def hook(c, i, j, logits):
            seen.setdefault(guidance, {})[(c, i, j)] = logits
        return hook

    noise = gumbel_noise((1, 1, 3, 4, 256))
    sample(model, 1, noise=noise, labels=1, guidance=2.5, on_logits=record(2.5))
    images = sample(model, 1, noise=noise, labels=1, guidance=2.5)
    with torch.no_grad():
        cond = model(images, torch.tensor([1]))[0, 0, 1, 2]
        uncond = model(images, torch.tensor([-1]))[0, 0, 1, 2]
    torch.testing.assert_close(seen[2.5][(0, 1, 2)][0], uncond + 2.5 * (cond - uncond))
