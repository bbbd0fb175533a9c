"""Class labels from every source that has them, through prepare and open_split, and the
deterministic hold-out split."""

import gzip
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import idx_bytes, main, planes, png_bytes, prepare_quiet, random_images

from axial_transformer.data import class_names, open_split, prepare_holdout

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def saved_labels(path):
    labels = np.load(path.with_name(f"{path.stem}_labels.npy"), allow_pickle=False)
    assert labels.dtype == np.int64
    return labels


def saved_classes(path):
    return json.loads(path.with_name(f"{path.stem}_classes.json").read_text())


# ---- sources with labels ----


def idx1_bytes(labels):
    return b"\x00\x00\x08\x01" + len(labels).to_bytes(4, "big") + bytes(labels)


@pytest.mark.parametrize("dataset, classes", [
    ("MNIST", [str(d) for d in range(10)]),
    ("FashionMNIST", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"]),
])
def test_mnist_labels_and_class_names(tmp_path, dataset, classes):
    raw = tmp_path / dataset / "raw"
    raw.mkdir(parents=True)
    images, labels = random_images(4, 28, 28, 1, seed=1), [7, 0, 9, 7]
    (raw / "train-images-idx3-ubyte").write_bytes(idx_bytes(images[..., 0]))
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx1_bytes(labels)))
    assert prepare_quiet(tmp_path / dataset, tmp_path / "train.npy", channels=1) == 4
    assert saved_labels(tmp_path / "train.npy").tolist() == labels
    assert saved_classes(tmp_path / "train.npy") == classes
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx1_bytes(labels[:3])))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz: holds 3 labels, "
                                         r"expected one per image \(4\)"):
        prepare_quiet(tmp_path / dataset, tmp_path / "train.npy", channels=1)


def test_cifar10_binary_labels(tmp_path):
    images, labels = random_images(12, 32, 32), np.arange(12) * 7 % 10
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    records = np.concatenate([labels.astype(np.uint8)[:, None], planes(images)], axis=1)
    for i in range(5):
        records[2 * i : 2 * i + 2].tofile(folder / f"data_batch_{i + 1}.bin")
    records[10:].tofile(folder / "test_batch.bin")
    prepare_quiet(folder, tmp_path / "train.npy")
    np.testing.assert_array_equal(saved_labels(tmp_path / "train.npy"), labels[:10])
    assert saved_classes(tmp_path / "train.npy") == CIFAR10_CLASSES
    records[11, 0] = 10
    records[10:].tofile(folder / "test_batch.bin")
    with pytest.raises(ValueError, match=r"test_batch\.bin \(label bytes\): label 10 of image 1 "
                                         r"is outside 0\.\.9"):
        prepare_quiet(folder, tmp_path / "test.npy", split="test")


def test_npz_labels_count_from_zero(tmp_path):
    images = random_images(5, 4, 4)
    np.savez(tmp_path / "train_data_batch_1.npz", data=planes(images[:3]), labels=[1, 1000, 7])
    np.savez(tmp_path / "train_data_batch_2.npz", data=planes(images[3:]), labels=[2, 3])
    with pytest.warns(UserWarning, match="not comparable.*labels 1..1000 are stored as 0..999"):
        prepare_quiet(tmp_path, tmp_path / "train.npy")
    assert saved_labels(tmp_path / "train.npy").tolist() == [0, 999, 6, 1, 2]
    assert saved_classes(tmp_path / "train.npy") == [str(k) for k in range(1000)]
    np.savez(tmp_path / "train_data_batch_2.npz", data=planes(images[3:]), labels=[0, 3])
    with pytest.raises(ValueError, match=r"train_data_batch_2\.npz 'labels': label 0 of image 0 "
                                         r"is outside 1\.\.1000 \(num_classes=1000\)"):
        prepare_quiet(tmp_path, tmp_path / "train.npy")
    np.savez(tmp_path / "train_data_batch_2.npz", data=planes(images[3:]))
    with pytest.raises(ValueError, match=r"train_data_batch_2\.npz: no 'labels' array, but "
                                         r"train_data_batch_1\.npz has one"):
        prepare_quiet(tmp_path, tmp_path / "train.npy")


def class_folder(root, layout):
    """PNGs at the relative paths of `layout`, image i at layout[i]; returns the images."""
    images = random_images(len(layout), seed=3)
    for image, relative in zip(images, layout, strict=True):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(png_bytes(image))
    return images


def test_class_folders_give_labels_also_after_skipped_images(tmp_path):
    layout = ["ship/0.png", "ship/1.png", "cat/2.png", "cat/deep/3.png", "dog/4.png"]
    images = class_folder(tmp_path / "photos", layout)
    (tmp_path / "photos" / "cat" / "2.png").write_bytes(b"not a png")  # skipped
    with pytest.warns(UserWarning, match="skipped 1"):
        assert prepare_quiet(tmp_path / "photos", tmp_path / "train.npy") == 4
    # Sorted paths: cat/2 (skipped), cat/deep/3, dog/4, ship/0, ship/1; classes by folder name.
    np.testing.assert_array_equal(np.load(tmp_path / "train.npy"), images[[3, 4, 0, 1]])
    assert saved_labels(tmp_path / "train.npy").tolist() == [0, 1, 2, 2]
    assert saved_classes(tmp_path / "train.npy") == ["cat", "dog", "ship"]


@pytest.mark.parametrize("layout", [
    ["0.png", "1.png"],  # flat, like the extracted train_32x32/
    ["all/0.png", "all/1.png"],  # one sub-folder is a container, not a set of classes
    ["a/0.png", "b/1.png", "2.png"],  # an image outside every sub-folder
])
def test_folders_that_are_not_classes_give_no_labels(tmp_path, layout):
    class_folder(tmp_path / "photos", layout)
    prepare_quiet(tmp_path / "photos", tmp_path / "train.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "train.npy"]


def test_npy_with_labels_beside_it(tmp_path):
    np.save(tmp_path / "x.npy", random_images(3))
    np.save(tmp_path / "x_labels.npy", np.array([2, 0, 2], dtype=np.int32))
    prepare_quiet(tmp_path / "x.npy", tmp_path / "out.npy")
    assert saved_labels(tmp_path / "out.npy").tolist() == [2, 0, 2]
    assert saved_classes(tmp_path / "out.npy") == ["0", "1", "2"]  # numbered: no names given
    (tmp_path / "x_classes.json").write_text(json.dumps(["a", "b", "c", "d"]))
    prepare_quiet(tmp_path / "x.npy", tmp_path / "out.npy")
    assert saved_classes(tmp_path / "out.npy") == ["a", "b", "c", "d"]
    (tmp_path / "x_classes.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(ValueError, match=r"x_labels\.npy: label 2 of image 0 is outside 0\.\.1 "
                                         r"\(num_classes=2\) \(2 labels are\)"):
        prepare_quiet(tmp_path / "x.npy", tmp_path / "out.npy")
    np.save(tmp_path / "x_labels.npy", np.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"x_labels\.npy: expected integer class labels \[N\], "
                                         r"got float64 \[3\]"):
        prepare_quiet(tmp_path / "x.npy", tmp_path / "out.npy")


def test_unlabelled_source_removes_labels_of_an_earlier_run(tmp_path):
    np.save(tmp_path / "x.npy", random_images(2))
    np.save(tmp_path / "x_labels.npy", np.array([1, 0]))
    prepare_quiet(tmp_path / "x.npy", tmp_path / "out.npy")
    assert (tmp_path / "out_labels.npy").is_file()
    with tarfile.open(tmp_path / "pngs.tar", "w") as tar:
        (tmp_path / "a.png").write_bytes(png_bytes(random_images(1)[0]))
        tar.add(tmp_path / "a.png", "a.png")
    prepare_quiet(tmp_path / "pngs.tar", tmp_path / "out.npy")
    assert not (tmp_path / "out_labels.npy").exists()
    assert not (tmp_path / "out_classes.json").exists()


# ---- reading labels: open_split and class_names ----


@pytest.fixture
def labelled_split(tmp_path):
    np.save(tmp_path / "train.npy", random_images(3, 4, 4))
    np.save(tmp_path / "train_labels.npy", np.array([2, 0, 1]))
    (tmp_path / "train_classes.json").write_text(json.dumps(["a", "b", "c"]))
    return tmp_path


def test_open_split_with_labels(labelled_split):
    dataset = open_split(labelled_split, "train", (4, 4), 3, num_classes=3)
    image, label = dataset[0]
    assert image.shape == (3, 4, 4) and image.dtype == torch.uint8
    assert label.dtype == torch.int64 and label.shape == () and label.item() == 2
    assert [int(dataset[i][1]) for i in range(3)] == [2, 0, 1]
    assert open_split(labelled_split / "train.npy", "test", (4, 4), 3, num_classes=5)[1][1] == 0
    assert isinstance(open_split(labelled_split, "train", (4, 4), 3)[0], torch.Tensor)
    assert class_names(labelled_split, "train") == ["a", "b", "c"]
    assert class_names(labelled_split / "train.npy", "test") == ["a", "b", "c"]
    assert class_names("builtin", "train") is None


def test_open_split_refuses_bad_labels(labelled_split):
    path = labelled_split / "train_labels.npy"
    with pytest.raises(ValueError, match=r"train_labels\.npy: label 2 of image 0 is outside "
                                         r"0\.\.1 \(num_classes=2\)"):
        open_split(labelled_split, "train", (4, 4), 3, num_classes=2)
    np.save(path, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"train_labels\.npy: holds 2 labels, expected one per "
                                         r"image \(3\)"):
        open_split(labelled_split, "train", (4, 4), 3, num_classes=2)
    np.save(path, np.array([0, None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"train_labels\.npy: not a \.npy of class labels"):
        open_split(labelled_split, "train", (4, 4), 3, num_classes=2)
    path.unlink()
    with pytest.raises(ValueError, match=r"train_labels\.npy: no such labels file beside "
                                         r"train\.npy"):
        open_split(labelled_split, "train", (4, 4), 3, num_classes=2)
    assert len(open_split(labelled_split, "train", (4, 4), 3)) == 3  # without labels: fine
    with pytest.raises(ValueError, match="built-in dataset has no class labels"):
        open_split("builtin", "train", (4, 4), 3, num_classes=2)
    (labelled_split / "train_classes.json").write_text('{"a": 0}')
    with pytest.raises(ValueError, match=r"train_classes\.json: expected a JSON list"):
        class_names(labelled_split, "train")


# ---- hold-out split ----


def test_holdout_is_deterministic_disjoint_and_keeps_labels(tmp_path, monkeypatch):
    names = [f"{c}/{i:02d}.png" for c in ("cat", "dog") for i in range(10)]
    images = class_folder(tmp_path / "a", names)
    for image, name in zip(images, names, strict=True):
        (tmp_path / "b" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "b" / name).write_bytes(png_bytes(image))
    assert prepare_holdout(tmp_path / "a", tmp_path / "out_a", 0.25, progress=False) == (15, 5)
    # The same files listed by the file system in the opposite order.
    listed = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: reversed(list(listed(self, pattern))))
    assert prepare_holdout(tmp_path / "b", tmp_path / "out_b", 0.25, progress=False) == (15, 5)
    files = ["train.npy", "test.npy", "train_labels.npy", "test_labels.npy", "train_classes.json",
             "test_classes.json"]
    assert sorted(p.name for p in (tmp_path / "out_a").iterdir()) == sorted(files)
    for name in files:
        assert (tmp_path / "out_a" / name).read_bytes() == (tmp_path / "out_b" / name).read_bytes()

    index = {image.tobytes(): i for i, image in enumerate(images)}  # random images: all distinct
    train = [index[x.tobytes()] for x in np.load(tmp_path / "out_a" / "train.npy")]
    test = [index[x.tobytes()] for x in np.load(tmp_path / "out_a" / "test.npy")]
    assert sorted(train + test) == list(range(20)) and train == sorted(train)
    assert test == sorted(test) and len(set(test)) == 5
    # Labels follow their images: image i is a cat for i < 10.
    for split, rows in (("train", train), ("test", test)):
        expected = [int(i >= 10) for i in rows]
        assert saved_labels(tmp_path / "out_a" / f"{split}.npy").tolist() == expected
        assert saved_classes(tmp_path / "out_a" / f"{split}.npy") == ["cat", "dog"]
    # A different fraction is a different split of the same images.
    prepare_holdout(tmp_path / "a", tmp_path / "out_c", 0.5, progress=False)
    assert len(np.load(tmp_path / "out_c" / "test.npy")) == 10


def test_holdout_cli_and_refusals(tmp_path, capsys):
    np.save(tmp_path / "x.npy", random_images(10))
    np.save(tmp_path / "x_labels.npy", np.arange(10) % 2)
    main(["prepare", str(tmp_path / "x.npy"), str(tmp_path / "data"), "--holdout", "0.2"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("wrote 8 images of [H, W, C] = [5, 7, 3] to ")
    assert out[0].endswith("train.npy, with their labels (2 classes) in train_labels.npy")
    assert out[1].startswith("wrote 2 images") and "test.npy, with their labels" in out[1]
    for fraction in ("0", "1", "0.01"):
        with pytest.raises(SystemExit):
            main(["prepare", str(tmp_path / "x.npy"), str(tmp_path / "d2"), "--holdout", fraction])
        assert capsys.readouterr().err.splitlines()[-1].startswith("error: --holdout")
    with pytest.raises(SystemExit):
        main(["prepare", str(tmp_path / "x.npy"), str(tmp_path / "d.npy"), "--holdout", "0.5"])
    assert "with a hold-out the output is a directory" in capsys.readouterr().err
    assert list((tmp_path / "d2").iterdir()) == [] and not (tmp_path / "d.npy").exists()
