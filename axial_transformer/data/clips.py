"""Clips for `prepare` and training: uint8 arrays [N, T, H, W, C], read from a .npy of clips, a
folder of GIF/MP4/WebM/AVI files (the first T frames of each), or the built-in moving digits.
Each source is a `Source` (sources.py) whose records carry a clip [T, H, W, C] or a video file's
path, so `prepare` writes, resizes and holds out clips as it does images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from .image_files import DECODE_ERRORS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, CorruptImageError
from .moving_digits import CANVAS, FRAMES, moving_digits
from .sources import (
    PREPARE_HINT,
    Source,
    array_source,
    check_uint8_array,
    folder_source,
    is_image_name,
    memory_map,
)

VIDEO_SUFFIXES = (".gif", ".mp4", ".webm", ".avi")
PYAV_HINT = "pip install 'axial-transformer[video]'"
BUILTIN_CLIPS = "moving-digits"


class ShortClipError(CorruptImageError):
    """A video file with fewer frames than a clip keeps: skipped, or refused with on_error."""


def check_clip_array(array: np.ndarray, name: str) -> np.ndarray:
    """A uint8 [N, T, H, W, C] array (no copy)."""
    check_uint8_array(array, name)
    if array.ndim != 5:
        images = " (images [N, H, W, C]? then set model.frames=0)" * (array.ndim in (3, 4))
        raise ValueError(f"{name}: expected clips of shape [N, T, H, W, C], got "
                         f"{list(array.shape)}{images}; prepare clips with --frames T")
    return array


def load_clip_array(path: str | Path) -> np.ndarray:
    """Memory-map a prepared uint8 .npy of clips [N, T, H, W, C]."""
    path, array = memory_map(path, "clip", f"{PREPARE_HINT} --frames T")
    return check_clip_array(array, str(path))


def is_clip_source(path: Path, format: str, frames: int | None) -> bool:
    """Whether `prepare` reads `path` as clips: asked for (`frames`, format "videos"), the
    built-in moving digits, a folder of video files and no images, or a .npy [N, T, H, W, C]."""
    if frames is not None or format == "videos" or str(path) == BUILTIN_CLIPS:
        return True
    if format != "auto":
        return False
    if path.is_dir():  # stops at the first image: a folder of 1.28M PNGs is not listed twice
        videos = False
        for file in path.rglob("*"):
            if is_image_name(file.name) and file.is_file():
                return False
            videos = videos or (is_video_name(file.name) and file.is_file())
        return videos
    if path.is_file() and path.suffix.lower() == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False).ndim == 5
        except (ValueError, OSError, EOFError):
            return False  # the image reader says what is wrong with it
    return False


def is_video_name(name: str) -> bool:
    return name.lower().endswith(VIDEO_SUFFIXES)


def open_clip_source(path: str | Path, format: str, split: str, frames: int | None,
                     image_size: tuple[int, int] | None,
                     count: int | None) -> tuple[Source, int]:
    """The clips of `path` and the frames each keeps (`frames`, or by default all of an array's
    or the moving digits' default): "moving-digits" (`split`, `count`, made at `image_size`), a
    folder of video files, or a .npy [N, T, H, W, C] or [N, T, H, W]."""
    if frames is not None and frames < 1:
        raise ValueError(f"--frames must be a positive number of frames, got {frames}")
    if str(path) == BUILTIN_CLIPS:
        clips = moving_digits(split, count, frames or FRAMES, image_size or CANVAS)
        return array_source(BUILTIN_CLIPS, Path(BUILTIN_CLIPS), [(BUILTIN_CLIPS, clips)],
                            len(clips)), clips.shape[1]
    if count is not None:
        raise ValueError(f"--count is for {BUILTIN_CLIPS}; {path} holds the clips it holds")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        return read_video_folder(path, frames), frames
    if path.is_file() and path.suffix.lower() == ".npy":
        return read_npy_clips(path, frames)
    raise ValueError(f"{path}: clips are read from a .npy [N, T, H, W, C], a folder of "
                     f"{', '.join(VIDEO_SUFFIXES)} files, or {BUILTIN_CLIPS}")


def read_npy_clips(path: Path, frames: int | None) -> tuple[Source, int]:
    """A uint8 .npy [N, T, H, W, C], or [N, T, H, W] as grayscale; the first `frames` of each."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a uint8 .npy clip array ({e})") from None
    if isinstance(array, np.ndarray) and array.ndim == 4:
        array = array[..., None]
    array = check_clip_array(array, str(path))
    frames = array.shape[1] if frames is None else frames
    if array.shape[1] < frames:
        raise ValueError(f"{path}: holds clips of {array.shape[1]} frames, fewer than --frames "
                         f"{frames}")
    return array_source("npy", path, [(path, array[:, :frames])], len(array)), frames


def read_video_folder(path: Path, frames: int | None) -> Source:
    """Video files anywhere under `path`, sorted by relative path (the order never depends on
    how the file system lists them)."""
    if frames is None:
        raise ValueError(f"{path}: pass --frames T, the number of frames each clip keeps (the "
                         f"first T of each file)")
    return folder_source("videos", path, VIDEO_SUFFIXES, "clips")[0]


def decode_clip(path: Path, name: str, mode: str, frames: int) -> np.ndarray:
    """The first `frames` frames of a video file, converted to a Pillow `mode` ("RGB" or "L")
    -> uint8 [T, H, W, C]; a CorruptImageError (a ShortClipError for too few frames)."""
    read = read_gif if path.suffix.lower() == ".gif" else read_video
    clip = read(path, name, mode, frames)
    if len(clip) < frames:
        raise ShortClipError(f"{name}: has {len(clip)} frame(s), fewer than --frames {frames}")
    clip = np.stack(clip)
    return clip[..., None] if clip.ndim == 3 else clip


def check_frame_size(width: int, height: int, name: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise CorruptImageError(f"{name}: declares {width} x {height} pixels a frame, more than "
                                f"the {MAX_IMAGE_PIXELS:,} a frame may have; not decoded")


def read_gif(path: Path, name: str, mode: str, frames: int) -> list[np.ndarray]:
    """Up to `frames` frames of a GIF, read with Pillow (each frame as displayed: Pillow applies
    the GIF's disposal and palette)."""
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise CorruptImageError(f"{name}: {path.stat().st_size:,} bytes, more than the "
                                f"{MAX_IMAGE_BYTES:,} a GIF may have; not read")
    try:
        with Image.open(path) as im:
            if im.format != "GIF":
                raise CorruptImageError(f"{name}: not a GIF (Pillow reads it as {im.format})")
            check_frame_size(im.width, im.height, name)
            clip = []
            for frame in ImageSequence.Iterator(im):
                clip.append(np.asarray(frame.convert(mode)))
                if len(clip) == frames:
                    break
    except CorruptImageError:
        raise
    except DECODE_ERRORS as e:
        raise CorruptImageError(f"{name}: cannot decode GIF ({e})") from e
    return clip


def read_video(path: Path, name: str, mode: str, frames: int) -> list[np.ndarray]:
    """Up to `frames` frames of the first video stream of an MP4/WebM/AVI, decoded by PyAV
    (FFmpeg)."""
    try:
        import av
    except ImportError:
        raise ModuleNotFoundError(f"reading {path.suffix.lstrip('.').upper()} needs PyAV: "
                                  f"{PYAV_HINT}") from None
    pixel_format = "rgb24" if mode == "RGB" else "gray"
    clip = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise CorruptImageError(f"{name}: holds no video stream")
            stream = container.streams.video[0]
            check_frame_size(stream.codec_context.width, stream.codec_context.height, name)
            for frame in container.decode(stream):
                clip.append(frame.to_ndarray(format=pixel_format))
                if len(clip) == frames:
                    break
    except CorruptImageError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        raise CorruptImageError(f"{name}: cannot decode video ({e})") from e
    return clip
