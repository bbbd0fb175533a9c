"""Hostile input files: damaged archives, sparse and bomb images, config.json of the wrong form
or size, a full disk under prepare, a data file cut short during training. Each is refused in
one line naming the input, before it can make us allocate what it asks for."""

import bz2
import errno
import gzip
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_data import leftovers, png_bytes, prepare_quiet, random_images

from axial_transformer import AxialTransformer, AxialTransformerConfig
from axial_transformer.data import CorruptImageError, open_split
from axial_transformer.data.__main__ import main
from axial_transformer.data.image_files import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, read_image_file
from axial_transformer.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def one_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message, message


# ---- damaged archives: refused naming the member, or skipped and counted ----


def png_tar(images: np.ndarray, name: str = "img/{:03d}.png") -> bytes:
    """A plain tar of `images` as PNG members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i, image in enumerate(images):
            data = png_bytes(image)
            info = tarfile.TarInfo(name.format(i))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tar_bytes():
    """A plain tar of 40 PNGs (about 40 KB)."""
    return png_tar(random_images(40, 8, 8))


def flipped(data: bytes, at: float, count: int = 16) -> bytes:
    """`data` with `count` bytes changed from the fraction `at` of its length on."""
    damaged = bytearray(data)
    for k in range(count):
        damaged[int(len(data) * at) + 7 * k] ^= 0x55
    return bytes(damaged)


DAMAGED = {  # name: a damaged copy of the tar, and the member where it should break
    "half.tar": (lambda raw: raw[: len(raw) // 2], "img/0"),
    "at_a_member_boundary.tar": (lambda raw: raw[: 512 * 6], "img/002.png"),
    "flipped.tar.gz": (lambda raw: flipped(gzip.compress(raw), 0.4), "img/0"),
    "truncated.tar.gz": (lambda raw: gzip.compress(raw)[: -len(gzip.compress(raw)) // 3],
                         "img/0"),
    "truncated.tar.xz": (lambda raw: lzma.compress(raw)[:-100], "img/0"),
    "flipped.tar.xz": (lambda raw: flipped(lzma.compress(raw), 0.5, 1), "img/0"),
    # bz2 compresses the whole archive as one block: nothing of it can be read.
    "truncated.tar.bz2": (lambda raw: bz2.compress(raw)[:-100], "not a readable tar archive"),
    "flipped.tar.bz2": (lambda raw: flipped(bz2.compress(raw), 0.5, 1),
                        "not a readable tar archive"),
}


@pytest.mark.parametrize("name", DAMAGED)
def test_a_damaged_archive_is_an_error_naming_where_it_broke(tmp_path, tar_bytes, name):
    damage, where = DAMAGED[name]
    (tmp_path / name).write_bytes(damage(tar_bytes))
    with pytest.raises(ValueError, match=where) as e:
        prepare_quiet(tmp_path / name, tmp_path / "out.npy")
    one_line(str(e.value))
    assert leftovers(tmp_path) == []


def test_a_checksum_failure_at_the_end_is_damage(tmp_path, tar_bytes):
    # The gzip trailer's CRC-32 is read only past the tar's end marker.
    data = bytearray(gzip.compress(tar_bytes))
    data[-8] ^= 0xFF
    (tmp_path / "crc.tar.gz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fails its checksum"):
        prepare_quiet(tmp_path / "crc.tar.gz", tmp_path / "out.npy")


def test_skip_damaged_prepares_what_came_before_and_says_how_many(tmp_path, tar_bytes):
    (tmp_path / "half.tar").write_bytes(tar_bytes[: len(tar_bytes) // 2])
    with pytest.warns(UserWarning, match=r"skipped 1 damaged image member") as caught:
        count = prepare_quiet(tmp_path / "half.tar", tmp_path / "out.npy", skip_damaged=True)
    intact = int(re.search(r"the (\d+) image members before it", str(caught[0].message))[1])
    assert count == intact and 0 < count < 40
    assert f"img/{count:03d}.png" in str(caught[0].message)  # the member cut short
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), random_images(40, 8, 8)[:count])


def test_damaged_archive_on_the_command_line(tmp_path, tar_bytes, capsys):
    (tmp_path / "half.tar").write_bytes(tar_bytes[: len(tar_bytes) // 2])
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", str(tmp_path / "half.tar"), str(tmp_path / "out.npy")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "--skip-damaged" in err


def test_an_intact_compressed_archive_still_reads_whole(tmp_path, tar_bytes):
    (tmp_path / "good.tar.xz").write_bytes(lzma.compress(tar_bytes))
    assert prepare_quiet(tmp_path / "good.tar.xz", tmp_path / "out.npy") == 40


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    run = subprocess.run(
        [sys.executable, "-m", "axial_transformer.data", "prepare", str(tmp_path / "fifo"),
         str(tmp_path / "out.npy"), "--format", "tar"],
        capture_output=True, text=True, env=ENV, timeout=60,
    )
    assert run.returncode == 2 and "not a regular file or a directory" in run.stderr
    one_line(run.stderr.strip())


# ---- image files bounded before they are read or decoded ----


def sparse_file(path: Path, size: int) -> Path:
    """A file of `size` bytes that takes no room on disk (and must never be read whole)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_a_sparse_image_in_a_folder_is_refused_by_its_size(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(random_images(1)[0]))
    sparse_file(folder / "b.png", MAX_IMAGE_BYTES + 1)
    with pytest.raises(CorruptImageError, match=r"b\.png: 134,217,729 bytes, more than"):
        prepare_quiet(folder, tmp_path / "out.npy", on_error="raise")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*b\.png: 134,217,729"):
        assert prepare_quiet(folder, tmp_path / "out.npy") == 1


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write a sparse member")
def test_a_sparse_tar_member_is_refused_by_its_size(tmp_path):
    folder = tmp_path / "members"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(random_images(1)[0]))
    sparse_file(folder / "b.png", MAX_IMAGE_BYTES + 1)
    subprocess.run(["tar", "-cSf", str(tmp_path / "sparse.tar"), "-C", str(folder), "a.png",
                    "b.png"], check=True)
    assert (tmp_path / "sparse.tar").stat().st_size < 64 * 1024
    with pytest.raises(CorruptImageError, match=r"sparse\.tar:b\.png: 134,217,729 bytes"):
        prepare_quiet(tmp_path / "sparse.tar", tmp_path / "out.npy", on_error="raise")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGBA pixels, with one small IDAT: what a decompression
    bomb shows before it is decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(bytes(width * 4 + 1))) + chunk(b"IEND", b""))


def test_a_png_bomb_is_refused_before_it_is_decoded(tmp_path):
    side = 5793  # just over the limit, and under Pillow's own (which only warns)
    assert side * side > MAX_IMAGE_PIXELS
    (tmp_path / "bomb.png").write_bytes(png_header_only(side, side))
    with pytest.raises(ValueError, match=r"bomb\.png: declares 5793 x 5793 pixels") as e:
        read_image_file(tmp_path / "bomb.png", 3, (32, 32))  # compress.py, sample.py --complete
    one_line(str(e.value))
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(tmp_path / "bomb.png", folder)
    with pytest.raises(CorruptImageError, match="declares 5793 x 5793"):
        prepare_quiet(folder, tmp_path / "out.npy", on_error="raise")


def test_a_large_image_file_is_refused_before_it_is_read(tmp_path):
    sparse_file(tmp_path / "big.png", MAX_IMAGE_BYTES + 1)
    with pytest.raises(ValueError, match=r"big\.png: 134,217,729 bytes, more than"):
        read_image_file(tmp_path / "big.png", 3, (32, 32))


# ---- config.json and weights: the file bounds what the config may allocate ----


def tiny(**overrides):
    kw = dict(image_size=(5, 7), channels=1, dim=16, heads=2, encoder_layers=2,
              outer_layers=2, inner_layers=2)
    return AxialTransformerConfig(**{**kw, **overrides})


@pytest.fixture
def export(tmp_path):
    AxialTransformer(tiny()).save_pretrained(tmp_path / "export")
    return tmp_path / "export"


def set_config(directory: Path, text: str) -> None:
    (directory / "config.json").write_text(text)


def edited(directory: Path, **changes) -> str:
    config = json.loads((directory / "config.json").read_text())
    return json.dumps({**config, **changes})


@pytest.mark.parametrize("change, expected", [
    (dict(dim=16.0), r"dim must be an integer in 1\.\.65536, got 16\.0 \(float\)"),
    (dict(image_size=[5.5, 7]), r"image_size must be \(height, width\), two integers"),
    (dict(dim=[]), r"dim must be an integer.*got \[\] \(list\)"),
    (dict(dim=None), r"dim must be an integer.*\(NoneType\)"),
    (dict(mlp_ratio=float("inf")), r"mlp_ratio must be a number in \(0, 1024\], got inf"),
    (dict(mlp_ratio=1e7), r"mlp_ratio must be a number in \(0, 1024\]"),
    (dict(levels=10**9), r"levels must be an integer in 1\.\.65536"),
    (dict(num_classes=10**10), r"num_classes must be an integer in 0\.\.1048576"),
    (dict(class_names=[[1]]), r"class_names must be a list of strings"),
    (dict(gradient_checkpointing="yes"), "gradient_checkpointing must be true or false"),
])
def test_config_json_of_the_wrong_form_is_one_line(export, change, expected):
    set_config(export, edited(export, **change))
    with pytest.raises(ValueError, match=expected) as e:
        AxialTransformer.from_pretrained(export)
    one_line(str(e.value))
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("text, expected", [
    ("[]", "expected a JSON object of model settings, got list"),
    ("null", "expected a JSON object of model settings, got NoneType"),
    ("[" * 20_000 + "]" * 20_000, "not a JSON object of model settings"),
    ("{\"dim\": " + "[" * 20_000 + "]" * 20_000 + "}", "not a JSON object of model settings"),
    ("{\"dim\": Infinity}", r"dim must be an integer.*inf"),
    (" " * 70_000 + "{}", "a config.json of model settings is a few hundred"),
    ("\xff{", "not a JSON object"),
])
def test_config_json_that_is_no_settings_object_is_one_line(export, text, expected):
    (export / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=expected) as e:
        AxialTransformer.from_pretrained(export)
    one_line(str(e.value))


def test_a_large_config_is_checked_against_the_weights_before_it_is_built(export, monkeypatch):
    # dim 2048 with the weights of dim 16: a model of about 100M parameters (0.4 GB), refused
    # from the weights file's header while laid out on the meta device only.
    built = []
    original = AxialTransformer.initialize_weights

    def record(model):
        built.extend(p.device.type for p in model.parameters())
        return original(model)

    monkeypatch.setattr(AxialTransformer, "initialize_weights", record)
    set_config(export, edited(export, dim=2048, mlp_ratio=4.0))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"parameter pos_h has shape \[5, 1, 16\], this model "
                                         r"expects \[5, 1, 2048\]"):
        AxialTransformer.from_pretrained(export)
    assert set(built) == {"meta"}, "a model was built before its weights were checked"
    assert time.perf_counter() - start < 30


def test_a_checkpoint_config_is_checked_against_its_weights_before_it_is_built(tmp_path,
                                                                               monkeypatch):
    import yaml

    from axial_transformer.training.checkpoint import load_trained_model
    from axial_transformer.training.config import RunConfig

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_0000001"
    step.mkdir(parents=True)
    cfg = RunConfig(model=tiny())
    save_file(AxialTransformer(tiny()).state_dict(), step / "ema.safetensors")
    (step / "trainer_state.json").write_text("{}")
    big = {**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "dim": 1024}}
    (run / "config.yaml").write_text(yaml.safe_dump(big))
    built = []
    original = AxialTransformer.initialize_weights
    monkeypatch.setattr(AxialTransformer, "initialize_weights", lambda model: (
        built.extend(p.device.type for p in model.parameters()), original(model)))
    with pytest.raises(ValueError, match=r"expects \[5, 1, 1024\]"):
        load_trained_model(step)
    assert set(built) == {"meta"}


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_and_bool_weights_are_refused_not_cast(export, dtype):
    model = AxialTransformer(tiny())
    state = {k: v.to(dtype) if k == "pos_h" else v for k, v in model.state_dict().items()}
    save_file(state, export / "model.safetensors")
    stored = {torch.int64: "I64", torch.bool: "BOOL"}[dtype]
    with pytest.raises(ValueError, match=f"parameter pos_h is stored as {stored}; expected "
                                         "floating-point weights"):
        AxialTransformer.from_pretrained(export)


@pytest.mark.parametrize("override, expected", [
    ("model.mlp_ratio=inf", r"mlp_ratio must be a number in \(0, 1024\], got inf"),
    ("model.mlp_ratio=.nan", r"mlp_ratio must be a number in \(0, 1024\], got nan"),
    ("model.dim=1099511627776", r"dim must be an integer in 1\.\.65536, got 1099511627776"),
    ("model.image_size=[1000000,1000000]", "image_size must be"),
])
def test_train_overrides_out_of_bounds_are_one_line(tmp_path, capsys, override, expected):
    with pytest.raises(ValueError, match=expected):
        load_config(None, [override])
    sys.path.insert(0, str(ROOT))
    try:
        import train
    finally:
        sys.path.remove(str(ROOT))
    assert train.main([f"run_dir={tmp_path / 'run'}", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and expected.split(" ")[0] in err
    assert not (tmp_path / "run").exists()


# ---- a full disk under prepare ----


def test_a_full_disk_is_an_error_naming_the_output_and_leaves_no_temp_file(tmp_path,
                                                                           monkeypatch):
    np.save(tmp_path / "big.npy", random_images(50))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"out\.npy: cannot write .* bytes \(No space left"):
        prepare_quiet(tmp_path / "big.npy", tmp_path / "out.npy")
    assert leftovers(tmp_path) == ["big.npy"]


def test_a_disk_filling_while_writing_leaves_no_temp_file(tmp_path, monkeypatch):
    # A file system without posix_fallocate: the disk fills up at some later write.
    np.save(tmp_path / "big.npy", random_images(50))
    writes = []

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    def pwrite(fd, data, position):
        writes.append(position)
        if len(writes) > 10:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(fd, data, position)

    original = os.pwrite
    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError, match=r"out\.npy: cannot write"):
        prepare_quiet(tmp_path / "big.npy", tmp_path / "out.npy")
    assert leftovers(tmp_path) == ["big.npy"]


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    run = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                          "mount -t tmpfs -o size=64k none /tmp"], capture_output=True)
    return run.returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare to mount a small tmpfs")
def test_prepare_onto_a_real_full_disk(tmp_path):
    # A 1 MB tmpfs (in a mount namespace of its own) for a 3 MB output: without the pwrite
    # writes, the memory map's stores past the room there die of SIGBUS.
    np.save(tmp_path / "big.npy", random_images(1000, 32, 32))
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=1m none {disk} && {sys.executable} -m "
              f"axial_transformer.data prepare {tmp_path / 'big.npy'} {disk / 'out.npy'}; "
              f"echo rc=$?; ls -a {disk}")
    run = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert "rc=2" in run.stdout, (run.stdout, run.stderr)
    assert run.stdout.split()[-2:] == [".", ".."] or set(run.stdout.split()[1:]) == {".", ".."}
    error = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "out.npy: cannot write" in error[0] and "No space left" in error[0]
    assert "Traceback" not in run.stderr


# ---- a data file cut short while training reads it ----


def test_a_data_file_truncated_while_read_is_a_value_error_not_sigbus(tmp_path):
    np.save(tmp_path / "train.npy", random_images(64, 16, 16))
    script = f"""
import os, sys
from axial_transformer.data.splits import open_split
split = open_split({str(tmp_path / 'train.npy')!r}, "train", (16, 16), 3)
first = split[63]
os.truncate({str(tmp_path / 'train.npy')!r}, 128 + 16 * 16 * 3 * 10)
try:
    for i in range(len(split)):
        split[i]
except ValueError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert run.returncode == 2, (run.returncode, run.stderr)  # -7 is SIGBUS
    assert "train.npy: ends before image 10" in run.stderr and "prepare it again" in run.stderr
    one_line(run.stderr.strip())


def test_split_items_read_from_the_file_match_the_array(tmp_path):
    images = random_images(9, 4, 6)
    np.save(tmp_path / "train.npy", images)
    split = open_split(tmp_path / "train.npy", "train", (4, 6), 3)
    assert split.file == tmp_path / "train.npy"
    for i in (0, 4, 8, -1):
        assert torch.equal(split[i], torch.from_numpy(images[i].transpose(2, 0, 1).copy()))
    with pytest.raises(IndexError):
        split[9]


def test_a_compressed_tar_of_empty_entries_is_refused_by_its_member_count(tmp_path):
    """20,000 empty image members gzip to a few hundred KB; the scan stops at the count that
    size allows instead of listing them all (20M would take gigabytes)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for i in range(20_000):
            tar.addfile(tarfile.TarInfo(f"{i:05d}.png"))
    bomb = tmp_path / "empty.tar.gz"
    bomb.write_bytes(gzip.compress(raw.getvalue(), 9))
    with pytest.raises(ValueError, match="image members in") as refused:
        prepare_quiet(bomb, tmp_path / "out.npy")
    one_line(str(refused.value))
    assert leftovers(tmp_path) == []


def test_a_tar_of_real_images_is_within_the_member_count(tmp_path):
    """Negative control: small PNGs, even gzipped, are far from the bound."""
    archive = tmp_path / "small.tar.gz"
    archive.write_bytes(gzip.compress(png_tar(random_images(1200, 2, 2), "{:05d}.png"), 9))
    prepare_quiet(archive, tmp_path / "out.npy")
    assert np.load(tmp_path / "out.npy").shape == (1200, 2, 2, 3)


class CutShort(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        raise ValueError("train.npy: cut short while the run read it")


def test_a_data_error_in_a_loader_worker_is_one_line():
    """With data.workers > 0 the error comes back through a worker, carrying its traceback;
    the command line prints the error itself (the raw message is the negative control)."""
    from axial_transformer.training.errors import one_line as cli_message

    loader = torch.utils.data.DataLoader(CutShort(), num_workers=1)
    with pytest.raises(ValueError) as caught:
        next(iter(loader))
    assert "\n" in str(caught.value)  # what the command line printed before
    assert cli_message(caught.value) == "train.npy: cut short while the run read it"
    assert cli_message(ValueError("a: b")) == "a: b"
