"""Clips: the built-in moving digits, prepare from a .npy, a GIF folder and an MP4 folder (files
written here), --holdout, the errors, and open_split with frames."""

import numpy as np
import pytest
import torch
from PIL import Image

from axial_transformer.data import open_split, prepare, prepare_holdout
from axial_transformer.data.__main__ import main
from axial_transformer.data.clips import PYAV_HINT
from axial_transformer.data.moving_digits import (
    DIRECTIONS,
    bounce,
    digit_images,
    load_digits,
    moving_digits,
    moving_digits_clips,
)


def random_clips(n, t=4, h=6, w=5, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, t, h, w, c), dtype=np.uint8)


def write_gif(path, clip):
    """A GIF of `clip` [T, H, W, 1] (grayscale: palette GIFs keep 256 grays exactly)."""
    frames = [Image.fromarray(frame[..., 0]) for frame in clip]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0,
                   optimize=False, disposal=1)


def write_mp4(path, frames, size=(16, 16)):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((*size, 3), 20 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def quiet(fn, *args, **kw):
    return fn(*args, progress=False, **kw)


# ---- moving digits ----


def test_digits_are_scikit_learns():
    from sklearn.datasets import load_digits as sklearn_digits

    np.testing.assert_array_equal(load_digits(), sklearn_digits().images)


def test_moving_digits_shape_dtype_and_determinism():
    clips = moving_digits("train", count=64)
    assert clips.shape == (64, 8, 16, 16, 1) and clips.dtype == np.uint8
    assert clips.max() == 255 and clips.min() == 0
    assert moving_digits("train", count=64).tobytes() == clips.tobytes()
    assert moving_digits("train", count=64, seed=1).tobytes() != clips.tobytes()
    # The digits move: consecutive frames differ in most clips.
    assert (clips[:, 1:] != clips[:, :-1]).any(axis=(2, 3, 4)).mean() > 0.9


def test_moving_digits_train_and_test_share_no_digit():
    train, test = digit_images("train")[1], digit_images("test")[1]
    assert len(train) + len(test) == 1797 and not set(train) & set(test)
    _, used = moving_digits_clips("test", count=200)
    assert set(used.ravel()) <= set(test)


def test_moving_digits_stay_inside_the_canvas():
    """Every frame has ink, and the fold keeps corners inside 0..room (the exact check, one digit
    a clip, is below)."""
    clips, _ = moving_digits_clips("train", count=200, frames=12, image_size=(20, 24))
    ink = clips.astype(np.int64).sum(axis=(2, 3, 4))
    assert (ink.min(axis=1) > 0).all()
    assert bounce(np.arange(-3.0, 12.0), 4).min() >= 0 and bounce(np.arange(20.0), 4).max() <= 4
    np.testing.assert_array_equal(bounce(np.arange(10.0), 3), [0, 1, 2, 3, 2, 1, 0, 1, 2, 3])
    big = moving_digits("test", count=8, frames=4, image_size=(64, 64))
    assert big.shape == (8, 4, 64, 64, 1)


def test_a_single_digit_keeps_all_its_ink_in_every_frame(monkeypatch):
    """Negative control of the check above: with one digit per clip, the sum of a frame's pixels
    is exactly the digit's in every frame (a digit clipped by an edge would lose some)."""
    from axial_transformer.data import moving_digits as md

    monkeypatch.setattr(md, "DIGITS_PER_CLIP", 1)
    digits, index = digit_images("train")
    clips, used = moving_digits_clips("train", count=100, frames=10, image_size=(12, 16))
    ink = {i: int(d.astype(np.int64).sum()) for i, d in zip(index, digits, strict=True)}
    sums = clips.astype(np.int64).sum(axis=(2, 3, 4))
    np.testing.assert_array_equal(sums, np.array([[ink[u]] * 10 for u in used[:, 0]]))


def test_digits_move_a_whole_pixel_a_frame(monkeypatch):
    """With one digit a clip, each frame is the one before shifted by one pixel in one of the 8
    directions, exactly (bounces included): no rounding jitter, so two frames tell the next."""
    from axial_transformer.data import moving_digits as md

    monkeypatch.setattr(md, "DIGITS_PER_CLIP", 1)
    clips = moving_digits("train", count=50, frames=10)[..., 0]
    for clip in clips:
        for before, after in zip(clip[:-1], clip[1:], strict=True):
            assert any(np.array_equal(np.roll(before, tuple(d), (0, 1)), after) for d in DIRECTIONS)


def test_moving_digits_are_fast():
    import time

    start = time.perf_counter()
    moving_digits("train", count=4096)
    assert time.perf_counter() - start < 1.0


def test_moving_digits_refuse_a_canvas_too_small():
    with pytest.raises(ValueError, match="do not fit"):
        moving_digits("train", count=4, image_size=(6, 6))


# ---- prepare ----


def test_prepare_npy_of_clips_and_grayscale_clips(tmp_path):
    clips = random_clips(5)
    np.save(tmp_path / "clips.npy", clips)
    assert quiet(prepare, tmp_path / "clips.npy", tmp_path / "out.npy") == 5
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), clips)
    assert quiet(prepare, tmp_path / "clips.npy", tmp_path / "first.npy", frames=2) == 5
    np.testing.assert_array_equal(np.load(tmp_path / "first.npy"), clips[:, :2])
    np.save(tmp_path / "gray.npy", clips[..., 0])  # [N, T, H, W]
    assert quiet(prepare, tmp_path / "gray.npy", tmp_path / "g.npy", frames=4, channels=1) == 5
    np.testing.assert_array_equal(np.load(tmp_path / "g.npy"), clips[..., :1])
    with pytest.raises(ValueError, match="fewer than --frames 9"):
        quiet(prepare, tmp_path / "clips.npy", tmp_path / "x.npy", frames=9)


def test_prepare_resizes_clips_frame_by_frame(tmp_path):
    from axial_transformer.data.image_files import resize_box

    clips = random_clips(3, t=2, h=8, w=8)
    np.save(tmp_path / "clips.npy", clips)
    with pytest.raises(ValueError, match="is 8x8, expected 4x4; pass --resize"):
        quiet(prepare, tmp_path / "clips.npy", tmp_path / "out.npy", image_size=(4, 4))
    quiet(prepare, tmp_path / "clips.npy", tmp_path / "out.npy", image_size=(4, 4), resize=True)
    out = np.load(tmp_path / "out.npy")
    assert out.shape == (3, 2, 4, 4, 3)
    np.testing.assert_array_equal(out[1, 1], resize_box(clips[1, 1], (4, 4)))


def test_prepare_gif_folder_with_holdout(tmp_path):
    clips = random_clips(10, t=5, c=1)
    (tmp_path / "gifs" / "sub").mkdir(parents=True)
    for i, clip in enumerate(clips):
        write_gif(tmp_path / "gifs" / ("sub" if i % 2 else "") / f"{i:02d}.gif", clip)
    short = random_clips(1, t=2, c=1)[0]
    write_gif(tmp_path / "gifs" / "short.gif", short)
    with pytest.warns(UserWarning, match=r"skipped 1 clip\(s\) .*shorter than 4.*short.gif"):
        train, test = quiet(prepare_holdout, tmp_path / "gifs", tmp_path / "out", 0.3,
                            frames=4, channels=1)
    assert (train, test) == (7, 3)
    got = np.concatenate([np.load(tmp_path / "out" / f"{s}.npy") for s in ("train", "test")])
    # sorted by relative path: 00, 02, ..., 08, then sub/01, sub/03, ...
    expected = clips[[0, 2, 4, 6, 8, 1, 3, 5, 7, 9]][:, :4]
    rows = sorted(got.tobytes() for got in got)
    assert rows == sorted(clip.tobytes() for clip in expected)  # each in exactly one split
    rgb = quiet(prepare, tmp_path / "gifs" / "sub", tmp_path / "rgb.npy", frames=5)
    assert rgb == 5 and np.load(tmp_path / "rgb.npy").shape == (5, 5, 6, 5, 3)


def test_prepare_mp4_folder(tmp_path):
    (tmp_path / "videos").mkdir()
    write_mp4(tmp_path / "videos" / "a.mp4", 6)
    write_mp4(tmp_path / "videos" / "b.mp4", 8)
    assert quiet(prepare, tmp_path / "videos", tmp_path / "out.npy", frames=6) == 2
    out = np.load(tmp_path / "out.npy")
    assert out.shape == (2, 6, 16, 16, 3)
    # mpeg4 is lossy: each frame is near its flat gray level 20 * i.
    means = out.astype(float).mean(axis=(2, 3, 4))
    np.testing.assert_allclose(means, [[20.0 * i for i in range(6)]] * 2, atol=3)
    train, test = quiet(prepare_holdout, tmp_path / "videos", tmp_path / "split", 0.5, frames=6,
                        channels=1)
    assert (train, test) == (1, 1)
    (tmp_path / "videos" / "c.mp4").write_bytes(b"\0\0\0\x18ftypmp42" + b"\xff" * 200)
    with pytest.raises(ValueError, match=r"c\.mp4: cannot decode video"):
        quiet(prepare, tmp_path / "videos", tmp_path / "bad.npy", frames=6, on_error="raise")
    with pytest.warns(UserWarning, match=r"skipped 1 clip.*c\.mp4"):
        assert quiet(prepare, tmp_path / "videos", tmp_path / "bad.npy", frames=6) == 2


def test_mp4_without_pyav_is_one_clear_error(tmp_path, monkeypatch):
    import sys

    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"\0" * 64)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ModuleNotFoundError, match=r"reading MP4 needs PyAV: pip install "
                                                  r"'axial-transformer\[video\]'"):
        quiet(prepare, tmp_path / "videos", tmp_path / "out.npy", frames=2)
    assert "axial-transformer[video]" in PYAV_HINT
    assert not list(tmp_path.glob("*.npy*")) and not list(tmp_path.glob(".out*"))


def test_bad_clip_inputs_name_the_file(tmp_path):
    (tmp_path / "gifs").mkdir()
    write_gif(tmp_path / "gifs" / "a.gif", random_clips(1, t=3, c=1)[0])
    (tmp_path / "gifs" / "b.gif").write_bytes(b"GIF89a" + b"\xff" * 40)  # corrupt
    with pytest.raises(ValueError, match=r"b\.gif: cannot decode GIF"):
        quiet(prepare, tmp_path / "gifs", tmp_path / "out.npy", frames=3, on_error="raise")
    assert not (tmp_path / "out.npy").exists()
    with pytest.warns(UserWarning, match=r"skipped 1 clip.*b\.gif"):
        assert quiet(prepare, tmp_path / "gifs", tmp_path / "out.npy", frames=3) == 1
    write_gif(tmp_path / "gifs" / "c.gif", random_clips(1, t=3, h=7, c=1)[0])
    with pytest.raises(ValueError, match=r"c\.gif: is 3x7x5x3 \(TxHxWxC\) but .*a\.gif"):
        quiet(prepare, tmp_path / "gifs", tmp_path / "out2.npy", frames=3)
    with pytest.raises(ValueError, match="pass --frames T"):
        quiet(prepare, tmp_path / "gifs", tmp_path / "out2.npy")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.gif").write_bytes(b"not a gif")
    with pytest.raises(ValueError, match=r"no clip of 3 frames could be read \(1 skipped\)"):
        quiet(prepare, tmp_path / "empty", tmp_path / "out3.npy", frames=3)
    assert not (tmp_path / "out2.npy").exists() and not (tmp_path / "out3.npy").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_prepare_moving_digits_cli(tmp_path, capsys):
    main(["prepare", "moving-digits", str(tmp_path / "train.npy"), "--count", "20"])
    main(["prepare", "moving-digits", str(tmp_path / "test.npy"), "--count", "10", "--split",
          "test", "--frames", "4", "--image-size", "20", "20"])
    assert "wrote 10 clips of [T, H, W, C] = [4, 20, 20, 1]" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(tmp_path / "train.npy"), moving_digits(count=20))
    with pytest.raises(SystemExit):
        main(["prepare", "moving-digits", str(tmp_path / "d"), "--holdout", "0.1"])
    assert "--split test instead of --holdout" in capsys.readouterr().err


# ---- open_split ----


def test_open_split_of_clips(tmp_path):
    clips = random_clips(4, t=3, h=6, w=5, c=1)
    np.save(tmp_path / "clips.npy", clips)
    quiet(prepare_holdout, tmp_path / "clips.npy", tmp_path / "d", 0.25, channels=1)
    train = open_split(tmp_path / "d", "train", (6, 5), 1, frames=3)
    item = train[0]
    assert item.dtype == torch.uint8 and item.shape == (1, 3, 6, 5)  # [C, T, H, W]
    assert len(train) == 3 and len(open_split(tmp_path / "d", "test", (6, 5), 1, frames=3)) == 1
    batch = torch.utils.data.default_collate([train[0], train[1]])
    assert batch.shape == (2, 1, 3, 6, 5)
    rgb = random_clips(2, t=3, h=6, w=5, c=3)
    np.save(tmp_path / "rgb.npy", rgb)
    x = open_split(tmp_path / "rgb.npy", "train", (6, 5), 3, frames=3)[1]
    np.testing.assert_array_equal(x.numpy(), rgb[1].transpose(3, 0, 1, 2))


def test_open_split_mismatches_name_the_setting(tmp_path):
    np.save(tmp_path / "clips.npy", random_clips(2, t=3, h=6, w=5, c=1))
    path = tmp_path / "clips.npy"
    with pytest.raises(ValueError, match=r"needs model\.frames=3; or prepare them again with "
                                         r"--frames 8"):
        open_split(path, "train", (6, 5), 1, frames=8)
    with pytest.raises(ValueError, match=r"model\.image_size=\[6,5\] model\.channels=1"):
        open_split(path, "train", (8, 8), 3, frames=3)
    with pytest.raises(ValueError, match=r"this model takes clips .*--frames 2"):
        open_split(path, "train", (6, 5), 1, frames=2, trained=True)
    np.save(tmp_path / "images.npy", np.zeros((2, 6, 5, 1), np.uint8))
    with pytest.raises(ValueError, match=r"set model\.frames=0"):
        open_split(tmp_path / "images.npy", "train", (6, 5), 1, frames=3)
    with pytest.raises(ValueError, match="expected shape"):  # the image path refuses clips
        open_split(path, "train", (6, 5), 1)


def test_builtin_spec_names():
    train = open_split("moving-digits", "train", (16, 16), 1, frames=8)
    assert len(train) == 4096 and train[0].shape == (1, 8, 16, 16)
    np.testing.assert_array_equal(train[5][0].numpy(), moving_digits("train")[5, ..., 0])
    assert open_split("moving-digits", "test", (16, 16), 1, frames=4)[0].shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match=r"model\.channels=1"):
        open_split("moving-digits", "train", (16, 16), 3, frames=8)
    with pytest.raises(ValueError, match=r"set model\.frames"):
        open_split("moving-digits", "train", (16, 16), 1)
    with pytest.raises(ValueError, match="data.spec=moving-digits"):
        open_split("builtin", "train", (16, 16), 1, frames=8)
