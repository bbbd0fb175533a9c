"""The codec: images come back bit for bit, a file costs the model's exact bits plus a few
bytes, and any file and model that do not belong together are refused with one clear line.

Models are randomised with std 0.5, so their distributions are peaked (the images below cost
about 5 bits/dim), not the near-uniform ones of the official init; the images are drawn from the
model at temperature 0.5, plus one of uniform noise whose values the model finds improbable."""

import importlib.util
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line, randomize_
from PIL import Image

from axial_transformer import AxialTransformer, AxialTransformerConfig, codec, codec_format
from axial_transformer.codec import compress, decompress

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compress_cli, decompress_cli = load_script("compress"), load_script("decompress")


def tiny_model(channels=3, size=(4, 5), seed=0, **overrides) -> AxialTransformer:
    cfg = AxialTransformerConfig(image_size=size, channels=channels, dim=16, heads=2,
                                 encoder_layers=2, outer_layers=2, inner_layers=2, **overrides)
    return randomize_(AxialTransformer(cfg), std=0.5, seed=seed).eval()


def likely_images(model: AxialTransformer, n: int, noise: bool = True) -> torch.Tensor:
    """n images [n, C, H, W] uint8: drawn from the model at T = 0.5, the last one uniform noise
    when `noise` and n > 1."""
    drawn = model.sample(n - (noise and n > 1), temperature=0.5,
                         generator=torch.Generator().manual_seed(n))
    if not noise or n == 1:
        return drawn
    c, (h, w) = model.config.channels, model.config.image_size
    noisy = torch.randint(0, 256, (1, c, h, w), generator=torch.Generator().manual_seed(1),
                          dtype=torch.uint8)
    return torch.cat([drawn, noisy])


def exact_bits(model: AxialTransformer, images: torch.Tensor) -> float:
    """The images' bits under the model, teacher-forced: what a perfect coder would spend."""
    with torch.no_grad():
        return model.subpixel_bits(images).double().sum().item()


def payload_bits(data: bytes) -> int:
    return 8 * len(codec_format.unpack(data)[1])


# One word of the range coder's end (32 bits) plus rounding to whole words.
CODER_END_BITS = 64


@pytest.mark.parametrize("channels, size, count, batch_size",
                         [(3, (4, 5), 5, 2), (1, (5, 3), 1, 4)],
                         ids=["rgb-5-images-batch-2", "gray-1-image"])
def test_round_trip_is_bit_exact(channels, size, count, batch_size, attention_path):
    model = tiny_model(channels, size, attention=attention_path)
    images = likely_images(model, count)
    data = compress(model, images, batch_size=batch_size)
    decoded = decompress(model, data)
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, images)
    header, _ = codec_format.unpack(data)
    assert header.shape == (count, channels, *size)
    assert header.settings["batch_size"] == batch_size
    # Improbable values cost at most the coder's smallest probability, 2^-24: never much more
    # than their exact bits, and sometimes less.
    assert payload_bits(data) <= 1.005 * exact_bits(model, images) + CODER_END_BITS


def test_class_conditional_files_keep_their_labels():
    model = tiny_model(1, (3, 4), num_classes=3)
    labels = torch.tensor([2, 0, -1])
    images = model.sample(3, temperature=0.5, labels=labels,
                          generator=torch.Generator().manual_seed(0))
    data = compress(model, images, batch_size=2, labels=labels)
    assert codec_format.unpack(data)[0].settings["labels"] == [2, 0, -1]
    assert torch.equal(decompress(model, data), images)
    with torch.no_grad():
        exact = model.subpixel_bits(images, labels).double().sum().item()
    assert payload_bits(data) <= 1.005 * exact + CODER_END_BITS
    # Negative control: coded as other classes, the same images give another payload.
    other = compress(model, images, batch_size=2, labels=labels.roll(1))
    assert codec_format.unpack(other)[1] != codec_format.unpack(data)[1]
    with pytest.raises(ValueError, match="pass labels"):
        compress(model, images)


def test_file_takes_the_models_exact_bits():
    model = tiny_model()
    images = likely_images(model, 12, noise=False)
    exact, bits = exact_bits(model, images), payload_bits(compress(model, images, batch_size=8))
    assert exact / images.numel() < 6  # peaked distributions, far from 8 bits/dim
    assert abs(bits - exact) <= 0.005 * exact + CODER_END_BITS, (bits, exact)


def test_probabilities_off_in_the_last_bits_do_not_decode(monkeypatch):
    """Negative control for the round trip: a decoder whose probabilities differ from the
    encoder's in the last bits (its softmax in float64) decodes other values, and says so."""
    model = tiny_model()
    images = likely_images(model, 3)
    data = compress(model, images)
    monkeypatch.setattr(codec, "probabilities",
                        lambda logits: logits.double().softmax(-1).numpy())
    with pytest.raises(ValueError, match="do not decode exactly"):
        decompress(model, data)


def test_recorded_threads_are_used_and_restored(monkeypatch):
    model = tiny_model(1, (3, 3))
    images = likely_images(model, 9)
    seen = []

    def counting_threads(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return codec_decode(*args, **kwargs)

    codec_decode = codec.decode
    monkeypatch.setattr(codec, "decode", counting_threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # more than small batches take, also in a one-thread test worker
    try:
        small, large = compress(model, images, batch_size=4), compress(model, images, batch_size=8)
        assert codec_format.unpack(small)[0].settings["threads"] == 1  # as the sampler's
        assert codec_format.unpack(large)[0].settings["threads"] == 2
        explicit = compress(model, images, batch_size=8, threads=1)
        assert torch.get_num_threads() == 2 and not model.training
        seen.clear()
        assert torch.equal(decompress(model, explicit), images)
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Refusals: another model, a damaged or truncated file, another format or version.


@pytest.fixture(scope="module")
def small_file():
    """A model, two images and their file (~200 bytes, so that every byte can be changed)."""
    model = tiny_model()
    images = likely_images(model, 2)
    return model, images, compress(model, images)


def test_another_model_is_refused(small_file):
    _, _, data = small_file
    with pytest.raises(ValueError, match="compressed with another model"):
        decompress(tiny_model(seed=1), data)
    with pytest.raises(ValueError, match="compressed with another model"):
        decompress(tiny_model(attention="sdpa"), data)  # same weights, another arithmetic


def test_every_changed_byte_is_refused(small_file):
    model, _, data = small_file
    for k in range(len(data)):
        damaged = bytearray(data)
        damaged[k] ^= 0x10
        expected = "not an Axial Transformer codec file" if k < 8 else "damaged"
        with pytest.raises(ValueError, match=expected):
            decompress(model, bytes(damaged))


def test_truncated_files_are_refused(small_file):
    model, _, data = small_file
    for end in range(8, len(data)):
        with pytest.raises(ValueError, match="a truncated .axc file"):
            decompress(model, data[:end])


def test_other_formats_and_versions_are_refused(small_file, tmp_path):
    model, _, data = small_file
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "image.png")
    np.save(tmp_path / "images.npy", np.zeros((1, 4, 5, 3), np.uint8))
    for other in [b"", b"hello", (tmp_path / "image.png").read_bytes(),
                  (tmp_path / "images.npy").read_bytes()]:
        with pytest.raises(ValueError, match="not an Axial Transformer codec file"):
            decompress(model, other)
    newer = data[:8] + (2).to_bytes(2, "little") + data[10:-4]
    with pytest.raises(ValueError, match="format version 2; this version of the toolkit reads "
                                         "version 1"):
        decompress(model, newer + zlib.crc32(newer).to_bytes(4, "little"))
    header, payload = codec_format.unpack(data)
    with pytest.MonkeyPatch.context() as mp:  # a later writer that adds a setting
        mp.setattr(codec_format, "SETTINGS", (*codec_format.SETTINGS, "palette"))
        later = codec_format.pack(
            codec_format.Header(header.fingerprint, header.shape, header.levels,
                                {**header.settings, "palette": [0, 1]}, header.image_crcs),
            payload)
    with pytest.raises(ValueError, match="exactly batch_size, device, threads"):
        decompress(model, later)


def without_checks(monkeypatch, *names: str) -> None:
    """Broken variants of the codec: the named checks do nothing."""
    for name in names:
        module = codec_format if name == "check_integrity" else codec
        monkeypatch.setattr(module, name, lambda *args: None)


def test_without_its_checks_the_codec_returns_wrong_pixels(small_file, monkeypatch):
    """Negative controls: what the refusals above stand between. A payload byte changed, or
    another model, decode to wrong pixels; with the file's checksum or the fingerprint gone,
    each image's checksum still refuses them; with those gone too, they come back silently."""
    model, images, data = small_file
    damaged = bytearray(data)
    damaged[-10] ^= 0x10  # in the payload
    other = tiny_model(seed=1)
    without_checks(monkeypatch, "check_integrity", "check_same_model")
    for case_model, case_data in ((model, bytes(damaged)), (other, data)):
        with pytest.raises(ValueError, match="do not decode exactly"):
            decompress(case_model, case_data)
    without_checks(monkeypatch, "check_pixels")
    for case_model, case_data in ((model, bytes(damaged)), (other, data)):
        assert not torch.equal(decompress(case_model, case_data), images)


def test_bad_input_raises_clear_errors():
    model = tiny_model(1, (3, 3))
    images = likely_images(model, 2)
    cases = [
        (dict(images=images.float()), "integer pixel values"),
        (dict(images=images[:, :, :2]), r"shape \[B, 1, 3, 3\]"),
        (dict(images=images[:0]), "no images"),
        (dict(images=images, batch_size=0), "batch_size must be a positive integer"),
        (dict(images=images, threads=0), "threads must be a positive integer"),
        (dict(images=images, model=tiny_model(1, (3, 3)).double()), "runs the model in float32"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            compress(**{"model": model, **kwargs})


# ------------------------------------------------------------------------------------------------
# compress.py and decompress.py, through their main().


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Exported RGB 4x5 and one-channel 3x4 models, and an RGB model with other weights."""
    root = tmp_path_factory.mktemp("exports")
    tiny_model().save_pretrained(root / "rgb")
    tiny_model(1, (3, 4)).save_pretrained(root / "gray")
    tiny_model(seed=1).save_pretrained(root / "other")
    return root


def run(capsys, script, *args) -> tuple[int, str, str]:
    code = script.main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_round_trip_of_files_folders_and_array_ranges(exports, tmp_path, capsys):
    images = likely_images(tiny_model(), 7).permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
    (tmp_path / "photos").mkdir()
    for k, name in enumerate(["b.png", "a.png"]):
        Image.fromarray(images[k]).save(tmp_path / "photos" / name)
    Image.fromarray(images[2]).save(tmp_path / "single.png")
    np.save(tmp_path / "split.npy", images[3:])
    code, out, _ = run(capsys, compress_cli, "--checkpoint", exports / "rgb",
                       tmp_path / "photos", tmp_path / "single.png",
                       f"{tmp_path / 'split.npy'}:1:3", f"{tmp_path / 'split.npy'}",
                       "-o", tmp_path / "all.axc", "--batch-size", 3)
    assert code == 0 and "bytes" in out and "bits/dim" in out and "images/s" in out
    expected = np.concatenate([images[[1, 0, 2]], images[4:6], images[3:]])  # a.png first

    code, out, _ = run(capsys, decompress_cli, tmp_path / "all.axc", "--checkpoint",
                       exports / "rgb", "--out", tmp_path / "back.npy")
    assert code == 0 and "9 images of 3x4x5" in out
    assert np.array_equal(np.load(tmp_path / "back.npy", allow_pickle=False), expected)
    code, _, _ = run(capsys, decompress_cli, tmp_path / "all.axc", "--checkpoint",
                     exports / "rgb", "--out", tmp_path / "pngs")
    pngs = sorted((tmp_path / "pngs").iterdir())
    assert code == 0 and [p.name for p in pngs[:2]] == ["00000.png", "00001.png"]
    assert np.array_equal(np.stack([np.array(Image.open(p)) for p in pngs]), expected)


def test_cli_round_trip_of_one_channel_pngs(exports, tmp_path, capsys):
    images = likely_images(tiny_model(1, (3, 4)), 2)[:, 0].numpy()  # [N, H, W]
    for k, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{k}.png")
    code, _, _ = run(capsys, compress_cli, "--checkpoint", exports / "gray", tmp_path / "0.png",
                     tmp_path / "1.png", "-o", tmp_path / "gray.axc")
    assert code == 0
    code, _, _ = run(capsys, decompress_cli, tmp_path / "gray.axc", "--checkpoint",
                     exports / "gray", "--out", tmp_path / "back")
    back = [np.array(Image.open(tmp_path / "back" / f"0000{k}.png")) for k in range(2)]
    assert code == 0 and np.array_equal(np.stack(back), images)


def test_cli_errors_are_one_clean_line(exports, tmp_path, capsys):
    rgb = ["--checkpoint", exports / "rgb"]
    Image.fromarray(np.zeros((5, 4, 3), np.uint8)).save(tmp_path / "tall.png")
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "fits.png")
    np.save(tmp_path / "split.npy", np.zeros((3, 4, 5, 3), np.uint8))
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").write_text("")
    compress_cases = [
        (["--checkpoint", tmp_path / "missing", "fits.png", "-o", "x.axc"], "does not exist"),
        ([*rgb, "tall.png", "-o", "x.axc"], "tall.png: the model takes 4x5 images with 3 "
                                            "channel(s), got 5x4 with 3"),
        ([*rgb, "split.npy:1", "-o", "x.axc"], "expected PATH.npy or PATH.npy:START:STOP"),
        ([*rgb, "split.npy:3:", "-o", "x.axc"], "selects no images (the array holds 3)"),
        ([*rgb, "empty", "-o", "x.axc"], "a folder without PNG or JPEG files"),
        ([*rgb, "absent.png", "-o", "x.axc"], "absent.png not found"),
        ([*rgb, "fits.png", "-o", "x.bin"], "expected a .axc file"),
        ([*rgb, "fits.png", "-o", "x.axc", "--batch-size", 0], "--batch-size must be at least 1"),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        for args, message in compress_cases:
            code, _, err = run(capsys, compress_cli, *args)
            assert code == 2 and message in error_line(err), (args, err)
        assert not (tmp_path / "x.axc").exists()
        assert run(capsys, compress_cli, *rgb, "fits.png", "-o", "fits.axc")[0] == 0
    good = tmp_path / "fits.axc"
    damaged = bytearray(good.read_bytes())
    damaged[-10] ^= 1
    (tmp_path / "damaged.axc").write_bytes(bytes(damaged))
    decompress_cases = [
        ([good, "--checkpoint", exports / "other"], "compressed with another model"),
        ([tmp_path / "damaged.axc", *rgb], "damaged.axc: a damaged .axc file"),
        ([tmp_path / "fits.png", *rgb], "not an Axial Transformer codec file"),
        ([tmp_path / "nothing.axc", *rgb], "nothing.axc not found"),
    ]
    for args, message in decompress_cases:
        code, _, err = run(capsys, decompress_cli, *args, "--out", tmp_path / "out")
        assert code == 2 and message in error_line(err), (args, err)
    code, _, err = run(capsys, decompress_cli, good, *rgb, "--out", tmp_path / "taken")
    assert code == 2 and "an existing file" in error_line(err)
    assert not (tmp_path / "out").exists()


def test_cli_script_reports_a_bad_file_in_one_line(tmp_path):
    """The scripts run as scripts: one line on stderr and exit code 2, no traceback."""
    (tmp_path / "notes.axc").write_text("not compressed")
    result = subprocess.run(
        [sys.executable, str(ROOT / "decompress.py"), "notes.axc", "--checkpoint", "none",
         "--out", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "notes.axc: not an Axial Transformer codec file" in error_line(result.stderr)
