"""CIFAR-10's python batches are parsed, never unpickled: real-format batches load with their
labels; payloads that run code, forge object pointers or allocate huge arrays are refused with
one line naming the file."""

import os
import pickle
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
from numpy._core.multiarray import _reconstruct

from axial_transformer.data import prepare
from axial_transformer.data.cifar import read_python_batch

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]


def py2_batch(pixels: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle (protocol 2) wrote the real files: str as SHORT_BINSTRING or
    BINSTRING, numpy 1.x's global names, memo entries after each container."""
    memo = iter(range(256))

    def put() -> bytes:
        return b"q" + bytes([next(memo)])

    def string(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def integer(i: int) -> bytes:
        return b"K" + bytes([i]) if 0 <= i < 256 else b"J" + struct.pack("<i", i)

    def glob(module: bytes, name: bytes) -> bytes:
        return b"c" + module + b"\n" + name + b"\n" + put()

    dtype = (glob(b"numpy", b"dtype") + string(b"u1") + integer(0) + integer(1) + b"\x87R" + put()
             + b"(" + integer(3) + string(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0)
             + b"tb")
    array = (glob(b"numpy.core.multiarray", b"_reconstruct") + glob(b"numpy", b"ndarray")
             + integer(0) + b"\x85" + string(b"b") + b"\x87R" + put() + b"(" + integer(1)
             + b"M" + struct.pack("<H", len(pixels)) + b"M" + struct.pack("<H", 3072) + b"\x86"
             + dtype + b"\x89" + string(pixels.tobytes()) + b"tb")
    names = b"".join(string(f"{i}.png".encode()) for i in range(len(labels)))
    return (b"\x80\x02}" + put() + b"(" + string(b"data") + array
            + string(b"labels") + b"]" + put() + b"(" + b"".join(map(integer, labels)) + b"e"
            + string(b"batch_label") + string(b"training batch 1 of 5")
            + string(b"filenames") + b"]" + put() + b"(" + names + b"e" + b"u.")


def batch_pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def test_python_2_batch_as_in_the_real_files(tmp_path):
    pixels, labels = batch_pixels(3, seed=0), [6, 9, 0]
    payload = py2_batch(pixels, labels)
    with warnings.catch_warnings():  # numpy warns about numpy.core; this only checks the fixture
        warnings.simplefilter("ignore", DeprecationWarning)
        unpickled = pickle.loads(payload, encoding="bytes")
    np.testing.assert_array_equal(unpickled[b"data"], pixels)  # the fixture is a real pickle
    (tmp_path / "data_batch_1").write_bytes(payload)
    got_pixels, got_labels = read_python_batch(tmp_path / "data_batch_1")
    np.testing.assert_array_equal(got_pixels, pixels)
    assert got_labels.dtype == np.int64 and got_labels.tolist() == labels


def write_batches(folder, images_per_batch=2, protocol=None):
    """Five training batches and a test batch; returns (pixels, labels) of all 12 images."""
    folder.mkdir()
    pixels, labels = batch_pixels(6 * images_per_batch, seed=1), [i % 10 for i in range(12)]
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        part = slice(i * images_per_batch, (i + 1) * images_per_batch)
        if protocol is None:
            payload = py2_batch(pixels[part], labels[part])
        else:  # bytes keys and values, as a Python 3 user re-pickling the dict would write
            batch = {b"batch_label": b"batch", b"labels": labels[part], b"data": pixels[part],
                     b"filenames": [b"a.png", b"b.png"]}
            payload = pickle.dumps(batch, protocol=protocol)
        (folder / name).write_bytes(payload)
    return pixels, np.array(labels)


@pytest.mark.parametrize("protocol", [None, 4])
def test_cifar10_python_prepare_keeps_labels(tmp_path, protocol):
    pixels, labels = write_batches(tmp_path / "cifar-10-batches-py", protocol=protocol)
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert prepare(tmp_path, tmp_path / "train.npy", progress=False) == 10
    np.testing.assert_array_equal(np.load(tmp_path / "train.npy"), images[:10])
    np.testing.assert_array_equal(np.load(tmp_path / "train_labels.npy"), labels[:10])
    assert (tmp_path / "train_classes.json").read_text().count('"') == 20
    assert prepare(tmp_path, tmp_path / "test.npy", split="test", progress=False) == 2
    np.testing.assert_array_equal(np.load(tmp_path / "test_labels.npy"), labels[10:])


class Marker:
    """Unpickling this creates a directory: a visible trace that a pickle ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


class ForgedDtype:
    """Pickles as a void dtype whose state says its 8 bytes are an object pointer."""

    def __reduce__(self):
        fields = {"a": (np.dtype("O"), 0)}
        return np.dtype, ("V8", False, True), (3, "|", None, ("a",), fields, 8, 1, 25)


class ForgedArray:
    """Pickles as an array of that dtype holding the pointer 0x4141414141414141."""

    def __reduce__(self):
        return _reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), ForgedDtype(), False, b"A" * 8)


class HugeArray:
    """Pickles as numpy asked for a 10 TB array."""

    def __reduce__(self):
        return _reconstruct, (np.ndarray, (10**13,), b"b")


def batch_with(data) -> bytes:
    return pickle.dumps({b"batch_label": b"x", b"labels": [0], b"data": data,
                         b"filenames": [b"a.png"]}, protocol=4)


def run_python(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_forged_pointer_batch_is_refused_without_a_crash(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    payload = batch_with(ForgedArray())
    (folder / "test_batch").write_bytes(payload)
    # In a subprocess: a reader that built this array would die of a segmentation fault.
    run = run_python("from axial_transformer.data.__main__ import main; main()", "prepare", folder,
                     tmp_path / "out.npy", "--split", "test", "--format", "cifar10-python")
    assert run.returncode == 2, (run.returncode, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "test_batch" in lines[0], lines
    assert "refused global" not in lines[0]  # numpy's own globals: the structure check refuses it
    # Negative control: building the objects the payload describes does crash the process.
    (tmp_path / "payload.pkl").write_bytes(payload)
    crash = run_python("import pickle, sys; print(pickle.loads(open(sys.argv[1], 'rb').read()))",
                       tmp_path / "payload.pkl")
    assert crash.returncode == -11, (crash.returncode, crash.stderr)  # SIGSEGV, exit code 139


def test_code_running_batch_is_refused(tmp_path):
    marker = tmp_path / "pickle_ran"
    (tmp_path / "data_batch_1").write_bytes(batch_with(Marker(marker)))
    with pytest.raises(ValueError, match=r"data_batch_1: not a CIFAR-10 python batch \(refused "
                                         r"global '(posix|os)'\.'mkdir'\)") as error:
        read_python_batch(tmp_path / "data_batch_1")
    assert "\n" not in str(error.value)
    assert not marker.exists()
    pickle.loads(batch_with(Marker(marker)))  # negative control: a plain unpickler runs it
    assert marker.exists()


def test_huge_array_batch_is_refused_without_allocating(tmp_path):
    (tmp_path / "huge").write_bytes(batch_with(HugeArray()))
    with pytest.raises(ValueError, match=r"huge: .*b'data' is not a numpy array"):
        read_python_batch(tmp_path / "huge")
    # A shape that claims more rows than the bytes stored.
    lying = py2_batch(batch_pixels(1, seed=0), [0]).replace(b"M\x01\x00M\x00\x0c",
                                                            b"J\xff\xff\xff\x7fM\x00\x0c")
    (tmp_path / "lying").write_bytes(lying)
    with pytest.raises(ValueError, match=r"lying: .*does not hold 2147483647 x 3072 bytes"):
        read_python_batch(tmp_path / "lying")


@pytest.mark.parametrize("change, message", [
    (lambda p: p[:-40], "only 20 remain"),  # truncated
    (lambda p: p.replace(b"U\x06labels", b"U\x06LABELS"), "expected a dict with keys"),
    (lambda p: p.replace(b"K\x06K\tK\x00e", b"K\x06K\nK\x00e"), "ints 0..9"),
    (lambda p: p.replace(b"U\x02u1", b"U\x02f8"), "not a uint8 array"),
    (lambda p: b"\x80\x05" + p[2:], "protocol 5"),
    (lambda p: p.replace(b"M\x00\x0c", b"M\x00\x0b"), r"shape \(3, 2816\)"),
])
def test_damaged_batches_are_refused(tmp_path, change, message):
    payload = py2_batch(batch_pixels(3, seed=0), [6, 9, 0])
    (tmp_path / "data_batch_1").write_bytes(change(payload))
    with pytest.raises(ValueError, match=rf"data_batch_1: not a CIFAR-10 python batch .*{message}"):
        read_python_batch(tmp_path / "data_batch_1")
