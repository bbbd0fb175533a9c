"""Readers of the image sources that `prepare` converts to a uint8 .npy.

Each reader opens one split of one source as a `Source` of records `(index, name, payload)`: the
payload is an image file (its bytes or path), a decoded uint8 array [H, W, C], or the refusal of
a file too large to read; `index` is the image's place in the output, so the order never depends
on how a source is read. Nothing here unpickles (cifar.py parses CIFAR-10's pickles)."""

from __future__ import annotations

import gzip
import lzma
import math
import re
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cifar import read_python_batch
from .image_files import IMAGE_SUFFIXES, CorruptImageError, check_image_bytes
from .labels import check_labels, labels_path, load_class_names, load_labels

Record = tuple[int, str, bytes | Path | np.ndarray | CorruptImageError]

SPLITS = ("train", "test")
PREPARE_HINT = "create it with `python -m axial_transformer.data prepare SOURCE OUT.npy`"

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
# torchvision's FashionMNIST.classes; the idx files are named exactly like MNIST's, so Fashion-MNIST
# is told apart by "fashion" in its path (torchvision keeps it under FashionMNIST/raw).
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]


@dataclass
class Source:
    format: str
    path: Path
    count: int
    records: Iterator[Record]
    labels: np.ndarray | None = None  # int64 [count]: the class of record `index`, if known
    classes: list[str] | None = None  # the name of each class, by label
    note: str | None = None  # a caveat to show whoever prepares this source
    damage: str | None = None  # where a damaged archive broke; `count` is what came before it


def open_source(path: str | Path, format: str = "auto", split: str = "train") -> Source:
    """One split of a source (a tar, an image folder or a .npy is one split already)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not (path.is_file() or path.is_dir()):  # opening a FIFO would wait for a writer
        raise ValueError(f"{path}: not a regular file or a directory (a FIFO, socket or device); "
                         f"expected an image source to read")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    format = detect_format(path) if format == "auto" else format
    if format not in READERS:
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    return READERS[format](path, split)


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        if (path / "cifar-10-batches-bin").is_dir() or any(path.glob("*_batch*.bin")):
            return "cifar10"
        if (path / "cifar-10-batches-py").is_dir() or any(
                (path / name).is_file() for name in ("batches.meta", "data_batch_1", "test_batch")):
            return "cifar10-python"
        return "mnist" if mnist_dirs(path) else "npz" if any(path.glob("*.npz")) else "folder"
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return "tar"
    if path.suffix.lower() in (".npz", ".npy", ".bin"):
        return {".npz": "npz", ".npy": "npy", ".bin": "cifar10"}[path.suffix.lower()]
    if "idx3-ubyte" in name:
        return "mnist"
    if tarfile.is_tarfile(path):
        return "tar"
    raise ValueError(f"{path}: cannot tell its format; pass format= (one of {FORMATS})")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def array_source(format: str, path: Path, arrays: Iterable[tuple[Path, np.ndarray]], count: int,
                 **fields) -> Source:
    """A Source of arrays [N, H, W, C], read as the records reach them; image i is `file[i]`."""
    named = ((f"{file}[{i}]", image) for file, array in arrays for i, image in enumerate(array))
    records = ((index, name, image) for index, (name, image) in enumerate(named))
    return Source(format, path, count, records, **fields)


def planes_to_hwc(rows: np.ndarray, size: int) -> np.ndarray:
    """Rows [N, 3*S*S] of red, green and blue planes (npz batches, CIFAR-10) -> [N, S, S, 3]."""
    return rows.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)


# ---- ImageNet-32/64 (van den Oord et al.) tars, and folders of images ----

# What a damaged archive raises while it is read: tarfile's errors, and those of the
# decompressors under it (gzip: OSError, EOFError, zlib.error; bz2: OSError; xz: LZMAError).
ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)
# The magic bytes of the compressions tarfile reads, and its mode for each.
COMPRESSION_MAGIC = {b"\x1f\x8b": "r:gz", b"BZh": "r:bz2", b"\xfd7zXZ\x00": "r:xz"}
# An image member takes at least this many bytes of the archive file, compressed or not: a tar
# header alone is 512 bytes, and a PNG or JPEG barely compresses. A compressed tar of far more
# members than its size allows is a bomb of empty entries (20M of them fit in a 10 MB .tar.gz),
# whose name list alone would take gigabytes.
MIN_ARCHIVE_BYTES_PER_MEMBER = 32


class EndCheckedTarInfo(tarfile.TarInfo):
    """A tar header that only the end-of-archive marker ends: tarfile takes a header cut short,
    missing or failing its checksum after the first member for the end, so a tar cut in half
    would read as a smaller one."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            raise tarfile.ReadError("the archive ends without its end-of-archive marker "
                                    "(truncated)") from None
        except tarfile.InvalidHeaderError as e:  # not EOFHeaderError, the end-of-archive marker
            raise tarfile.ReadError(f"a damaged header ({e})") from None


def open_tar(path: Path) -> tarfile.TarFile:
    """Opened with the decompressor its first bytes name, so that an error is that of its own
    decompressor, not of every one tried in turn."""
    with open(path, "rb") as f:
        head = f.read(6)
    mode = next((m for magic, m in COMPRESSION_MAGIC.items() if head.startswith(magic)), "r:")
    try:
        return tarfile.open(path, mode, tarinfo=EndCheckedTarInfo)
    except ARCHIVE_ERRORS as e:
        raise ValueError(f"{path}: not a readable tar archive ({e})") from None


def tar_members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, bool]]:
    """(member, whether it is an image file), in archive order."""
    while (member := tar.next()) is not None:
        tar.members.clear()  # TarFile keeps every header it has read: a gigabyte for 1.28M
        yield member, member.isfile() and is_image_name(member.name)


def read_tar(path: Path, split: str) -> Source:
    """Image members in sorted name order. Read twice, front to back: to its end for the names
    (and a compressed one through its checksum, to find damage), then for the bytes, each placed
    at its name's rank, so a 4 GB tar is never held in memory and the order does not depend on how
    it was packed."""
    members, last, image, damage, note = [], None, False, None, None  # members: (name, size)
    most = 1000 + path.stat().st_size // MIN_ARCHIVE_BYTES_PER_MEMBER
    with open_tar(path) as tar:
        try:
            for member, image in tar_members(tar):
                last = member.name
                if image:
                    members.append((member.name, member.size))
                    if len(members) > most:
                        raise ValueError(f"{path}: more than {most:,} image members in "
                                         f"{path.stat().st_size:,} bytes; an archive of images "
                                         f"holds at most one per {MIN_ARCHIVE_BYTES_PER_MEMBER} "
                                         f"bytes (a bomb of empty entries?)")
            image = None  # every header was read
            while tar.fileobj.read(2**20):  # the rest of a compressed stream: its checksum
                pass
        except ARCHIVE_ERRORS as e:
            if image is None:
                damage = (f"{path}: fails its checksum ({e}): its image members were read, but "
                          f"one of them may be damaged")
            else:
                if image:  # its data may be what broke
                    members.pop()
                where = f"at member {last!r} or just after it" if last else "at its first member"
                damage = (f"{path}: damaged {where} ({e}); the {len(members):,} image members "
                          f"before it are intact")
            note = (f"{damage}; skipped {int(bool(image))} damaged image member(s) there, and "
                    f"whatever followed them")
    names = np.array([name for name, _ in members], dtype=object)
    rank = np.argsort(np.argsort(names, kind="stable"))  # a name's place in sorted order

    def records() -> Iterator[Record]:
        with open_tar(path) as tar:
            images = (member for member, image in tar_members(tar) if image)
            for k, (name, size) in enumerate(members):
                try:
                    member = next(images, None)
                    if member is None or (member.name, member.size) != (name, size):
                        raise ValueError(f"{path}: member {k} is not {name} on the second read: "
                                         f"the archive changed")
                    check_image_bytes(size, f"{path}:{name}")  # from the header, before reading
                    data = tar.extractfile(member).read()
                except CorruptImageError as e:
                    data = e
                except ARCHIVE_ERRORS as e:
                    raise ValueError(f"{path}: cannot read member {name} ({e})") from None
                yield int(rank[k]), name, data

    return Source("tar", path, len(members), records(), note=note, damage=damage)


def folder_source(format: str, path: Path, suffixes: tuple[str, ...],
                  kind: str) -> tuple[Source, list[str]]:
    """The files under `path` whose names end in `suffixes`, and their relative names, sorted
    by relative path (the order never depends on how the file system lists them); any other
    file is said in the note, not silently left out (a .gif among photos, a README)."""
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    wanted = [name for name in files if name.lower().endswith(suffixes)]
    if not wanted:
        raise ValueError(f"{path}: no {kind} ({', '.join(suffixes)} files) in this folder")
    source = Source(format, path, len(wanted),
                    ((i, str(path / name), path / name) for i, name in enumerate(wanted)))
    others = [name for name in files if not name.lower().endswith(suffixes)]
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        source.note = (f"{path}: skipped {len(others)} file(s) that are not "
                       f"{', '.join(suffixes)}: {shown}")
    return source, wanted


def read_folder(path: Path, split: str) -> Source:
    """Image files anywhere under `path`, sorted by relative path. When every one lies inside a
    sub-folder and there are at least two, the sorted sub-folders are the classes (torchvision's
    ImageFolder layout)."""
    source, relative = folder_source("folder", path, IMAGE_SUFFIXES, "images")
    folders = [name.split("/")[0] if "/" in name else None for name in relative]
    if None not in folders:
        classes, labels = np.unique(folders, return_inverse=True)
        if len(classes) >= 2:
            source.labels, source.classes = labels.astype(np.int64), classes.tolist()
    return source


# ---- Imagenet32/64 npz batches (Chrabaszcz et al. 2017) ----

CHRABASZCZ_NOTE = (
    "{path} is Chrabaszcz et al.'s Imagenet32/64 (npz batches), not the van den Oord et al. "
    "downsampled ImageNet (train_32x32.tar, valid_32x32.tar, ...) on which the Axial Transformer "
    "paper reports bits/dim: numbers on it are not comparable with the paper's"
)
# NotImplementedError: an unknown zip compression.
NPZ_ERRORS = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error,
              NotImplementedError)


def read_npz(path: Path, split: str) -> Source:
    """`train_data_batch_1.npz` .. `_10.npz` (train), `val_data.npz` (test), or one .npz: key
    `data` uint8 [N, 3*S*S] as R, G, B planes, key `labels` 1..1000 (kept as 0..999)."""
    files = [path]
    if path.is_dir():
        pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
        files = sorted(path.glob(pattern), key=lambda p: [int(t) for t in re.findall(r"\d+",
                                                                                      p.name)])
        if not files:
            raise ValueError(f"{path}: no {pattern} for the {split!r} split")
    headers = [npz_header(file) for file in files]
    labelled = [has_labels for _, _, has_labels in headers]
    if any(labelled) and not all(labelled):
        raise ValueError(f"{files[labelled.index(False)]}: no 'labels' array, but "
                         f"{files[labelled.index(True)].name} has one")
    arrays = ((file, planes_to_hwc(npz_array(file, "data"), size))
              for file, (_, size, _) in zip(files, headers, strict=True))
    source = array_source("npz", path, arrays, sum(n for n, _, _ in headers),
                          note=CHRABASZCZ_NOTE.format(path=path))
    if all(labelled):
        source.labels = np.concatenate([
            check_labels(npz_array(file, "labels"), f"{file} 'labels'", n, 1000, first=1)
            for file, (n, _, _) in zip(files, headers, strict=True)
        ])
        source.classes = [str(k) for k in range(1000)]
        source.note += "; its labels 1..1000 are stored as 0..999"
    return source


def npz_array(file: Path, key: str) -> np.ndarray:
    try:
        with np.load(file, allow_pickle=False) as npz:
            return npz[key]
    except NPZ_ERRORS as e:
        raise ValueError(f"{file}: cannot read its {key!r} array ({e})") from None


def npz_header(file: Path) -> tuple[int, int, bool]:
    """(N, S, whether it has labels) of an npz batch, from the header of its `data` array."""
    keys = []
    try:
        with zipfile.ZipFile(file) as archive:
            keys = [n.removesuffix(".npy") for n in archive.namelist()]
            with archive.open("data.npy") as f:
                version = np.lib.format.read_magic(f)
                shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)(f)
                stored = archive.getinfo("data.npy").file_size - f.tell()
    except KeyError:
        raise ValueError(f"{file}: no 'data' array (it holds {keys}); expected an npz batch with "
                         f"data [N, 3*S*S]") from None
    except NPZ_ERRORS as e:
        raise ValueError(f"{file}: not a readable npz archive ({e})") from None
    if dtype != np.uint8:
        what = "Python objects (a pickle, which is never loaded)" if dtype.hasobject else dtype
        raise ValueError(f"{file}: 'data' must be uint8 [N, 3*S*S], it holds {what}")
    size = math.isqrt(shape[1] // 3) if len(shape) == 2 else 0
    if len(shape) != 2 or 3 * size * size != shape[1]:
        raise ValueError(f"{file}: 'data' must be uint8 [N, 3*S*S], got shape {list(shape)}")
    if math.prod(shape) != stored:  # a lying header would have prepare reserve what it claims
        raise ValueError(f"{file}: 'data' header says {list(shape)} but the archive stores "
                         f"{stored:,} bytes of it")
    return shape[0], size, "labels" in keys


# ---- CIFAR-10 ----

CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the red, green and blue 32x32 planes


def cifar_source(format: str, path: Path, split: str) -> Source:
    """CIFAR-10's binary (`cifar-10-batches-bin`: records of 1 label + 3072 pixel bytes) or
    python version (`cifar-10-batches-py`, parsed without unpickling)."""
    files, binary = [path], format == "cifar10"
    if path.is_dir():
        folder = path / f"cifar-10-batches-{'bin' if binary else 'py'}"
        folder = folder if folder.is_dir() else path
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        files = [folder / (name + ".bin" * binary) for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{folder}: CIFAR-10 {split!r} split needs {missing}")
    batches = [(read_binary_batch if binary else read_python_batch)(file) for file in files]
    return array_source(format, path,
                        [(file, planes_to_hwc(pixels, 32)) for file, (pixels, _) in
                         zip(files, batches, strict=True)],
                        sum(len(pixels) for pixels, _ in batches),
                        labels=np.concatenate([labels for _, labels in batches]),
                        classes=CIFAR10_CLASSES)


def read_binary_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(file, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise ValueError(f"{file}: {raw.size} bytes is not a whole number of CIFAR-10 records of "
                         f"{CIFAR_RECORD} bytes")
    rows = raw.reshape(-1, CIFAR_RECORD)
    return rows[:, 1:], check_labels(rows[:, 0], f"{file} (label bytes)", len(rows), 10)


# ---- MNIST and Fashion-MNIST (torchvision's on-disk layout) ----


def mnist_dirs(path: Path) -> list[Path]:
    """Folders holding idx image files: `path`, `path/raw` or `path/*/raw` (e.g. MNIST/raw)."""
    candidates = [path, path / "raw", *sorted(path.glob("*/raw"))]
    return [d for d in candidates if d.is_dir() and any(d.glob("*-images-idx3-ubyte*"))]


def read_idx(file: Path, dims: int) -> np.ndarray:
    """An idx file of bytes, maybe gzipped: magic 0x0000080D with D = `dims` (3 for images, 1
    for labels), D big-endian int32 sizes, the values."""
    try:
        with (gzip.open if file.name.endswith(".gz") else open)(file, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{file}: cannot read ({e})") from None
    magic, start = bytes([0, 0, 8, dims]), 4 + 4 * dims
    if raw[:4] != magic or len(raw) < start:
        raise ValueError(f"{file}: not an idx{dims}-ubyte file (magic {raw[:4].hex()}, expected "
                         f"{magic.hex()})")
    shape = np.frombuffer(raw, ">u4", dims, 4).tolist()
    if len(raw) != start + math.prod(shape):
        raise ValueError(f"{file}: header says {'x'.join(map(str, shape))} values but it holds "
                         f"{len(raw) - start}")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(shape)


def read_mnist(path: Path, split: str) -> Source:
    file = path
    if path.is_dir():
        dirs = mnist_dirs(path)
        if len(dirs) != 1:
            raise ValueError(f"{path}: expected one folder of MNIST idx files, found "
                             f"{[str(d) for d in dirs] or 'none'}; pass that folder")
        plain = dirs[0] / f"{'train' if split == 'train' else 't10k'}-images-idx3-ubyte"
        file = plain if plain.is_file() else plain.with_name(plain.name + ".gz")
        if not file.is_file():
            raise ValueError(f"{dirs[0]}: no {plain.name}[.gz] for the {split!r} split")
    images = read_idx(file, 3)[..., None]
    source = array_source("mnist", path, [(file, images)], len(images))
    # train-labels-idx1-ubyte[.gz] beside train-images-idx3-ubyte[.gz]
    name = file.name.removesuffix(".gz").replace("images-idx3", "labels-idx1")
    labels_file = next((f for f in (file.with_name(name), file.with_name(name + ".gz"))
                        if f.is_file() and f.name != file.name), None)
    if labels_file is None:
        source.note = f"{file}: no labels-idx1-ubyte file beside it, so no labels are kept"
    else:
        source.labels = check_labels(read_idx(labels_file, 1), str(labels_file), len(images), 10)
        fashion = "fashion" in file.resolve().as_posix().lower()
        source.classes = FASHION_MNIST_CLASSES if fashion else [str(d) for d in range(10)]
    return source


# ---- arrays ----


def check_uint8_array(array: np.ndarray, name: str) -> None:
    """What image and clip arrays share: a numpy array of uint8 pixels."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array saved as .npy, got "
                         f"{type(array).__name__}")
    if array.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 pixels 0..255, got dtype {array.dtype}")


def check_image_array(array: np.ndarray, name: str) -> np.ndarray:
    """A uint8 [N, H, W, C] or [N, H, W] array as [N, H, W, C] (no copy)."""
    check_uint8_array(array, name)
    if array.ndim not in (3, 4):
        raise ValueError(f"{name}: expected shape [N, H, W, C] or [N, H, W], got "
                         f"{list(array.shape)}")
    return array[..., None] if array.ndim == 3 else array


def memory_map(path: str | Path, kind: str, hint: str = PREPARE_HINT) -> tuple[Path, np.ndarray]:
    """A prepared .npy of `kind` ("image", "clip"), memory-mapped, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {kind} array; {hint}")
    try:
        return path, np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # object arrays, damaged or foreign files
        raise ValueError(f"{path}: not a uint8 .npy {kind} array ({e})") from None


def load_array(path: str | Path) -> np.ndarray:
    """Memory-map a prepared uint8 .npy of images as [N, H, W, C] ([N, H, W] gets C = 1)."""
    path, array = memory_map(path, "image")
    return check_image_array(array, str(path))


def read_npy(path: Path, split: str) -> Source:
    """A uint8 .npy of images, labelled by `X_labels.npy` beside `X.npy` (classes named by
    `X_classes.json`, or numbered)."""
    images = load_array(path)
    source = array_source("npy", path, [(path, images)], len(images))
    if labels_path(path).is_file():
        classes = load_class_names(path)
        source.labels = load_labels(path, len(images), None if classes is None else len(classes))
        numbered = [str(k) for k in range(int(source.labels.max(initial=-1)) + 1)]
        source.classes = numbered if classes is None else classes
    return source


READERS = {
    "tar": read_tar,
    "folder": read_folder,
    "npz": read_npz,
    "cifar10": lambda path, split: cifar_source("cifar10", path, split),
    "cifar10-python": lambda path, split: cifar_source("cifar10-python", path, split),
    "mnist": read_mnist,
    "npy": read_npy,
}
FORMATS = tuple(READERS)
