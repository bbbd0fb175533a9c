"""The video model: causal over (frame, channel, row, column) with the full receptive field, an
exact distribution, a cached sampler that reproduces the naive one, saving and loading, input
checks, and image models left as they were. Property checks run on randomised weights, each with
a negative control that breaks the model and shows the check sees it."""

import functools
import json
import math

import pytest
import torch
from conftest import randomize_
from einops import rearrange

from axial_transformer import (
    AxialTransformer,
    AxialTransformerConfig,
    VideoTransformer,
    build_model,
    cpu_speedups,
)
from axial_transformer.model.video import TIME, motion_compensated
from axial_transformer.sampling import given_frames, sample, sample_naive
from axial_transformer.sampling import video as video_sampling

UNCHANGED, CHANGED = 1e-10, 1e-6  # in float64 the two are many orders of magnitude apart


def video_config(channels=2, frames=3, size=(4, 5), **overrides) -> AxialTransformerConfig:
    values = dict(image_size=size, channels=channels, dim=16, heads=2, encoder_layers=2,
                  outer_layers=2, inner_layers=2, frames=frames, frame_layers=3)
    return AxialTransformerConfig(**{**values, **overrides})


def video_model(**overrides) -> VideoTransformer:
    return randomize_(VideoTransformer(video_config(**overrides)), std=0.3).double().eval()


def in_model_order(logits: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W, V] -> [B, N, V], positions in the order (t, c, i, j)."""
    return rearrange(logits, "b c t h w v -> b (t c h w) v")


def from_model_order(flat: torch.Tensor, c: int, t: int, h: int, w: int) -> torch.Tensor:
    return rearrange(flat, "b (t c h w) -> b c t h w", c=c, t=t, h=h, w=w)


@torch.no_grad()
def dependencies(model: VideoTransformer, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(D, leak): D[q, p] = how much the logits at p move when subpixel q alone changes (every
    position, one batched forward pass); leak = the largest change of the logits at p when
    every subpixel at or after p is redrawn. Positions in the model's order."""
    c, t, h, w = x.shape[1:]
    flat = rearrange(x, "b c t h w -> b (t c h w)")[0]
    n = len(flat)
    levels = model.config.levels
    base = in_model_order(model(x))[0]
    one_changed = flat.repeat(n, 1)
    one_changed[torch.arange(n), torch.arange(n)] = (flat + levels // 2) % levels
    d = (in_model_order(model(from_model_order(one_changed, c, t, h, w))) - base).abs().amax(-1)
    noise = torch.randint(0, levels, (n, n), generator=torch.Generator().manual_seed(1))
    at_or_after = torch.arange(n)[None, :] >= torch.arange(n)[:, None]
    redrawn = from_model_order(torch.where(at_or_after, noise, flat), c, t, h, w)
    moved = in_model_order(model(redrawn))[torch.arange(n), torch.arange(n)]
    return d, (moved - base).abs().max().item()


def assert_causal(model: VideoTransformer) -> None:
    c, t, (h, w) = model.config.channels, model.config.frames, model.config.image_size
    x = torch.randint(0, 256, (1, c, t, h, w), generator=torch.Generator().manual_seed(0))
    d, leak = dependencies(model, x)
    assert leak < UNCHANGED, "logits at p depend on subpixels at or after p"
    n = len(d)
    later = torch.arange(n)[None, :] > torch.arange(n)[:, None]  # p after q
    assert d[~later].max() < UNCHANGED, "a subpixel's logits depend on itself or the future"
    assert d[later].min() > CHANGED, "a subpixel does not see all of its past"


# ------------------------------------------------------------------------------------------------
# Causality.


def test_video_model_is_causal_with_full_receptive_field():
    assert_causal(video_model())


def test_causality_check_catches_frame_input_seeing_frame_t(monkeypatch):
    past_frames = VideoTransformer.past_frames

    def with_present(self, x, t=None):  # slot t built from frames t and t-1: a leak
        shifted = torch.cat([x[:, :, 1:], x[:, :, -1:]], 2)
        return past_frames(self, shifted, None if t is None else t)

    monkeypatch.setattr(VideoTransformer, "past_frames", with_present)
    with pytest.raises(AssertionError, match="at or after p"):
        assert_causal(video_model())


def test_causality_check_catches_unmasked_time_attention():
    model = video_model()
    for block in model.frame_encoder.blocks:
        if block.attn.axis == TIME:
            block.attn.causal = False
    with pytest.raises(AssertionError, match="at or after p"):
        assert_causal(model)


def test_causality_check_catches_earlier_frames_ignored():
    model = video_model()
    model.frame_input.weight.data.zero_()  # the frame context no longer depends on any frame
    with pytest.raises(AssertionError, match="does not see all of its past"):
        assert_causal(model)


# ------------------------------------------------------------------------------------------------
# An exact distribution.


def total_probability(model: VideoTransformer) -> float:
    """The sum of p(x) over every clip of a model with 4 levels, 1 channel, 2 frames of 2x2."""
    levels, n = model.config.levels, 8
    codes = torch.arange(levels**n)
    digits = torch.stack([(codes // levels**k) % levels for k in range(n)], 1)
    clips = digits.view(-1, 1, 2, 2, 2)
    with torch.no_grad():
        bits = torch.cat([model.subpixel_bits(b).flatten(1).sum(1) for b in clips.split(8192)])
    return torch.exp2(-bits).sum().item()


def tiny_exact_model() -> VideoTransformer:
    return video_model(channels=1, frames=2, size=(2, 2), levels=4)


def test_probabilities_of_all_clips_sum_to_one():
    assert total_probability(tiny_exact_model()) == pytest.approx(1.0, abs=1e-9)


def test_sum_check_catches_a_leaky_model(monkeypatch):
    def present(self, x, t=None):  # slot t built from frame t itself, twice: a leak
        values = x.double() / (self.config.levels - 1)
        return rearrange(values.repeat(1, 2, 1, 1, 1), "b k t h w -> (b t) k h w")

    monkeypatch.setattr(VideoTransformer, "past_frames", present)
    assert abs(total_probability(tiny_exact_model()) - 1.0) > 1e-3


def test_bits_per_dim_is_the_mean_of_subpixel_bits_and_untrained_is_uniform():
    model = video_model()
    x = torch.randint(0, 256, (2, 2, 3, 4, 5), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model.bits_per_dim(x), model.subpixel_bits(x).flatten(1).mean(1))
    for levels in (4, 256):
        fresh = VideoTransformer(video_config(levels=levels))
        clips = torch.randint(0, levels, (2, 2, 3, 4, 5))
        with torch.no_grad():
            bpd = fresh.bits_per_dim(clips)
        torch.testing.assert_close(bpd, torch.full((2,), math.log2(levels)), atol=1e-3, rtol=0)


def test_random_channel_loss_is_unbiased():
    model = video_model()
    x = torch.randint(0, 256, (2, 2, 3, 4, 5))
    per_channel = [model.loss(x, channel=torch.full((2, 3), c)) for c in range(2)]
    torch.testing.assert_close(sum(per_channel) / 2, model.loss(x, "all"))
    loss = model.train().loss(x, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert model.frame_input.weight.grad.abs().sum() > 0


def test_motion_compensated_guess_follows_constant_motion():
    """A random pattern moving one pixel a frame diagonally is guessed exactly (away from the
    edges, which the shifts leave empty), and a still one is copied."""
    frame = torch.rand(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))

    def at(t: int) -> torch.Tensor:  # the pattern after t frames of (+1, -1) pixels a frame
        return torch.roll(frame, (t, -t), (2, 3))[..., 4:-4, 4:-4]

    moved = motion_compensated(torch.roll(frame, (1, -1), (2, 3)), frame)[..., 4:-4, 4:-4]
    torch.testing.assert_close(moved, at(2), rtol=0, atol=0)
    assert not torch.equal(at(1), at(2))  # copying frame t-1 would fail the check above
    torch.testing.assert_close(motion_compensated(frame, frame), frame, rtol=0, atol=0)


def test_the_guess_prior_raises_each_guessed_value_of_its_own_frame():
    """guess_prior[t, d] is added to frame t's logit of every value d levels from the guess:
    raising it at distance 0 for frame 1 moves frame 1's logits at the guessed values by exactly
    that, and no other logit. An unwired prior would move none."""
    model = video_model()
    x = torch.randint(0, 256, (2, 2, 3, 4, 5), generator=torch.Generator().manual_seed(1))
    base = model(x)
    guess = model.frame_context(x)[1]  # [B, C, T, H, W]
    with torch.no_grad():
        model.guess_prior[1, 0] += 100.0
    moved = model(x) - base
    torch.testing.assert_close(moved[:, :, 1], 100.0 * torch.nn.functional.one_hot(
        guess[:, :, 1], 256).double(), rtol=0, atol=1e-9)
    assert moved[:, :, [0, 2]].abs().max() == 0


# ------------------------------------------------------------------------------------------------
# Sampling.


def gumbel_noise(shape, seed=0) -> torch.Tensor:
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return -torch.log(-torch.log(u))


def first_frame(b=3, seed=2) -> torch.Tensor:
    return torch.randint(0, 256, (b, 2, 1, 4, 5), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("known", ["none", "first frame", "scattered"])
def test_cached_sampler_equals_naive_sampler(known, attention_path):
    model = video_model().set_attention(attention_path)
    b = 3
    noise = gumbel_noise((b, 2, 3, 4, 5, 256))
    kw = {}
    if known == "first frame":
        kw = given_frames(first_frame(b), frames=3)
    elif known == "scattered":
        kw = dict(known=torch.randint(0, 256, (b, 2, 3, 4, 5)),
                  known_mask=torch.rand((b, 2, 3, 4, 5)) < 0.4)
    cached = sample(model, b, noise=noise, **kw)
    assert cached.dtype == torch.uint8 and cached.shape == (b, 2, 3, 4, 5)
    assert torch.equal(cached, sample_naive(model, b, noise=noise, **kw))
    assert len(cached.unique()) > 10
    if kw:
        mask = kw["known_mask"].expand_as(cached)
        assert torch.equal(cached[mask], kw["known"].expand_as(cached)[mask].to(torch.uint8))


def test_compiled_sampler_equals_naive_sampler(monkeypatch):
    """compile=True decodes every frame with the image model's compiled steps: one compilation
    serves all frames, with and without known first frames, and draws what the reference draws.
    Without the GEMM autotuning, whose search takes a minute (the image test has it)."""
    monkeypatch.setattr(cpu_speedups, "frozen_weights_compilation",
                        functools.partial(cpu_speedups.frozen_weights_compilation, autotune=False))
    model = video_model().float()
    b = 2
    noise = gumbel_noise((b, 2, 3, 4, 5, 256)).float()
    for kw in ({}, given_frames(first_frame(b), frames=3)):
        assert torch.equal(sample(model, b, noise=noise, compile=True, **kw),
                           sample_naive(model, b, noise=noise, **kw))


def test_same_seed_and_temperature_give_the_same_clips_in_both_samplers():
    model = video_model()
    draw = [fn(2, temperature=0.7, generator=torch.Generator().manual_seed(s))
            for fn, s in ((model.sample, 5), (lambda *a, **k: sample_naive(model, *a, **k), 5),
                          (model.sample, 6))]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])


def test_sampler_check_catches_a_forgetful_time_cache(monkeypatch):
    """Negative control: a frame encoder that starts every slot with empty time caches."""
    step = VideoTransformer.frame_step

    def forgetful(self, x, t, caches, time):
        return step(self, x, t, self.new_frame_caches(len(x), self.frame_pos_t), time)

    model = video_model()
    noise = gumbel_noise((3, 2, 3, 4, 5, 256))
    naive = sample_naive(model, 3, noise=noise)
    monkeypatch.setattr(VideoTransformer, "frame_step", forgetful)
    assert not torch.equal(sample(model, 3, noise=noise), naive)


def test_sampler_check_catches_a_sampler_without_the_guess_prior(monkeypatch):
    """Negative control: a cached sampler that decodes every frame without the guess's prior."""
    decode = video_sampling.decode
    monkeypatch.setattr(video_sampling, "decode",
                        lambda *a, **k: decode(*a, **{**k, "frame_prior": None}))
    model = video_model()
    noise = gumbel_noise((3, 2, 3, 4, 5, 256))
    assert not torch.equal(sample(model, 3, noise=noise), sample_naive(model, 3, noise=noise))


def test_sampler_rejects_image_shaped_known_pixels():
    model = video_model()
    with pytest.raises(ValueError, match=r"known must have shape \[2 or 1, 2, 3, 4, 5\]"):
        sample(model, 2, known=torch.zeros(2, 2, 4, 5, dtype=torch.long),
               known_mask=torch.ones(2, 2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="first frames"):
        given_frames(torch.zeros(2, 2, 4, 4, 5), frames=3)


# ------------------------------------------------------------------------------------------------
# Configs, image models, saving and loading, input checks.


def test_image_configs_and_models_are_unchanged():
    cfg = AxialTransformerConfig(image_size=(4, 5), channels=3, dim=16, heads=2,
                                 encoder_layers=2, outer_layers=2, inner_layers=2)
    assert "frames" not in cfg.to_dict() and "frame_layers" not in cfg.to_dict()
    assert AxialTransformerConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    built = build_model(cfg)
    torch.manual_seed(0)
    direct = AxialTransformer(cfg)
    assert type(built) is AxialTransformer
    assert built.state_dict().keys() == direct.state_dict().keys()
    x = torch.randint(0, 256, (2, 3, 4, 5))
    randomize_(built), randomize_(direct)
    with torch.no_grad():
        assert torch.equal(built(x), direct(x))
        channel = torch.tensor([0, 2])
        ctx = built.channel_context(x, channel)
        assert torch.equal(ctx, built.channel_context(x, channel, None, None))
        assert not torch.equal(ctx, built.channel_context(x, channel, None, torch.ones_like(ctx)))


@pytest.mark.parametrize("overrides, message", [
    (dict(frame_layers=4), "frame_layers must be a positive multiple of 3"),
    (dict(frame_layers=0), "frame_layers must be an integer"),
    (dict(frames=-1), "frames must be an integer"),
    (dict(num_classes=10), "num_classes must be 0 when frames > 0"),
    (dict(frames=0, frame_layers=6), "frame_layers .* applies to video models only"),
])
def test_bad_video_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        video_config(**overrides)


def test_save_and_load_a_video_model(tmp_path):
    model = video_model().float()
    model.save_pretrained(tmp_path / "video")
    saved = json.loads((tmp_path / "video" / "config.json").read_text())
    assert saved["frames"] == 3 and saved["frame_layers"] == 3
    x = torch.randint(0, 256, (1, 2, 3, 4, 5))
    with torch.no_grad():
        expected = model(x)
        for cls in (VideoTransformer, AxialTransformer):
            loaded = cls.from_pretrained(tmp_path / "video")
            assert type(loaded) is VideoTransformer and loaded.config == model.config
            assert torch.equal(loaded(x), expected)
    AxialTransformer(AxialTransformerConfig(image_size=(4, 5), channels=2, dim=16, heads=2,
                                            encoder_layers=2, outer_layers=2, inner_layers=2)
                     ).save_pretrained(tmp_path / "image")
    with pytest.raises(ValueError, match="image model .* AxialTransformer.from_pretrained"):
        VideoTransformer.from_pretrained(tmp_path / "image")


@pytest.mark.parametrize("clips, message", [
    (torch.zeros(2, 2, 4, 5, dtype=torch.uint8), r"expected clips of shape \[B, C, T, H, W\]"),
    (torch.zeros(2, 2, 2, 4, 5, dtype=torch.uint8), r"= \[B, 2, 3, 4, 5\], got \[2, 2, 2, 4, 5\]"),
    (torch.zeros(2, 2, 3, 4, 5), "expected integer pixel values"),
    (torch.full((2, 2, 3, 4, 5), 4), r"pixel values must lie in 0..3"),
    (torch.full((2, 2, 3, 4, 5), -1), r"pixel values must lie in 0..3"),
])
def test_bad_clips_are_refused(clips, message):
    model = VideoTransformer(video_config(levels=4))
    with pytest.raises(ValueError, match=message):
        model(clips)


def test_run_time_settings():
    model = video_model()
    x = torch.randint(0, 256, (1, 2, 3, 4, 5))
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(model.set_attention("matmul")(x), expected)
    model.train().set_gradient_checkpointing(True)
    model.loss(x).backward()
    assert model.frame_encoder.gradient_checkpointing and model.num_parameters() > 0
    with pytest.raises(ValueError, match="attention must be one of"):
        model.set_attention("flash")
