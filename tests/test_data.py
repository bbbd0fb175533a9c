"""Data layer: every source format read from small files written here, prepare, open_split, and
the built-in dataset."""

import gzip
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from axial_transformer.data import (
    CorruptImageError,
    ImageArrayDataset,
    load_array,
    open_split,
    prepare,
)
from axial_transformer.data import builtin as builtin_data
from axial_transformer.data.__main__ import main
from axial_transformer.data.builtin import builtin_crops, builtin_dataset


def random_images(n, h=5, w=7, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def png_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()


def write_tar(path, files):
    """A tar of {name: bytes}, added in the given (unsorted) order."""
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def prepare_quiet(source, out, **kw):
    return prepare(source, out, progress=False, **kw)


def leftovers(directory):
    """Anything in `directory` that a prepare run could have left: outputs and temp files."""
    return sorted(p.name for p in directory.iterdir() if ".npy" in p.name)


class Marker:
    """Unpickling this creates a directory: a visible trace that a pickle ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


# ---- image files: tars and folders ----


def test_tar_of_pngs_round_trip_in_sorted_order(tmp_path):
    images = random_images(5)
    order = [3, 1, 4, 0, 2]  # archive order differs from name order
    write_tar(tmp_path / "imgs.tar", {f"d/{i:07d}.png": png_bytes(images[i]) for i in order})
    assert prepare_quiet(tmp_path / "imgs.tar", tmp_path / "out.npy") == 5
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), images)


def test_corrupt_png_in_tar_is_skipped_and_counted(tmp_path):
    images = random_images(5)
    files = {f"{i}.png": png_bytes(images[i]) for i in (4, 2, 0, 3, 1)}
    files["2.png"] = files["2.png"][:40]  # truncated, in the middle of the sorted order
    write_tar(tmp_path / "imgs.tar", files)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*2\.png"):
        assert prepare_quiet(tmp_path / "imgs.tar", tmp_path / "out.npy") == 4
    out = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(out, images[[0, 1, 3, 4]])  # the gap is closed up, in order
    assert leftovers(tmp_path) == ["out.npy"]


def test_corrupt_png_is_fatal_with_on_error_raise(tmp_path):
    images = random_images(3)
    files = {f"{i}.png": png_bytes(images[i]) for i in range(3)}
    files["1.png"] = files["1.png"][:40]
    write_tar(tmp_path / "imgs.tar", files)
    with pytest.raises(CorruptImageError, match=r"1\.png"):
        prepare_quiet(tmp_path / "imgs.tar", tmp_path / "out.npy", on_error="raise")
    assert leftovers(tmp_path) == []  # no partial output, no temp file


def test_van_den_oord_tar_count_is_checked(tmp_path):
    write_tar(tmp_path / "valid_32x32.tar", {"a.png": png_bytes(random_images(1)[0])})
    with pytest.warns(UserWarning, match="should hold 49,999 images"):
        prepare_quiet(tmp_path / "valid_32x32.tar", tmp_path / "out.npy")


def test_png_folder_recursive_sorted(tmp_path):
    images = random_images(4, c=1)
    folder = tmp_path / "imgs"
    for i, rel in enumerate(["a/0.png", "a/1.png", "b/0.png", "c.png"]):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(png_bytes(images[i]))
    (folder / "notes.txt").write_text("not an image")
    assert prepare_quiet(folder, tmp_path / "out.npy", channels=1) == 4
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), images)
    # Grayscale files asked for as RGB are converted like torchvision's ImageFolder does.
    prepare_quiet(folder, tmp_path / "rgb.npy", channels=3)
    np.testing.assert_array_equal(np.load(tmp_path / "rgb.npy"), images.repeat(3, axis=-1))


def test_wrong_size_image_names_the_file_and_leaves_nothing(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "0.png").write_bytes(png_bytes(random_images(1, 5, 7)[0]))
    (folder / "1.png").write_bytes(png_bytes(random_images(1, 6, 7)[0]))
    (tmp_path / "out.npy").write_bytes(b"previous contents")
    with pytest.raises(ValueError, match=r"1\.png: is 6x7x3.*0\.png is 5x7x3"):
        prepare_quiet(folder, tmp_path / "out.npy")
    with pytest.raises(ValueError, match=r"0\.png: is 5x7, expected 6x7.*resize"):
        prepare_quiet(folder, tmp_path / "out.npy", image_size=(6, 7))
    # A failed run leaves the old output untouched and no temp file beside it.
    assert (tmp_path / "out.npy").read_bytes() == b"previous contents"
    assert leftovers(tmp_path) == ["out.npy"]
    assert prepare_quiet(folder, tmp_path / "out.npy", image_size=(4, 4), resize=True) == 2
    assert load_array(tmp_path / "out.npy").shape == (2, 4, 4, 3)


def test_resize_is_a_box_filter(tmp_path):
    image = np.zeros((1, 4, 4, 1), np.uint8)
    image[0, :, :2] = 200  # left half bright: a 2x box average gives [[200, 0], [200, 0]]
    np.save(tmp_path / "in.npy", image)
    prepare_quiet(tmp_path / "in.npy", tmp_path / "out.npy", channels=1, image_size=(2, 2),
                  resize=True)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy")[0, ..., 0], [[200, 0], [200, 0]])


# ---- Chrabaszcz et al. npz batches ----


def planes(images):
    """[N, S, S, 3] -> [N, 3*S*S] as the npz batches store them: R plane, G plane, B plane."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def test_npz_batches_round_trip_and_warn(tmp_path):
    images = random_images(7, 4, 4)
    folder = tmp_path / "Imagenet32_train_npz"
    folder.mkdir()
    # Batch 10 must come after batch 2 (numeric, not string, order).
    for number, part in ((1, images[:3]), (2, images[3:5]), (10, images[5:])):
        np.savez(folder / f"train_data_batch_{number}.npz", data=planes(part),
                 labels=np.ones(len(part), np.int64), mean=np.zeros(48))
    np.savez(folder / "val_data.npz", data=planes(images[:2]), labels=np.ones(2, np.int64))
    with pytest.warns(UserWarning, match="not comparable"):
        assert prepare_quiet(folder, tmp_path / "train.npy") == 7
    np.testing.assert_array_equal(np.load(tmp_path / "train.npy"), images)
    with pytest.warns(UserWarning, match="not comparable"):
        assert prepare_quiet(folder, tmp_path / "test.npy", split="test") == 2
    np.testing.assert_array_equal(np.load(tmp_path / "test.npy"), images[:2])


def test_npz_without_data_key(tmp_path):
    np.savez(tmp_path / "val_data.npz", images=planes(random_images(2, 4, 4)))
    with pytest.raises(ValueError, match=r"no 'data' array \(it holds \['images'\]\)"):
        prepare_quiet(tmp_path / "val_data.npz", tmp_path / "out.npy")


def test_npz_object_array_is_never_unpickled(tmp_path):
    marker = tmp_path / "pickle_ran"
    np.savez(tmp_path / "val_data.npz", data=np.array([Marker(marker)], dtype=object))
    with pytest.raises(ValueError, match="never loaded"):
        prepare_quiet(tmp_path / "val_data.npz", tmp_path / "out.npy")
    assert not marker.exists()
    # Negative control: loading it the unsafe way does run the payload.
    with np.load(tmp_path / "val_data.npz", allow_pickle=True) as npz:
        npz["data"]
    assert marker.exists()


def npz_cases(tmp_path):
    """Damaged and hostile npz batches, each with a phrase its error must contain."""
    good = tmp_path / "good.npz"
    # Larger than zipfile's first read (4 KB), so that a bad CRC shows only when data is read.
    np.savez(good, data=planes(random_images(4, 32, 32)), labels=np.arange(1, 5))
    raw = good.read_bytes()
    cases = {"random_bytes.npz": (os.urandom(200), "not a readable npz archive")}
    # The stored data.npy with a broken header, and with pixel bytes flipped (bad CRC).
    header = raw.index(b"\x93NUMPY", raw.index(b"data.npy"))
    cases["bad_header.npz"] = (raw[:header] + b"\x00" * 6 + raw[header + 6 :],
                               "not a readable npz archive")
    pixels = raw.index(b"}", header) + 6000
    cases["bad_crc.npz"] = (raw[:pixels] + bytes([raw[pixels] ^ 1]) + raw[pixels + 1 :],
                            "cannot read its 'data' array")
    # A header that claims more images than the archive stores.
    lying = raw.replace(b"'shape': (4, 3072)", b"'shape': (9, 3072)")
    cases["lying.npz"] = (lying, r"header says \[9, 3072\] but the archive stores 12,288 bytes")
    buffer = io.BytesIO()
    np.savez(buffer, data=planes(random_images(4, 4, 4)), labels=np.array([{}] * 4))
    cases["object_labels.npz"] = (buffer.getvalue(), "cannot read its 'labels' array")
    return cases


def test_damaged_npz_is_one_line_naming_the_file(tmp_path, capsys):
    for name, (payload, message) in npz_cases(tmp_path).items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(SystemExit) as exit_info:
            main(["prepare", str(tmp_path / name), str(tmp_path / "out.npy")])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2, name
        assert err.startswith(f"error: {tmp_path / name}: ") and "Traceback" not in err, err
        assert re.search(message, err), (name, err)
    assert leftovers(tmp_path) == []


# ---- CIFAR-10 ----


def test_cifar10_binary(tmp_path):
    images = random_images(12, 32, 32)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    labels = (np.arange(12, dtype=np.uint8) * 7 % 10)[:, None]
    records = np.concatenate([labels, planes(images)], axis=1)
    for i in range(5):
        records[2 * i : 2 * i + 2].tofile(folder / f"data_batch_{i + 1}.bin")
    records[10:].tofile(folder / "test_batch.bin")
    assert prepare_quiet(tmp_path, tmp_path / "train.npy") == 10  # finds the -bin folder
    np.testing.assert_array_equal(np.load(tmp_path / "train.npy"), images[:10])
    assert prepare_quiet(folder, tmp_path / "test.npy", split="test") == 2
    np.testing.assert_array_equal(np.load(tmp_path / "test.npy"), images[10:])
    (folder / "test_batch.bin").write_bytes(records[10:].tobytes()[:-1])
    with pytest.raises(ValueError, match="not a whole number of CIFAR-10 records"):
        prepare_quiet(folder, tmp_path / "bad.npy", split="test")


# ---- MNIST / Fashion-MNIST, torchvision layout ----


def idx_bytes(images):
    n, h, w = images.shape
    header = b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (n, h, w))
    return header + images.tobytes()


@pytest.mark.parametrize("dataset, compress", [("MNIST", False), ("FashionMNIST", True)])
def test_mnist_torchvision_layout(tmp_path, dataset, compress):
    train, test = random_images(3, 28, 28, 1, seed=1), random_images(2, 28, 28, 1, seed=2)
    raw = tmp_path / dataset / "raw"
    raw.mkdir(parents=True)
    for prefix, images in (("train", train), ("t10k", test)):
        data = idx_bytes(images[..., 0])
        name = f"{prefix}-images-idx3-ubyte"
        if compress:
            (raw / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (raw / name).write_bytes(data)
    with pytest.warns(UserWarning, match="no labels-idx1-ubyte file beside it"):
        assert prepare_quiet(tmp_path, tmp_path / "train.npy", channels=1) == 3
        prepare_quiet(tmp_path / dataset, tmp_path / "test.npy", channels=1, split="test")
    np.testing.assert_array_equal(np.load(tmp_path / "train.npy"), train)
    np.testing.assert_array_equal(np.load(tmp_path / "test.npy"), test)
    with pytest.raises(ValueError, match="has 1 channels, expected 3"), pytest.warns(UserWarning):
        prepare_quiet(tmp_path, tmp_path / "rgb.npy")


# ---- arrays ----


@pytest.mark.parametrize("shape", [(4, 5, 6), (4, 5, 6, 3)])
def test_npy_source_and_load_array(tmp_path, shape):
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.save(tmp_path / "in.npy", images)
    channels = shape[3] if len(shape) == 4 else 1
    assert prepare_quiet(tmp_path / "in.npy", tmp_path / "out.npy", channels=channels) == 4
    out = load_array(tmp_path / "out.npy")
    assert isinstance(out, np.memmap) and out.shape == (4, 5, 6, channels)
    np.testing.assert_array_equal(out, images.reshape(out.shape))
    assert load_array(tmp_path / "in.npy").shape == (4, 5, 6, channels)


def test_load_array_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy.*prepare"):
        load_array(tmp_path / "missing.npy")
    np.save(tmp_path / "float.npy", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="expected uint8"):
        load_array(tmp_path / "float.npy")
    np.save(tmp_path / "flat.npy", np.zeros((2, 48), np.uint8))
    with pytest.raises(ValueError, match=r"expected shape \[N, H, W, C\]"):
        load_array(tmp_path / "flat.npy")
    np.save(tmp_path / "object.npy", np.array([None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object.npy: not a uint8 .npy"):
        load_array(tmp_path / "object.npy")
    (tmp_path / "empty.npy").write_bytes(b"")  # np.load raises EOFError for this one
    with pytest.raises(ValueError, match="empty.npy: not a uint8 .npy"):
        load_array(tmp_path / "empty.npy")


def test_image_array_dataset_items(tmp_path):
    images = random_images(3, 4, 6, 3)
    np.save(tmp_path / "x.npy", images)
    dataset = ImageArrayDataset(load_array(tmp_path / "x.npy"))
    item = dataset[1]
    assert len(dataset) == 3 and item.dtype == torch.uint8 and item.shape == (3, 4, 6)
    np.testing.assert_array_equal(item.numpy(), images[1].transpose(2, 0, 1))
    item.zero_()  # the item owns its memory: the array is untouched
    np.testing.assert_array_equal(dataset.array[1], images[1])
    with pytest.raises(ValueError, match="uint8"):
        ImageArrayDataset(images.astype(np.int64))


def test_open_split(tmp_path):
    np.save(tmp_path / "train.npy", random_images(3, 8, 8, 3))
    assert len(open_split(str(tmp_path), "train", (8, 8), 3)) == 3
    assert len(open_split(str(tmp_path / "train.npy"), "test", (8, 8), 3)) == 3
    with pytest.raises(ValueError, match=r"train\.npy: expected .* 8 x 6 x 1 .*found 8 x 8 x 3"
                       r".*needs model\.image_size=\[8,8\] model\.channels=3; or prepare them "
                       r"again with --image-size 8 6 --resize"):
        open_split(str(tmp_path), "train", (8, 6), 1)
    with pytest.raises(ValueError, match=r"found 8 x 8 x 3; a model of these images needs "
                       r"model\.channels=3$"):
        open_split(str(tmp_path), "train", (8, 8), 1)
    with pytest.raises(FileNotFoundError, match=r"test\.npy: no 'test' split .*train\.npy"):
        open_split(str(tmp_path), "test", (8, 8), 3)


def test_prepare_removes_temp_files_of_killed_runs(tmp_path):
    np.save(tmp_path / "in.npy", random_images(2))
    stale = [tmp_path / ".out.npy.k1ll3d_0.tmp", tmp_path / ".out_labels.npy.abcdefgh.tmp"]
    others = [tmp_path / ".other.npy.k1ll3d_0.tmp", tmp_path / ".out.npy.tmp",
              tmp_path / "out.npy.k1ll3d_0.tmp"]
    for file in stale + others:
        file.write_bytes(b"\0" * 1000)
    with pytest.warns(UserWarning) as warned:
        prepare_quiet(tmp_path / "in.npy", tmp_path / "out.npy")
    assert sorted(str(w.message) for w in warned) == [
        f"removed {file} (1,000 bytes), left by an earlier run that was killed" for file in stale
    ]
    assert not any(file.exists() for file in stale)
    assert all(file.exists() for file in others)  # not this output's temp-file pattern


def test_outputs_get_the_umask_mode(tmp_path):
    images = random_images(4)
    np.save(tmp_path / "in.npy", images)
    np.save(tmp_path / "in_labels.npy", np.arange(4))
    umask = os.umask(0o027)
    try:
        prepare_quiet(tmp_path / "in.npy", tmp_path / "out.npy")
    finally:
        os.umask(umask)
    for name in ("out.npy", "out_labels.npy", "out_classes.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


# ---- the command line ----


def test_cli(tmp_path):
    images = random_images(2)
    np.save(tmp_path / "in.npy", images)
    run = subprocess.run(
        [sys.executable, "-m", "axial_transformer.data", "prepare", str(tmp_path / "in.npy"),
         str(tmp_path / "out.npy"), "--image-size", "5", "7", "--on-error", "raise"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "wrote 2 images of [H, W, C] = [5, 7, 3]" in run.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), images)


def test_cli_error_is_one_clean_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", str(tmp_path / "nothing_here"), str(tmp_path / "out.npy")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


# ---- the built-in dataset ----


def crop_hashes(images):
    return {hashlib.sha1(image.tobytes()).hexdigest() for image in images}


def test_builtin_dataset_shapes_and_determinism():
    train, train_sources = builtin_crops("train")
    test, test_sources = builtin_crops("test")
    assert train.dtype == np.uint8 and train.shape[1:] == (32, 32, 3) and len(train) > 2000
    assert test.dtype == np.uint8 and test.shape[1:] == (32, 32, 3) and 200 < len(test) < 2000
    assert len(train_sources) == len(train) and len(test_sources) == len(test)
    np.testing.assert_array_equal(builtin_dataset("test"), test)  # deterministic
    gray = builtin_dataset("test", image_size=(16, 24), channels=1)
    assert gray.shape[1:] == (16, 24, 1) and gray.dtype == np.uint8
    assert len(set(test_sources[:64])) > 1  # shuffled: a prefix mixes photographs


def test_builtin_test_photographs_are_held_out():
    _, train_sources = builtin_crops("train", (16, 16))
    test, test_sources = builtin_crops("test", (16, 16))
    assert set(train_sources).isdisjoint(test_sources)
    assert {"motorcycle_left", "motorcycle_right"} <= set(train_sources)  # one scene, one side
    assert set(train_sources) | set(test_sources) == set(builtin_data.PHOTOGRAPHS)
    train = builtin_dataset("train", (16, 16))
    assert crop_hashes(train).isdisjoint(crop_hashes(test))


def test_builtin_leak_check_catches_a_shared_photograph(monkeypatch):
    # Negative control for the pixel check above: a photograph on both sides is caught.
    splits = {"train": ("chelsea", "coffee"), "test": ("chelsea",)}
    monkeypatch.setattr(builtin_data, "SPLITS", splits)
    train, test = builtin_dataset("train", (16, 16)), builtin_dataset("test", (16, 16))
    assert not crop_hashes(train).isdisjoint(crop_hashes(test))


def test_builtin_dataset_through_open_split():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = open_split("builtin", "test", (32, 32), 3)
    assert dataset[0].shape == (3, 32, 32) and dataset[0].dtype == torch.uint8
    with pytest.raises(ValueError, match="split must be one of"):
        builtin_dataset("valid")
