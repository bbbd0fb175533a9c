"""Readers for the image sources that `prepare` converts to a uint8 .npy.

Each reader opens one split of one source and returns a `Source`: how many images it holds and
an iterator of records `(index, name, payload)`. The payload is the encoded bytes of an image file
(decoded, checked and possibly skipped by `prepare`) or an already-decoded uint8 array [H, W, C].
`index` is the image's place in the output, so the order never depends on how a source is read.

Nothing here can run a pickle's code: `.npy`/`.npz` load with allow_pickle=False, and CIFAR-10's
python version goes through an unpickler that admits only plain containers, numbers, strings,
bytes and numpy arrays.
"""

from __future__ import annotations

import gzip
import pickle
import re
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

Record = tuple[int, str, bytes | np.ndarray]

FORMATS = ("tar", "folder", "npz", "cifar10", "cifar10-python", "mnist", "npy")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# van den Oord et al. 2016 downsampled ImageNet, the data of the paper's ImageNet-32/64 numbers.
VAN_DEN_OORD_NAME = re.compile(r"^(train|valid)_(32x32|64x64)(\.tar)?$")
VAN_DEN_OORD_COUNTS = {"train": 1_281_149, "valid": 49_999}

CHRABASZCZ_NOTE = (
    "{path} is Chrabaszcz et al.'s Imagenet32/64 (npz batches), not the van den Oord et al. "
    "downsampled ImageNet (train_32x32.tar, valid_32x32.tar, ...) on which the Axial Transformer "
    "paper reports bits/dim: numbers on it are not comparable with the paper's"
)


@dataclass
class Source:
    format: str
    path: Path
    count: int
    records: Iterator[Record]
    expected_count: int | None = None  # the published image count, where there is one
    note: str | None = None  # a caveat to show whoever prepares this source


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_file():
        if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            return "tar"
        for suffix, fmt in ((".npz", "npz"), (".npy", "npy"), (".bin", "cifar10")):
            if name.endswith(suffix):
                return fmt
        if "idx3-ubyte" in name:
            return "mnist"
        if tarfile.is_tarfile(path):
            return "tar"
        raise ValueError(f"{path}: cannot tell its format; pass format= (one of {FORMATS})")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if (path / "cifar-10-batches-bin").is_dir() or any(path.glob("*_batch*.bin")):
        return "cifar10"
    if (path / "cifar-10-batches-py").is_dir() or (path / "batches.meta").is_file():
        return "cifar10-python"
    if mnist_dirs(path):
        return "mnist"
    if any(path.glob("*.npz")):
        return "npz"
    return "folder"


def open_source(path: str | Path, format: str = "auto", split: str = "train") -> Source:
    """Open one split of a source. `split` picks the files of multi-split sources (CIFAR-10,
    MNIST, a folder of npz batches); a tar, an image folder or a .npy is a single split."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    format = detect_format(path) if format == "auto" else format
    readers = {
        "tar": read_tar,
        "folder": read_folder,
        "npz": read_npz,
        "cifar10": read_cifar10,
        "cifar10-python": read_cifar10_python,
        "mnist": read_mnist,
        "npy": read_npy,
    }
    if format not in readers:
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    return readers[format](path, split)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def van_den_oord_count(path: Path) -> int | None:
    match = VAN_DEN_OORD_NAME.match(path.name)
    return VAN_DEN_OORD_COUNTS[match.group(1)] if match else None


def array_records(arrays: list[tuple[str, np.ndarray]]) -> Iterator[Record]:
    """Records of decoded arrays [N, H, W, C], named `file[i]`."""
    index = 0
    for name, array in arrays:
        for i in range(len(array)):
            yield index, f"{name}[{i}]", array[i]
            index += 1


# ---- ImageNet-32/64 (van den Oord et al.) tars, and folders of images ----


def read_tar(path: Path, split: str) -> Source:
    """Image members in sorted name order. Reads the archive twice, both times streaming: once
    for the names, once for the bytes, each placed at its name's rank (so a 4 GB tar is never
    held in memory and the order does not depend on how the tar was packed)."""
    with tarfile.open(path, "r:*") as tar:  # random access: skips over the data of each member
        names = [member.name for member in tar_members(path, tar)]
    order = np.argsort(np.array(names, dtype=object), kind="stable")
    rank = np.empty(len(names), dtype=np.int64)
    rank[order] = np.arange(len(names))

    def records() -> Iterator[Record]:
        with tarfile.open(path, "r|*") as tar:  # streaming: reads the archive front to back
            for k, member in enumerate(tar_members(path, tar)):
                try:
                    data = tar.extractfile(member).read()
                except tarfile.TarError as e:
                    raise ValueError(f"{path}: cannot read member {member.name} ({e})") from None
                yield int(rank[k]), member.name, data

    return Source("tar", path, len(names), records(), expected_count=van_den_oord_count(path))


def tar_members(path: Path, tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Regular image files of a tar, in archive order."""
    try:
        while (member := tar.next()) is not None:
            # TarFile keeps every header it has read; for 1.28M members that is about a gigabyte.
            tar.members.clear()
            if member.isfile() and is_image_name(member.name):
                yield member
    except tarfile.TarError as e:
        raise ValueError(f"{path}: not a readable tar archive ({e})") from None


def read_folder(path: Path, split: str) -> Source:
    """PNG and JPEG files anywhere under `path`, sorted by their relative path."""
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and is_image_name(p.name)),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)} files) in this folder")
    records = ((i, str(file), file.read_bytes()) for i, file in enumerate(files))
    return Source("folder", path, len(files), records, expected_count=van_den_oord_count(path))


# ---- Imagenet32/64 npz batches (Chrabaszcz et al. 2017) ----


def read_npz(path: Path, split: str) -> Source:
    """`train_data_batch_1.npz` .. `_10.npz` (train) or `val_data.npz` (test), or one .npz file.
    Key `data` is uint8 [N, 3*S*S]: the red plane, then green, then blue; labels are ignored."""
    if path.is_dir():
        pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
        batch_number = lambda p: [int(t) for t in re.findall(r"\d+", p.name)]
        files = sorted(path.glob(pattern), key=batch_number)
        if not files:
            raise ValueError(f"{path}: no {pattern} for the {split!r} split")
    else:
        files = [path]
    counts = [npz_data_header(file)[0] for file in files]

    def records() -> Iterator[Record]:
        index = 0
        for file in files:
            with np.load(file, allow_pickle=False) as npz:
                data = npz["data"]
            size = int(round((data.shape[1] / 3) ** 0.5))
            images = data.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)
            for _, name, image in array_records([(str(file), images)]):
                yield index, name, image
                index += 1

    return Source("npz", path, sum(counts), records(), note=CHRABASZCZ_NOTE.format(path=path))


def npz_data_header(file: Path) -> tuple[int, int]:
    """(N, S) of an npz batch, read from the header of its `data` array without loading it."""
    try:
        with zipfile.ZipFile(file) as archive:
            keys = [n.removesuffix(".npy") for n in archive.namelist()]
            if "data" not in keys:
                raise ValueError(
                    f"{file}: no 'data' array (it holds {keys}); expected an npz batch with "
                    f"data [N, 3*S*S]"
                )
            with archive.open("data.npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{file}: not an npz archive ({e})") from None
    if dtype != np.uint8:
        what = "Python objects (a pickle, which is never loaded)" if dtype.hasobject else dtype
        raise ValueError(f"{file}: 'data' must be uint8 [N, 3*S*S], it holds {what}")
    size = int(round((shape[1] / 3) ** 0.5)) if len(shape) == 2 else 0
    if len(shape) != 2 or 3 * size * size != shape[1]:
        raise ValueError(f"{file}: 'data' must be uint8 [N, 3*S*S], got shape {list(shape)}")
    return shape[0], size


# ---- CIFAR-10 ----

CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the red, green and blue 32x32 planes


def cifar_files(path: Path, split: str, folder: str, suffix: str) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / folder).is_dir():
        path = path / folder
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    files = [path / (name + suffix) for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{path}: CIFAR-10 {split!r} split needs {missing}")
    return files


def cifar_planes_to_hwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def read_cifar10(path: Path, split: str) -> Source:
    """CIFAR-10 binary version (`cifar-10-batches-bin`): records of 1 label + 3072 pixel bytes."""
    arrays = []
    for file in cifar_files(path, split, "cifar-10-batches-bin", ".bin"):
        raw = np.fromfile(file, dtype=np.uint8)
        if raw.size == 0 or raw.size % CIFAR_RECORD:
            raise ValueError(f"{file}: {raw.size} bytes is not a whole number of CIFAR-10 "
                             f"records of {CIFAR_RECORD} bytes")
        arrays.append((str(file), cifar_planes_to_hwc(raw.reshape(-1, CIFAR_RECORD)[:, 1:])))
    return Source("cifar10", path, sum(len(a) for _, a in arrays), array_records(arrays))


class RestrictedUnpickler(pickle.Unpickler):
    """Builds plain containers, numbers, strings and bytes natively, and numpy arrays through
    the only globals admitted below; any other global (a function, a class) is refused, so
    loading cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}")
        return self.ALLOWED[(module, name)]


def restricted_unpickle(file: Path) -> object:
    try:
        with open(file, "rb") as f:
            # encoding="bytes": the CIFAR-10 pickles were written by Python 2
            return RestrictedUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{file}: not a plain CIFAR-10 python batch ({e})") from None


def read_cifar10_python(path: Path, split: str) -> Source:
    """CIFAR-10 python version (`cifar-10-batches-py`), through `RestrictedUnpickler`."""
    arrays = []
    for file in cifar_files(path, split, "cifar-10-batches-py", ""):
        batch = restricted_unpickle(file)
        data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or (
            data.shape[1] != CIFAR_RECORD - 1
        ):
            raise ValueError(f"{file}: expected a dict with 'data' uint8 [N, 3072]")
        arrays.append((str(file), cifar_planes_to_hwc(data)))
    return Source("cifar10-python", path, sum(len(a) for _, a in arrays), array_records(arrays))


# ---- MNIST and Fashion-MNIST (torchvision's on-disk layout) ----

MNIST_PREFIX = {"train": "train", "test": "t10k"}


def mnist_dirs(path: Path) -> list[Path]:
    """Folders holding idx image files: `path`, `path/raw` or `path/*/raw` (e.g. MNIST/raw)."""
    candidates = [path, path / "raw", *sorted(path.glob("*/raw"))]
    return [d for d in candidates if d.is_dir() and any(d.glob("*-images-idx3-ubyte*"))]


def read_idx_images(file: Path) -> np.ndarray:
    """An idx3-ubyte file (optionally gzipped): magic 0x00000803, three big-endian int32 sizes."""
    opener = gzip.open if file.name.endswith(".gz") else open
    try:
        with opener(file, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{file}: cannot read ({e})") from None
    if raw[:4] != b"\x00\x00\x08\x03" or len(raw) < 16:
        raise ValueError(f"{file}: not an idx3-ubyte image file (magic {raw[:4].hex()})")
    n, h, w = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    if len(raw) != 16 + n * h * w:
        raise ValueError(f"{file}: header says {n} images of {h}x{w} but holds {len(raw) - 16} "
                         f"pixel bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, h, w, 1)


def read_mnist(path: Path, split: str) -> Source:
    prefix = MNIST_PREFIX[split]
    if path.is_file():
        file = path
    else:
        dirs = mnist_dirs(path)
        if len(dirs) != 1:
            found = [str(d) for d in dirs] or "none"
            raise ValueError(f"{path}: expected one folder of MNIST idx files, found {found}; "
                             f"pass that folder")
        plain = dirs[0] / f"{prefix}-images-idx3-ubyte"
        file = plain if plain.is_file() else plain.with_name(plain.name + ".gz")
        if not file.is_file():
            raise ValueError(f"{dirs[0]}: no {plain.name}[.gz] for the {split!r} split")
    images = read_idx_images(file)
    return Source("mnist", path, len(images), array_records([(str(file), images)]))


# ---- arrays ----


PREPARE_HINT = "create it with `python -m axial_transformer.data prepare SOURCE OUT.npy`"


def check_image_array(array: np.ndarray, name: str) -> np.ndarray:
    """Validate a uint8 [N, H, W, C] or [N, H, W] array; return it as [N, H, W, C] (no copy)."""
    if not isinstance(array, np.ndarray):
        kind = type(array).__name__
        raise ValueError(f"{name}: expected a numpy array saved as .npy, got {kind}")
    if array.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 pixels 0..255, got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        shape = list(array.shape)
        raise ValueError(f"{name}: expected shape [N, H, W, C] or [N, H, W], got {shape}")
    return array


def load_array(path: str | Path) -> np.ndarray:
    """Memory-map a prepared uint8 .npy of images; returns [N, H, W, C] ([N, H, W] gets C = 1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image array; {PREPARE_HINT}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # object arrays (pickles) and files that are not .npy at all
        raise ValueError(f"{path}: not a uint8 .npy image array ({e})") from None
    return check_image_array(array, str(path))


def read_npy(path: Path, split: str) -> Source:
    images = load_array(path)
    return Source("npy", path, len(images), array_records([(str(path), images)]))
