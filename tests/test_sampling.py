"""Samplers: the cached sampler reproduces the naive one exactly, draws from softmax(logits / T),
keeps known pixels, and sample.py writes what it says. Every check runs on a randomised model:
at the official init the logits barely depend on the input and any sampler looks right."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_
from scipy.stats import chi2

from axial_transformer import AxialTransformer, AxialTransformerConfig, cpu_speedups
from axial_transformer.model import attention, decoding
from axial_transformer.model.attention import AxialSelfAttention
from axial_transformer.sampling.sampler import sample, sample_naive

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(channels=3, size=(4, 5), dtype=torch.float64, std=0.3, attention="auto",
               **overrides):
    cfg = AxialTransformerConfig(image_size=size, channels=channels, dim=16, heads=2,
                                 encoder_layers=2, outer_layers=2, inner_layers=2, **overrides)
    model = AxialTransformer(cfg).set_attention(attention)
    return randomize_(model, std=std, seed=0).to(dtype).eval()


def gumbel_noise(shape, seed=0) -> torch.Tensor:
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return -torch.log(-torch.log(u))


def completion_mask(b, c, h, w) -> torch.Tensor:
    """Random known pixels, one fully known row per channel and (for RGB) a fully known channel,
    so that the sampler's skipping of known rows and channels is exercised."""
    mask = torch.rand((b, c, h, w), generator=torch.Generator().manual_seed(1)) < 0.4
    mask[:, :, 1] = True
    if c > 1:
        mask[:, 1] = True
    return mask


# ------------------------------------------------------------------------------------------------
# The cached sampler against the reference.


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("with_known", [False, True])
def test_fast_sampler_equals_naive_sampler(channels, with_known, attention_path):
    model = tiny_model(channels, attention=attention_path)
    b, (h, w) = 3, model.config.image_size
    noise = gumbel_noise((b, channels, h, w, 256))
    kw = {}
    if with_known:
        known = torch.randint(0, 256, (b, channels, h, w),
                              generator=torch.Generator().manual_seed(2))
        kw = dict(known=known, known_mask=completion_mask(b, channels, h, w))
    fast = sample(model, b, noise=noise, **kw)
    naive = sample_naive(model, b, noise=noise, **kw)
    assert fast.dtype == torch.uint8 and fast.shape == (b, channels, h, w)
    assert torch.equal(fast, naive)
    assert len(fast.unique()) > 10  # real draws, not a constant image


@pytest.mark.parametrize("size", [(1, 3), (3, 1)])
def test_fast_sampler_equals_naive_sampler_on_thin_images(size, attention_path):
    model = tiny_model(2, size=size, attention=attention_path)
    noise = gumbel_noise((2, 2, *size, 256))
    assert torch.equal(sample(model, 2, noise=noise), sample_naive(model, 2, noise=noise))


def compiled_sampler_follows_weight_changes() -> bool:
    """sample(compile=True) runs the decoders as compiled graphs with the weights frozen in: does
    it draw what the reference draws, before and after the weights change in place (with a
    completion mask)?"""
    model = tiny_model(3, size=(3, 4), dtype=torch.float32)
    b, (h, w) = 2, model.config.image_size
    noise = gumbel_noise((b, 3, h, w, 256)).float()
    known = torch.randint(0, 256, (b, 3, h, w), generator=torch.Generator().manual_seed(2))
    kw = dict(noise=noise, known=known, known_mask=completion_mask(b, 3, h, w))
    naive = sample_naive(model, b, **kw)
    assert torch.equal(sample(model, b, compile=True, **kw), naive)
    randomize_(model, std=0.3, seed=1)  # in place, as an optimizer step or load_state_dict
    naive_new = sample_naive(model, b, **kw)
    assert not torch.equal(naive_new, naive)
    return torch.equal(sample(model, b, compile=True, **kw), naive_new)


def test_compiled_sampler_equals_naive_sampler_and_follows_new_weights():
    assert compiled_sampler_follows_weight_changes()


def test_compiled_sampler_check_catches_stale_graphs(monkeypatch):
    """Negative control: graphs kept across a weight change go on drawing from the old
    weights, and the check above sees it."""
    monkeypatch.setattr(cpu_speedups, "weights_version", lambda model: ())
    assert not compiled_sampler_follows_weight_changes()


def test_bf16_autocast_logits_stay_close_to_fp32():
    model = tiny_model(3, dtype=torch.float32)
    images, logits = recorded_logits(sample, model, 2, generator=torch.Generator().manual_seed(0),
                                     autocast=True)
    with torch.no_grad():
        teacher = model(images).double()
    assert images.dtype == torch.uint8
    torch.testing.assert_close(logits, teacher, atol=0.05, rtol=0)


def test_same_seed_gives_same_images_in_both_samplers():
    model = tiny_model(3)
    fast = sample(model, 2, temperature=0.8, generator=torch.Generator().manual_seed(5))
    naive = sample_naive(model, 2, temperature=0.8, generator=torch.Generator().manual_seed(5))
    again = sample(model, 2, temperature=0.8, generator=torch.Generator().manual_seed(5))
    other = sample(model, 2, temperature=0.8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(fast, naive) and torch.equal(fast, again)
    assert not torch.equal(fast, other)


def forgetful_inner_step(monkeypatch):
    """Broken variant: every decoding step finds its cache emptied, so a pixel never sees the
    pixels to its left (nor a row the rows above) through attention."""
    decode = AxialSelfAttention.decode

    def forgetful(self, x, cache, position):
        cache.zero_()
        return decode(self, x, cache, position)

    monkeypatch.setattr(AxialSelfAttention, "decode", forgetful)


def future_unmasked(monkeypatch):
    """Broken variant: a step's position mask lets it see the whole cache, where positions after
    it still hold the previous row's (or channel's) keys and values."""
    positions = decoding.decoding_positions

    def unmasked(length, like):
        return [p._replace(bias=torch.zeros_like(p.bias)) for p in positions(length, like)]

    monkeypatch.setattr(decoding, "decoding_positions", unmasked)


def is_causal_left_on(monkeypatch):
    """Broken variant: a cached step attends causally instead of through its position mask. With
    SDPA, is_causal aligns its mask top-left: the one query sees only key 0."""
    attend = attention.attend

    def causal_step(q, k, v, causal, path="auto", scale=None, bias=None, **kw):
        return attend(q, k, v, causal or bias is not None, path, scale, None, **kw)

    monkeypatch.setattr(attention, "attend", causal_step)


BROKEN_SAMPLERS = [forgetful_inner_step, future_unmasked, is_causal_left_on]


@pytest.mark.parametrize("break_sampler", BROKEN_SAMPLERS)
def test_parity_check_catches_broken_cached_sampler(monkeypatch, break_sampler, attention_path):
    model = tiny_model(3, attention=attention_path)
    noise = gumbel_noise((3, 3, 4, 5, 256))
    naive = sample_naive(model, 3, noise=noise)
    break_sampler(monkeypatch)
    assert not torch.equal(sample(model, 3, noise=noise), naive)


def recorded_logits(sampler, model, b, **kw):
    """Run a sampler, recording the logits of every subpixel: -> (images, logits [B,C,H,W,V])."""
    c, (h, w) = model.config.channels, model.config.image_size
    seen = torch.full((b, c, h, w, model.config.levels), float("nan"), dtype=torch.float64)

    def record(ci, i, j, logits):
        seen[:, ci, i, j] = logits.double()

    return sampler(model, b, on_logits=record, **kw), seen


def test_cached_logits_equal_teacher_forced_logits():
    model = tiny_model(3, dtype=torch.float32)
    known = torch.randint(0, 256, (2, 3, 4, 5), generator=torch.Generator().manual_seed(3))
    images, logits = recorded_logits(sample, model, 2, generator=torch.Generator().manual_seed(0),
                                     known=known, known_mask=completion_mask(2, 3, 4, 5))
    with torch.no_grad():
        teacher = model(images).double()
    assert not logits.isnan().any()
    torch.testing.assert_close(logits, teacher, atol=1e-4, rtol=0)

    # Negative controls: the same comparison fails one column off, and on a broken sampler.
    assert (logits[..., 1:, :] - teacher[..., :-1, :]).abs().max() > 1e-2
    with pytest.MonkeyPatch.context() as mp:
        forgetful_inner_step(mp)
        broken_images, broken = recorded_logits(sample, model, 2,
                                                generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (broken - model(broken_images).double()).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------
# The draws follow softmax(logits / T).


def chi_square_pvalue(values: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of draws against a distribution, bins expecting < 5 counts merged."""
    observed = torch.bincount(values.long(), minlength=len(probs)).double()
    expected = probs.double() * len(values)
    rare = expected < 5
    observed = torch.cat([observed[~rare], observed[rare].sum()[None]])
    expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
    keep = expected > 0
    statistic = (((observed - expected) ** 2)[keep] / expected[keep]).sum().item()
    if (observed[~keep] > 0).any():  # a draw of probability zero
        return 0.0
    return float(chi2.sf(statistic, df=int(keep.sum()) - 1))


@pytest.mark.parametrize("position", [(0, 1, 0), (1, 2, 2), (2, 3, 4)],
                         ids=["row-start", "mid-row", "last-channel"])
def test_single_unknown_pixel_follows_softmax(position):
    model = tiny_model(3, dtype=torch.float32, std=0.5)  # peaked logits: a sharper test
    temperature, draws = 0.5, 4000
    c, i, j = position
    image = torch.randint(0, 256, (1, 3, 4, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(image, dtype=torch.bool)
    mask[0, c, i, j] = False
    samples = sample(model, draws, temperature=temperature, known=image, known_mask=mask,
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples[:, mask[0]], image[:, mask[0]].expand(draws, -1).to(torch.uint8))
    with torch.no_grad():
        logits = model(image)[0].double() / temperature  # the logits there ignore the pixel
    probs = logits[c, i, j].softmax(-1)
    assert probs.max() > 0.2
    assert chi_square_pvalue(samples[:, c, i, j], probs) > 1e-3
    # Negative control: the distribution one column off is rejected.
    wrong = logits[c, i, (j + 1) % 5].softmax(-1)
    assert chi_square_pvalue(samples[:, c, i, j], wrong) < 1e-6


# ------------------------------------------------------------------------------------------------
# Known pixels, modes, bad input.


def test_known_pixels_are_never_changed_and_a_single_image_broadcasts():
    model = tiny_model(3, dtype=torch.float32)
    image = torch.randint(0, 256, (1, 3, 4, 5), dtype=torch.uint8)
    mask = torch.rand(1, 3, 4, 5) < 0.5
    out = sample(model, 4, known=image, known_mask=mask, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 4, 5)
    assert torch.equal(out[:, mask[0]], image[:, mask[0]].expand(4, -1))
    assert not torch.equal(out[0], out[1])  # the unknown pixels are drawn per image


def test_sampling_uses_eval_mode_and_restores_training_flag():
    model = tiny_model(1, dropout=0.5).train()
    noise = gumbel_noise((2, 1, 4, 5, 256))
    first = sample(model, 2, noise=noise)
    assert model.training
    assert torch.equal(first, sample(model, 2, noise=noise))  # no dropout while sampling
    assert torch.equal(first, sample_naive(model, 2, noise=noise))
    assert torch.equal(model.sample(2, noise=noise), first)


def test_bad_arguments_raise_clear_errors():
    model = tiny_model(3, dtype=torch.float32)
    x = torch.zeros((2, 3, 4, 5), dtype=torch.uint8)
    mask = torch.zeros((2, 3, 4, 5), dtype=torch.bool)
    cases = [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(known=x), "together"),
        (dict(known=x.float(), known_mask=mask), "integer"),
        (dict(known=x, known_mask=mask.int()), "bool"),
        (dict(known=x[:, :2], known_mask=mask[:, :2]), "shape"),
        (dict(known=x + 300 * mask.logical_not().int(), known_mask=mask.logical_not()), "0..255"),
        (dict(noise=torch.zeros(2, 3, 4, 5, 10)), "shape"),
        (dict(noise=torch.zeros(2, 3, 4, 5, 256), generator=torch.Generator()), "not both"),
    ]
    for sampler in (sample, sample_naive):
        for kwargs, message in cases:
            with pytest.raises(ValueError, match=message):
                sampler(model, 2, **kwargs)
        with pytest.raises(ValueError, match="num_samples"):
            sampler(model, 0)


# ------------------------------------------------------------------------------------------------
# sample.py end to end.


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    tiny_model(3, dtype=torch.float32).save_pretrained(run / "export")
    return run


def test_cli_writes_png_grid_and_raw_array(exported_run, tmp_path):
    from PIL import Image

    result = run_cli("--checkpoint", exported_run, "--num-samples", 5, "--batch-size", 3,
                     "--out", tmp_path / "grid.png", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "per image" in result.stdout
    raw = np.load(tmp_path / "grid.npy", allow_pickle=False)
    assert raw.shape == (5, 4, 5, 3) and raw.dtype == np.uint8
    assert Image.open(tmp_path / "grid.png").size[0] > 3 * 5  # a grid of 3 columns


def test_cli_completes_top_rows(exported_run, tmp_path):
    split = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "test.npy", split)
    result = run_cli("--checkpoint", exported_run / "export", "--complete", "test.npy:1",
                     "--rows-given", 2, "--num-samples", 3, "--out", "done.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    done = np.load(tmp_path / "done.npy", allow_pickle=False)
    assert done.shape == (3, 4, 5, 3)
    assert (done[:, :2] == split[1, :2]).all()
    assert (tmp_path / "done.png").is_file()


def test_cli_errors_are_one_clean_line(exported_run, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(np.zeros((4, 5), dtype=np.uint8)).save(tmp_path / "gray.png")
    cases = [
        (["--checkpoint", tmp_path / "missing"], "does not exist"),
        (["--checkpoint", exported_run, "--temperature", 0], "temperature"),
        (["--checkpoint", exported_run, "--complete", "wide.png", "--rows-given", 2], "4x5"),
        (["--checkpoint", exported_run, "--complete", "gray.png", "--rows-given", 2], "channel"),
    ]
    for args, message in cases:
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
