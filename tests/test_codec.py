"""The codec: images come back bit for bit, a file costs the model's exact bits plus a few
bytes, and any file and model that do not belong together are refused with one clear line.

Models are randomised with std 0.5, so their distributions are peaked (the images below cost
about 5 bits/dim), not the near-uniform ones of the official init; the images are drawn from the
model at temperature 0.5, plus one of uniform noise whose values the model finds improbable."""

import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import error_line, randomize_
from PIL import Image

from axial_transformer import AxialTransformer, AxialTransformerConfig
from axial_transformer.codec import coder as codec
from axial_transformer.codec import format as codec_format
from axial_transformer.codec.coder import compress, decompress
from axial_transformer.codec.exact_model import ExactAxialTransformer

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compress_cli, decompress_cli = load_script("compress"), load_script("decompress")


def tiny_model(channels=3, size=(4, 5), seed=0, attention="auto", **overrides
               ) -> AxialTransformer:
    cfg = AxialTransformerConfig(image_size=size, channels=channels, dim=16, heads=2,
                                 encoder_layers=2, outer_layers=2, inner_layers=2, **overrides)
    return randomize_(AxialTransformer(cfg).set_attention(attention), std=0.5, seed=seed).eval()


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
    decoded = decompress(model, data, batch_size=3)
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, images)
    header, _ = codec_format.unpack(data)
    assert header.shape == (count, channels, *size) and header.settings == {}
    # Improbable values cost at most the coder's smallest probability, 2^-24: never much more
    # than their exact bits, and sometimes less.
    assert payload_bits(data) <= 1.005 * exact_bits(model, images) + CODER_END_BITS
    # The float model's attention path changes its float arithmetic, not the exact one's.
    assert data == compress(tiny_model(channels, size, attention="matmul"), images)


def test_file_does_not_depend_on_batch_size_or_threads():
    """The same bytes at every batch size and thread count, and any of them decodes it: each
    image's arithmetic is exact, whichever lane it runs in and however the sums are split."""
    model = tiny_model(1, (3, 3))
    images = likely_images(model, 70)  # more than one group of 64
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        files = {compress(model, images, batch_size=batch_size, threads=count)
                 for batch_size, count in [(1, 1), (3, 2), (64, 2), (70, 1)]}
        assert len(files) == 1 and torch.get_num_threads() == 1  # restored
        data = files.pop()
        for batch_size in (1, 5, 64):
            assert torch.equal(decompress(model, data, batch_size=batch_size, threads=2), images)
    finally:
        torch.set_num_threads(threads)


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


def test_probabilities_off_by_one_count_do_not_decode(monkeypatch):
    """Negative control for the round trip: a decoder whose frequencies differ from the
    encoder's by one count in 2^24 (moved from value 0 to value 1) decodes other values, and
    says so."""
    model = tiny_model()
    images = likely_images(model, 3)
    data = compress(model, images)
    exact_frequencies = codec.frequencies

    def off_by_one(logits, exp):
        counts = exact_frequencies(logits, exp)
        counts[:, 0] -= 1
        counts[:, 1] += 1
        return counts

    monkeypatch.setattr(codec, "frequencies", off_by_one)
    with pytest.raises(ValueError, match="does not decode to the pixels that were compressed"):
        decompress(model, data)


def test_exact_layers_give_the_same_sums_in_any_order():
    """The property the whole arithmetic rests on: an exact layer's matmul gives the same bits
    summed in any order (BLAS, forward, reversed, in blocks, and as int64), while the float
    layer it comes from does not (the negative control)."""
    model = tiny_model(1, (3, 3))
    layer = ExactAxialTransformer(model).outer_decoder[0].mlp_in
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2**19, 2**19, (64, model.config.dim), generator=g).double()

    def orders(weight: torch.Tensor, inputs: torch.Tensor) -> list[torch.Tensor]:
        products = inputs[:, None, :] * weight[None]  # [B, out, in]
        return [F.linear(inputs, weight), products.sum(-1), products.flip(-1).sum(-1),
                products.view(*products.shape[:2], 4, -1).sum(-1).sum(-1),
                products.cumsum(-1)[..., -1]]

    exact = orders(layer.weight, x)
    assert all(torch.equal(exact[0], other) for other in exact[1:])
    as_int = (x.long()[:, None, :] * (layer.weight / layer.unit).long()[None]).sum(-1)
    assert torch.equal(as_int.double() * layer.unit, exact[0])
    float_weight = model.outer_decoder.blocks[0].mlp[0].weight.detach()
    floats = orders(float_weight, torch.randn(64, model.config.dim, generator=g))
    assert not all(torch.equal(floats[0], other) for other in floats[1:])


def test_exact_model_stays_close_to_the_float_model():
    """The quantised arithmetic costs next to nothing: its bits are within 0.2% of the float
    model's on peaked distributions."""
    model = tiny_model()
    images = likely_images(model, 12, noise=False)
    bits = payload_bits(compress(model, images))
    exact = exact_bits(model, images)
    assert abs(bits - exact) <= 0.002 * exact + CODER_END_BITS, (bits, exact)


# ------------------------------------------------------------------------------------------------
# Golden files: a small trained model and a file made with it (tests/golden/README.md).

GOLDEN = ROOT / "tests" / "golden"


def golden() -> tuple[AxialTransformer, torch.Tensor, bytes]:
    from axial_transformer.training.checkpoint import load_trained_model

    model, _ = load_trained_model(GOLDEN / "model")
    images = torch.from_numpy(np.load(GOLDEN / "images.npy", allow_pickle=False))
    return model, images.permute(0, 3, 1, 2), (GOLDEN / "images.axc").read_bytes()


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="no CUDA GPU"))])
def test_golden_file_decodes_and_its_images_encode_to_the_same_bytes(device):
    """Any change that would leave files already written unreadable (a number or an operation
    of the arithmetic, the stream's order, the format) fails here: raise ARITHMETIC_VERSION or
    the format version, and make new golden files. On a GPU: the file written on a CPU decodes
    on CUDA, and CUDA writes the same bytes (which the CPU decodes)."""
    model, images, data = golden()
    model.to(device)
    assert torch.equal(decompress(model, data, batch_size=5), images)
    assert compress(model, images, batch_size=3) == data
    # Its config.json still holds two run-time choices that older versions saved with the model.
    saved = json.loads((GOLDEN / "model" / "config.json").read_text())
    assert saved["gradient_checkpointing"] is False and saved["attention"] == "auto"


def test_a_file_written_under_other_cpu_kernels_decodes_here(tmp_path):
    """compress.py under torch's portable kernels (ATEN_CPU_CAPABILITY=default, and MKL's
    matrix products at SSE4.2: as a CPU without AVX computes) with 2 threads at batch 64;
    decompress.py under this machine's own kernels with 1 thread at batch 1: the same file as the
    golden one, decoded exactly."""
    _, images, data = golden()
    portable = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    env = {k: v for k, v in os.environ.items() if k not in portable}
    env["PYTHONPATH"] = str(ROOT)

    def script(name: str, run_env: dict, *args) -> None:
        result = subprocess.run([sys.executable, str(ROOT / name), *map(str, args)],
                                env=run_env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr

    script("compress.py", {**env, **portable}, "--checkpoint", GOLDEN / "model",
           GOLDEN / "images.npy", "-o", tmp_path / "default.axc", "--threads", 2,
           "--batch-size", 64)
    assert (tmp_path / "default.axc").read_bytes() == data
    script("decompress.py", env, tmp_path / "default.axc", "--checkpoint", GOLDEN / "model",
           "--out", tmp_path / "back.npy", "--threads", 1, "--batch-size", 1)
    back = np.load(tmp_path / "back.npy", allow_pickle=False)
    assert np.array_equal(back, images.permute(0, 2, 3, 1).numpy())


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
    with pytest.raises(ValueError, match="images of 3x4x5 with 256 levels; this model's are "
                                         "1x4x5"):
        decompress(tiny_model(channels=1), data)


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
    newer = data[:8] + (3).to_bytes(2, "little") + data[10:-4]
    with pytest.raises(ValueError, match="format version 3; this version of the toolkit reads "
                                         "version 2"):
        decompress(model, sealed(newer))
    # A file of format version 1, whose arithmetic depended on the machine: named, refused.
    older = data[:8] + (1).to_bytes(2, "little") + data[10:-4]
    with pytest.raises(ValueError, match="format version 1, whose probabilities depended on "
                                         "the machine"):
        decompress(model, sealed(older))
    header, payload = codec_format.unpack(data)
    other_arithmetic = replace(header, arithmetic=header.arithmetic + 1)
    with pytest.raises(ValueError, match="arithmetic version 2; this version of the toolkit "
                                         "computes version 1"):
        decompress(model, codec_format.pack(other_arithmetic, payload))


def sealed(body: bytes) -> bytes:
    """A file's body with its closing CRC-32 recomputed, as a hostile writer would."""
    return body + zlib.crc32(body).to_bytes(4, "little")


def hostile(header: codec_format.Header, payload: bytes, settings: bytes | None = None,
            **fields) -> bytes:
    """A file whose header says what `fields` say (and `settings`, raw), sealed anew."""
    header = replace(header, **fields)
    settings = json.dumps(header.settings).encode() if settings is None else settings
    n, c, h, w = header.shape
    body = b"".join([
        codec_format._FIXED.pack(codec_format.MAGIC, codec_format.VERSION, header.arithmetic,
                                 header.fingerprint, n, c, h, w, header.levels, len(settings)),
        settings, struct.pack(f"<{n}I", *(list(header.image_crcs) * n)[:n]),
        struct.pack("<Q", len(payload)), payload])
    return sealed(body)


def test_hostile_headers_are_refused_in_one_line(small_file, tmp_path, exports, capsys):
    """Headers that a writer made up, their checksum recomputed: each is refused with one line,
    before anything the size of their claims is allocated."""
    model, _, data = small_file
    header, payload = codec_format.unpack(data)
    conditional = tiny_model(1, (3, 4), num_classes=3)
    images = conditional.sample(2, labels=torch.tensor([0, 1]),
                                generator=torch.Generator().manual_seed(0))
    labelled = compress(conditional, images, labels=torch.tensor([0, 1]))
    c_header, c_payload = codec_format.unpack(labelled)
    nested = b"[" * 100_000 + b"]" * 100_000
    cases = [
        (model, hostile(header, payload, shape=(2, 3, 5, 4)), "images of 3x5x4 with 256 levels; "
                                                               "this model's are 3x4x5"),
        (model, hostile(header, payload, shape=(1, 65535, 65535, 65535)),
         "claims 281,462,092,005,375 subpixels in a payload of"),
        (model, hostile(header, payload, settings=nested), "its header does not parse"),
        (model, hostile(header, payload, settings=b'{"device": "meta"}'),
         r"the settings \['device'\]; version 2 has at most labels and names"),
        (model, hostile(header, payload, settings=b'{"threads": 10000}'),
         r"the settings \['threads'\]"),
        (model, hostile(header, payload, settings=b'{"names": ["../a.png", "b.png"]}'),
         "names are not 2 distinct file names"),
        (model, hostile(header, payload, settings=b'{"labels": [0, 1]}'),
         "holds labels, and this model is not class-conditional"),
        (conditional, hostile(c_header, c_payload, settings=b"{}"),
         "holds no labels, and this model is class-conditional"),
        (conditional, hostile(c_header, c_payload, settings=b'{"labels": [0, 7]}'),
         "labels go up to 7; this model has 3 classes"),
    ]
    for case_model, case_data, message in cases:
        with pytest.raises(ValueError, match=message):
            decompress(case_model, case_data)
    # Through decompress.py: one line, exit code 2.
    (tmp_path / "tall.axc").write_bytes(cases[0][1])
    code, _, err = run(capsys, decompress_cli, tmp_path / "tall.axc", "--checkpoint",
                       exports / "rgb", "--out", tmp_path / "out")
    assert code == 2 and "this model's are 3x4x5" in error_line(err)
    # Wrong labels decode to other pixels, which the checksums catch and the message blames on
    # the file, not on the machine.
    swapped = hostile(c_header, c_payload, settings=b'{"labels": [1, 0]}')
    with pytest.raises(ValueError, match="image 0 does not decode to the pixels that were "
                                         "compressed .* payload or labels were changed"):
        decompress(conditional, swapped)


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

    def flipped(offset: int) -> bytes:  # a bit changed near the payload's end
        damaged = bytearray(data)
        damaged[-offset] ^= 0x10
        return bytes(damaged)

    def silently_wrong(case_model: AxialTransformer, case_data: bytes) -> bool:
        try:
            return not torch.equal(decompress(case_model, case_data), images)
        except ValueError:
            return False

    without_checks(monkeypatch, "check_integrity", "check_same_model")
    for case_model, case_data in ((model, flipped(10)), (tiny_model(seed=1), data)):
        with pytest.raises(ValueError, match="does not decode to the pixels"):
            decompress(case_model, case_data)
    without_checks(monkeypatch, "check_pixels")
    # A changed byte or another model may also lead the range decoder off its data, so that it
    # refuses on its own, checks or not. Which ones do depends on the payload's bytes, and so on
    # the CPU's kernels through the sampled images: some must decode silently to wrong pixels.
    assert any(silently_wrong(model, flipped(offset)) for offset in range(10, 42))
    assert any(silently_wrong(tiny_model(seed=seed), data) for seed in range(1, 9))


def test_bad_input_raises_clear_errors():
    model = tiny_model(1, (3, 3))
    images = likely_images(model, 2)
    cases = [
        (dict(images=images.float()), "integer pixel values"),
        (dict(images=images[:, :, :2]), r"shape \[B, 1, 3, 3\]"),
        (dict(images=images[:0]), "no images"),
        (dict(images=images, batch_size=0), "batch_size must be a positive integer"),
        (dict(images=images, threads=0), "threads must be a positive integer"),
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
    pngs = sorted((tmp_path / "pngs").glob("*.png"))
    assert code == 0 and [p.name for p in pngs[:2]] == ["00000.png", "00001.png"]
    assert np.array_equal(np.stack([np.array(Image.open(p)) for p in pngs]), expected)


def test_cli_keeps_file_names_and_replaces_an_earlier_output(exports, tmp_path, capsys):
    """PNGs come back under the names they were compressed from; a second output into the same
    folder replaces the first whole (no stale PNG of a larger earlier set stays beside it)."""
    images = likely_images(tiny_model(1, (3, 4)), 3)[:, 0].numpy()  # [N, H, W]
    names = ["cat.png", "dog.jpg", "cat.jpeg"]  # two stems alike: the second is cat-2.png
    for name, image in zip(names, images, strict=True):
        Image.fromarray(image).save(tmp_path / name, "PNG")
    gray = ["--checkpoint", exports / "gray"]
    code, _, _ = run(capsys, compress_cli, *gray, *(tmp_path / n for n in names),
                     "-o", tmp_path / "three.axc")
    code_one, _, _ = run(capsys, compress_cli, *gray, tmp_path / "dog.jpg",
                         "-o", tmp_path / "one.axc")
    assert code == code_one == 0
    out = tmp_path / "back"
    assert run(capsys, decompress_cli, tmp_path / "three.axc", *gray, "--out", out)[0] == 0
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["cat-2.png", "cat.png", "dog.png"]
    for name, image in zip(["cat.png", "dog.png", "cat-2.png"], images, strict=True):
        assert np.array_equal(np.array(Image.open(out / name)), image)
    code, out_text, _ = run(capsys, decompress_cli, tmp_path / "one.axc", *gray, "--out", out)
    assert code == 0 and [p.name for p in out.glob("*.png")] == ["dog.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".back")]  # no leftovers
    # A folder decompress.py did not write is not replaced.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, err = run(capsys, decompress_cli, tmp_path / "one.axc", *gray,
                       "--out", tmp_path / "mine")
    assert code == 2 and "a folder that decompress.py did not write" in error_line(err)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_cli_full_disk_leaves_the_earlier_output_whole(exports, tmp_path, capsys, monkeypatch):
    """A write that fails halfway (ENOSPC on the second PNG) leaves the earlier output as it
    was and nothing beside it; the command says its figures, then the error in one line."""
    import errno

    from PIL import Image as PILImage

    images = likely_images(tiny_model(1, (3, 4)), 3)[:, 0].numpy()
    np.save(tmp_path / "three.npy", images[..., None])
    gray = ["--checkpoint", exports / "gray"]
    assert run(capsys, compress_cli, *gray, tmp_path / "three.npy", "-o",
               tmp_path / "three.axc")[0] == 0
    out = tmp_path / "out"
    assert run(capsys, decompress_cli, tmp_path / "three.axc", *gray, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    save, calls = PILImage.Image.save, []

    def full_disk(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "save", full_disk)
    code, text, err = run(capsys, decompress_cli, tmp_path / "three.axc", *gray, "--out", out)
    assert code == 2 and "3 images of 1x3x4" in text and "bits/dim" in text
    assert f"could not write {out}: No space left on device" in last_line(err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "three.axc", "three.npy"]
    # compress.py: the figures, then one line; no file, no temporary file.
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    code, text, err = run(capsys, compress_cli, *gray, tmp_path / "three.npy", "-o",
                          tmp_path / "again.axc")
    assert code == 2 and "bits/dim" in text
    assert "could not write" in last_line(err) and "again.axc" in last_line(err)
    assert not list(tmp_path.glob("*again*"))


def last_line(err: str) -> str:
    """stderr's error line after the progress bars of a command that computed before failing."""
    *_, line = err.strip().splitlines()
    assert line.startswith("error: ") and "Traceback" not in err
    return line


def test_cli_unwritable_outputs_are_refused_before_compute(exports, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_folder.axc").mkdir()
    np.save(tmp_path / "one.npy", np.zeros((1, 4, 5, 3), np.uint8))
    rgb = ["--checkpoint", exports / "rgb", tmp_path / "one.npy"]
    cases = [(tmp_path / "a_folder.axc", "an existing folder; expected a file name"),
             (tmp_path / "a_file" / "x.axc", "is a file, not a folder")]
    for out, message in cases:
        code, text, err = run(capsys, compress_cli, *rgb, "-o", out)
        assert code == 2 and message in error_line(err) and text == ""
    assert run(capsys, compress_cli, *rgb, "-o", tmp_path / "one.axc")[0] == 0
    for out, message in [(tmp_path / "a_file" / "back", "is a file, not a folder"),
                         (tmp_path / "a_file" / "x.npy", "is a file, not a folder")]:
        code, text, err = run(capsys, decompress_cli, tmp_path / "one.axc", "--checkpoint",
                              exports / "rgb", "--out", out)
        assert code == 2 and message in error_line(err) and text == ""


def test_cli_compresses_for_a_class_conditional_model(tmp_path, capsys):
    model = tiny_model(1, (3, 4), num_classes=3)
    model.save_pretrained(tmp_path / "conditional")
    images = model.sample(2, labels=torch.tensor([2, 0]),
                          generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "two.npy", images.permute(0, 2, 3, 1).numpy())
    args = ["--checkpoint", tmp_path / "conditional", tmp_path / "two.npy", "-o",
            tmp_path / "two.axc"]
    code, _, err = run(capsys, compress_cli, *args)
    assert code == 2 and "this model is class-conditional: pass labels" in error_line(err)
    code, _, err = run(capsys, compress_cli, *args, "--labels", "2,0,1")
    assert code == 2 and "--labels: 3 classes for 2 images" in error_line(err)
    assert run(capsys, compress_cli, *args, "--labels", "2,0")[0] == 0
    assert codec_format.unpack((tmp_path / "two.axc").read_bytes())[0].settings == \
        {"labels": [2, 0]}
    code, _, _ = run(capsys, decompress_cli, tmp_path / "two.axc", "--checkpoint",
                     tmp_path / "conditional", "--out", tmp_path / "back.npy")
    assert code == 0
    assert np.array_equal(np.load(tmp_path / "back.npy"), images.permute(0, 2, 3, 1).numpy())


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
