"""Readers for the image sources that `prepare` converts to a uint8 .npy.

Each reader opens one split of one source and returns a `Source`: how many images it holds and
an iterator of records `(index, name, payload)`. The payload is the encoded bytes of an image file
(decoded, checked and possibly skipped by `prepare`) or an already-decoded uint8 array [H, W, C].
`index` is the image's place in the output, so the order never depends on how a source is read.
Sources with class labels also give them, one per record index, and the class names.

Nothing here unpickles: `.npy`/`.npz` load with allow_pickle=False, and CIFAR-10's python version
is parsed by `cifar_pickle`, which builds plain values only.
"""

from __future__ import annotations

import gzip
import lzma
import math
import re
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cifar import read_python_batch
from .image_files import CorruptImageError, check_image_bytes, read_image_bytes
from .labels import check_labels, labels_path, load_class_names, load_labels

# The payload: an image file's bytes, a decoded uint8 array, or the refusal of a file too large.
Record = tuple[int, str, bytes | np.ndarray | CorruptImageError]

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
CHRABASZCZ_LABELS_NOTE = "; its labels 1..1000 are stored as 0..999"

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
MNIST_CLASSES = [str(digit) for digit in range(10)]
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
    expected_count: int | None = None  # the published image count, where there is one
    note: str | None = None  # a caveat to show whoever prepares this source
    labels: np.ndarray | None = None  # int64 [count]: the class of record `index`, if known
    classes: list[str] | None = None  # the name of each class, by label
    damage: str | None = None  # where a damaged archive broke; `count` is what came before it
    damaged: int = 0  # image members lost at the break


def numbered_classes(labels: np.ndarray) -> list[str]:
    """Class names "0", "1", ... for labels that come without names."""
    return [str(k) for k in range(int(labels.max(initial=-1)) + 1)]


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
    if (path / "cifar-10-batches-py").is_dir() or any(
        (path / name).is_file() for name in ("batches.meta", "data_batch_1", "test_batch")
    ):
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
    if not (path.is_file() or path.is_dir()):  # opening a FIFO would wait for a writer
        raise ValueError(f"{path}: not a regular file or a directory (a FIFO, socket or device); "
                         f"expected an image source to read")
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


# What a damaged archive raises while it is read: tarfile's errors, and those of the
# decompressors under it (gzip: OSError, EOFError, zlib.error; bz2: OSError; xz: LZMAError).
ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


class EndCheckedTarInfo(tarfile.TarInfo):
    """A tar header that tells a damaged archive from one that ended: tarfile takes a header cut
    short, missing or failing its checksum after the first member for the end of the archive,
    so a tar cut in half would read as a smaller one. Only a block of zeros (the end-of-archive
    marker) ends this one."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            raise tarfile.ReadError("the archive ends without its end-of-archive marker "
                                    "(truncated)") from None
        except tarfile.InvalidHeaderError as e:
            if isinstance(e, tarfile.EOFHeaderError):  # the end-of-archive marker
                raise
            raise tarfile.ReadError(f"a damaged header ({e})") from None


@dataclass
class TarScan:
    """What the first read of a tar found: its image members in archive order, as (name, size in
    bytes), and where it broke, if it did."""

    members: list[tuple[str, int]]
    damage: str | None = None
    damaged: int = 0  # image members lost at the break


# An image member takes at least this many bytes of the archive file, compressed or not: a tar
# header alone is 512 bytes, and a PNG or JPEG barely compresses. A compressed tar of far more
# members than its size allows is a bomb of empty entries (20M of them fit in a 10 MB .tar.gz),
# whose name list alone would take gigabytes.
MIN_ARCHIVE_BYTES_PER_MEMBER = 32


def scan_tar(path: Path) -> TarScan:
    """Read a tar once, front to back, to its end: every header, and for a compressed tar every
    byte, so that a damaged or truncated stream and a failed checksum are found here."""
    scan, last, image = TarScan([]), None, False
    most_members = 1000 + path.stat().st_size // MIN_ARCHIVE_BYTES_PER_MEMBER
    try:
        tar = tarfile.open(path, tar_mode(path), tarinfo=EndCheckedTarInfo)
    except ARCHIVE_ERRORS as e:
        raise ValueError(f"{path}: not a readable tar archive ({one_line(e)})") from None
    with tar:
        try:
            while (member := tar.next()) is not None:
                # TarFile keeps every header it has read; for 1.28M members that is a gigabyte.
                tar.members.clear()
                last, image = member.name, member.isfile() and is_image_name(member.name)
                if image:
                    scan.members.append((member.name, member.size))
                    if len(scan.members) > most_members:
                        raise ValueError(
                            f"{path}: more than {most_members:,} image members in "
                            f"{path.stat().st_size:,} bytes; an archive of images holds at "
                            f"most one per {MIN_ARCHIVE_BYTES_PER_MEMBER} bytes (a bomb of "
                            "empty entries?)")
        except ARCHIVE_ERRORS as e:
            if image:  # its data may be what broke
                scan.members.pop()
                scan.damaged = 1
            where = f"at member {last} or just after it" if last else "at its first member"
            scan.damage = (f"{path}: damaged {where} ({one_line(e)}); the "
                           f"{len(scan.members):,} image members before it are intact")
            return scan
        try:  # the rest of a compressed stream, which ends with its checksum
            while tar.fileobj.read(2**20):
                pass
        except ARCHIVE_ERRORS as e:
            scan.damage = (f"{path}: fails its checksum ({one_line(e)}): its image members "
                           f"were read, but one of them may be damaged")
    return scan


# The magic bytes of the compressions tarfile reads, and its mode for each.
COMPRESSION_MAGIC = {b"\x1f\x8b": "r:gz", b"BZh": "r:bz2", b"\xfd7zXZ\x00": "r:xz"}


def tar_mode(path: Path) -> str:
    """tarfile's mode for the compression the file starts with (so that an error is that of its
    own decompressor, not of every one tried in turn)."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next((mode for magic, mode in COMPRESSION_MAGIC.items() if head.startswith(magic)),
                "r:")


def one_line(error: Exception) -> str:
    """An error's message on one line (tarfile's list one failed method a line)."""
    return " ".join(str(error).split())


def read_tar(path: Path, split: str) -> Source:
    """Image members in sorted name order. Reads the archive twice, both times streaming: once
    for the names (and to find damage), once for the bytes, each placed at its name's rank (so a
    4 GB tar is never held in memory and the order does not depend on how the tar was packed).
    A member larger than an image file may be is refused from its header, before it is read;
    of a damaged archive, only the image members before the break are read."""
    scan = scan_tar(path)
    names = [name for name, _ in scan.members]
    order = np.argsort(np.array(names, dtype=object), kind="stable")
    rank = np.empty(len(names), dtype=np.int64)
    rank[order] = np.arange(len(names))

    def records() -> Iterator[Record]:
        with tarfile.open(path, "r|*") as tar:  # streaming: reads the archive front to back
            members = tar_members(path, tar)
            for k, (name, size) in enumerate(scan.members):
                member = next(members)
                if member.name != name or member.size != size:
                    raise ValueError(f"{path}: member {k} is {member.name} on the second read, "
                                     f"{name} on the first: the archive changed")
                try:
                    check_image_bytes(size, f"{path}:{name}")
                    data = tar.extractfile(member).read()
                except CorruptImageError as e:
                    data = e
                except ARCHIVE_ERRORS as e:
                    raise ValueError(f"{path}: cannot read member {name} ({e})") from None
                yield int(rank[k]), name, data

    return Source("tar", path, len(names), records(), expected_count=van_den_oord_count(path),
                  damage=scan.damage, damaged=scan.damaged)


def tar_members(path: Path, tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Regular image files of a tar, in archive order."""
    try:
        while (member := tar.next()) is not None:
            tar.members.clear()
            if member.isfile() and is_image_name(member.name):
                yield member
    except ARCHIVE_ERRORS as e:
        raise ValueError(f"{path}: not a readable tar archive ({e})") from None


def image_bytes(file: Path) -> bytes | CorruptImageError:
    """The bytes of an image file, or the refusal of one too large, made before reading it."""
    try:
        return read_image_bytes(file)
    except CorruptImageError as e:
        return e


def read_folder(path: Path, split: str) -> Source:
    """PNG and JPEG files anywhere under `path`, sorted by their relative path.

    When every image lies inside a sub-folder and there are at least two of them, the sub-folders
    are the classes (torchvision's ImageFolder layout): sorted folder names are labels 0..K-1."""
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    relative = [name for name in files if is_image_name(name)]
    if not relative:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)} files) in this folder")
    records = ((i, str(path / name), image_bytes(path / name)) for i, name in enumerate(relative))
    source = Source("folder", path, len(relative), records,
                    expected_count=van_den_oord_count(path))
    others = [name for name in files if not is_image_name(name)]
    if others:  # a .gif, a .webp or a README: said, not silently left out
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        source.note = (f"{path}: skipped {len(others)} file(s) that are not "
                       f"{', '.join(IMAGE_SUFFIXES)}: {shown}")
    folders = [name.split("/")[0] if "/" in name else None for name in relative]
    classes = sorted(set(folders) - {None})
    if None not in folders and len(classes) >= 2:
        label = {folder: k for k, folder in enumerate(classes)}
        source.labels = np.array([label[folder] for folder in folders], dtype=np.int64)
        source.classes = classes
    return source


# ---- Imagenet32/64 npz batches (Chrabaszcz et al. 2017) ----


def read_npz(path: Path, split: str) -> Source:
    """`train_data_batch_1.npz` .. `_10.npz` (train) or `val_data.npz` (test), or one .npz file.
    Key `data` is uint8 [N, 3*S*S]: the red plane, then green, then blue; key `labels` holds
    1..1000, kept as 0..999."""
    if path.is_dir():
        pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
        batch_number = lambda p: [int(t) for t in re.findall(r"\d+", p.name)]
        files = sorted(path.glob(pattern), key=batch_number)
        if not files:
            raise ValueError(f"{path}: no {pattern} for the {split!r} split")
    else:
        files = [path]
    headers = [npz_data_header(file) for file in files]
    labelled = [has_labels for _, _, has_labels in headers]
    if any(labelled) and not all(labelled):
        raise ValueError(f"{files[labelled.index(False)]}: no 'labels' array, but "
                         f"{files[labelled.index(True)].name} has one")

    def records() -> Iterator[Record]:
        index = 0
        for file, (_, size, _) in zip(files, headers, strict=True):
            data = npz_array(file, "data")
            images = data.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)
            for _, name, image in array_records([(str(file), images)]):
                yield index, name, image
                index += 1

    source = Source("npz", path, sum(n for n, _, _ in headers), records(),
                    note=CHRABASZCZ_NOTE.format(path=path))
    if all(labelled):
        # Chrabaszcz et al. number the classes from 1; labels here count from 0.
        source.labels = np.concatenate(
            [npz_labels(file, n) for file, (n, _, _) in zip(files, headers, strict=True)]
        )
        source.classes = [str(k) for k in range(1000)]
        source.note += CHRABASZCZ_LABELS_NOTE
    return source


def npz_array(file: Path, key: str) -> np.ndarray:
    """One array of an npz archive; whatever is wrong with the archive is a ValueError naming it."""
    try:
        with np.load(file, allow_pickle=False) as npz:
            return npz[key]
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error,
            NotImplementedError) as e:  # NotImplementedError: an unknown zip compression
        raise ValueError(f"{file}: cannot read its {key!r} array ({e})") from None


def npz_labels(file: Path, count: int) -> np.ndarray:
    """The `labels` of an npz batch, 1..1000, as int64 0..999."""
    return check_labels(npz_array(file, "labels"), f"{file} 'labels'", count, 1000, first=1)


def npz_data_header(file: Path) -> tuple[int, int, bool]:
    """(N, S, whether it has labels) of an npz batch, read from the header of its `data` array
    without loading it."""
    try:
        with zipfile.ZipFile(file) as archive:
            keys = [n.removesuffix(".npy") for n in archive.namelist()]
            header = npy_member_header(archive, "data.npy") if "data" in keys else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error,
            NotImplementedError) as e:
        raise ValueError(f"{file}: not a readable npz archive ({e})") from None
    if header is None:
        raise ValueError(f"{file}: no 'data' array (it holds {keys}); expected an npz batch with "
                         f"data [N, 3*S*S]")
    shape, dtype, stored = header
    if dtype != np.uint8:
        what = "Python objects (a pickle, which is never loaded)" if dtype.hasobject else dtype
        raise ValueError(f"{file}: 'data' must be uint8 [N, 3*S*S], it holds {what}")
    size = int(round((shape[1] / 3) ** 0.5)) if len(shape) == 2 else 0
    if len(shape) != 2 or 3 * size * size != shape[1]:
        raise ValueError(f"{file}: 'data' must be uint8 [N, 3*S*S], got shape {list(shape)}")
    if math.prod(shape) != stored:  # a lying header would have prepare reserve what it claims
        raise ValueError(f"{file}: 'data' header says {list(shape)} but the archive stores "
                         f"{stored:,} bytes of it")
    return shape[0], size, "labels" in keys


def npy_member_header(archive: zipfile.ZipFile, member: str) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, bytes stored after the header) of a .npy inside a zip."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
        return shape, dtype, archive.getinfo(member).file_size - f.tell()


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
    batches = []
    for file in cifar_files(path, split, "cifar-10-batches-bin", ".bin"):
        raw = np.fromfile(file, dtype=np.uint8)
        if raw.size == 0 or raw.size % CIFAR_RECORD:
            raise ValueError(f"{file}: {raw.size} bytes is not a whole number of CIFAR-10 "
                             f"records of {CIFAR_RECORD} bytes")
        rows = raw.reshape(-1, CIFAR_RECORD)
        labels = check_labels(rows[:, 0], f"{file} (label bytes)", len(rows), 10)
        batches.append((file, rows[:, 1:], labels))
    return cifar_source("cifar10", path, batches)


def read_cifar10_python(path: Path, split: str) -> Source:
    """CIFAR-10 python version (`cifar-10-batches-py`), parsed without unpickling."""
    batches = [(file, *read_python_batch(file))
               for file in cifar_files(path, split, "cifar-10-batches-py", "")]
    return cifar_source("cifar10-python", path, batches)


def cifar_source(
    format: str, path: Path, batches: list[tuple[Path, np.ndarray, np.ndarray]]
) -> Source:
    """A Source of (file, pixels [N, 3072] as R, G, B planes, labels [N]) batches."""
    arrays = [(str(file), cifar_planes_to_hwc(pixels)) for file, pixels, _ in batches]
    return Source(format, path, sum(len(a) for _, a in arrays), array_records(arrays),
                  labels=np.concatenate([labels for _, _, labels in batches]),
                  classes=CIFAR10_CLASSES)


# ---- MNIST and Fashion-MNIST (torchvision's on-disk layout) ----

MNIST_PREFIX = {"train": "train", "test": "t10k"}


def mnist_dirs(path: Path) -> list[Path]:
    """Folders holding idx image files: `path`, `path/raw` or `path/*/raw` (e.g. MNIST/raw)."""
    candidates = [path, path / "raw", *sorted(path.glob("*/raw"))]
    return [d for d in candidates if d.is_dir() and any(d.glob("*-images-idx3-ubyte*"))]


def read_idx(file: Path, dims: int) -> np.ndarray:
    """An idx file of bytes (optionally gzipped): magic 0x0000080D with D = `dims` (3 for
    images, 1 for labels), then D big-endian int32 sizes, then the values."""
    opener = gzip.open if file.name.endswith(".gz") else open
    try:
        with opener(file, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{file}: cannot read ({e})") from None
    magic, start = bytes([0, 0, 8, dims]), 4 + 4 * dims
    if raw[:4] != magic or len(raw) < start:
        raise ValueError(f"{file}: not an idx{dims}-ubyte file (magic {raw[:4].hex()}, expected "
                         f"{magic.hex()})")
    shape = [int.from_bytes(raw[i : i + 4], "big") for i in range(4, start, 4)]
    if len(raw) != start + math.prod(shape):
        raise ValueError(f"{file}: header says {'x'.join(map(str, shape))} values but it holds "
                         f"{len(raw) - start}")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(shape)


def mnist_labels_file(images: Path) -> Path | None:
    """`train-labels-idx1-ubyte[.gz]` beside `train-images-idx3-ubyte[.gz]`, if it is there."""
    name = images.name.removesuffix(".gz").replace("images-idx3", "labels-idx1")
    candidates = [images.with_name(name), images.with_name(name + ".gz")]
    return next((f for f in candidates if f.is_file() and f.name != images.name), None)


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
    images = read_idx(file, 3)[..., None]
    source = Source("mnist", path, len(images), array_records([(str(file), images)]))
    labels_file = mnist_labels_file(file)
    if labels_file is None:
        source.note = f"{file}: no labels-idx1-ubyte file beside it, so no labels are kept"
    else:
        labels = read_idx(labels_file, 1)
        source.labels = check_labels(labels, str(labels_file), len(images), 10)
        fashion = "fashion" in file.resolve().as_posix().lower()
        source.classes = FASHION_MNIST_CLASSES if fashion else MNIST_CLASSES
    return source


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
    except (ValueError, OSError, EOFError) as e:  # object arrays, damaged or foreign files
        raise ValueError(f"{path}: not a uint8 .npy image array ({e})") from None
    return check_image_array(array, str(path))


def read_npy(path: Path, split: str) -> Source:
    """A uint8 .npy of images; labelled when `X_labels.npy` (and optionally `X_classes.json`,
    otherwise the classes are numbered) lies beside `X.npy`."""
    images = load_array(path)
    source = Source("npy", path, len(images), array_records([(str(path), images)]))
    if labels_path(path).is_file():
        classes = load_class_names(path)
        num_classes = len(classes) if classes is not None else None
        source.labels = load_labels(path, len(images), num_classes)
        source.classes = classes if classes is not None else numbered_classes(source.labels)
    return source
