"""sample.py for a video model: clips drawn, or the rest of a real clip predicted from its first
frames (the BAIR Robot Pushing task), written as an animated GIF grid and a .npy of uint8
[N, T, H, W, C]. The clip comes from the data readers: prepared clips, the built-in moving
digits, or a GIF/MP4/WebM/AVI file."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..data.clips import (
    BUILTIN_CLIPS,
    VIDEO_SUFFIXES,
    is_video_name,
    load_clip_array,
    read_gif,
    read_video,
)
from ..data.image_files import resize_box
from ..data.moving_digits import moving_digits
from ..model.video import VideoTransformer
from ..sampling import given_frames
from ..sampling.sampler import Request, draw
from .common import CLIError, check_output, save_npy, write_outputs
from .sample import VIDEO_SAMPLES, class_labels, default_out, output_name


def load_clip(spec: str, channels: int, frames: int, size: tuple[int, int],
              resize: bool) -> np.ndarray:
    """--complete CLIP as the model takes it -> uint8 [T, H, W, C]: PATH.npy:INDEX of prepared
    clips [N, T, H, W, C] (their first T frames), moving-digits:INDEX (clip INDEX of the
    built-in test split, made at the model's frames and size) or a video file (its first T
    frames); each frame box-resized to `size` with `resize`."""
    path, _, index = spec.rpartition(":")
    if path == BUILTIN_CLIPS and index.isdigit():
        if channels != 1:
            raise CLIError(f"{BUILTIN_CLIPS} is grayscale; this model has {channels} channels")
        clips = moving_digits("test", frames=frames, image_size=size)
        return np.array(clips[check_index(BUILTIN_CLIPS, index, len(clips))])
    if path.endswith(".npy") and index.isdigit():
        array = load_clip_array(path)  # a missing, damaged or image array is an error naming it
        clip = np.array(array[check_index(path, index, len(array))])
        source = f"{path}: holds clips of {array.shape[1]} frames with {array.shape[4]} channel(s)"
        if array.shape[4] != channels:
            raise CLIError(f"{source}; the model takes {channels} channel(s)")
    elif is_video_name(spec):
        if not Path(spec).is_file():
            raise CLIError(f"{spec} not found")
        read = read_gif if spec.lower().endswith(".gif") else read_video
        clip = read(Path(spec), spec, "L" if channels == 1 else "RGB", frames)
        clip = np.stack(clip)[..., None] if channels == 1 else np.stack(clip)
        source = f"{spec}: has {len(clip)} frame(s)"
    else:
        raise CLIError(f"--complete {spec}: a video model takes a clip: PATH.npy:INDEX of "
                       f"prepared clips, {BUILTIN_CLIPS}:INDEX or a "
                       f"{'/'.join(s.lstrip('.').upper() for s in VIDEO_SUFFIXES)} file")
    if len(clip) < frames:
        raise CLIError(f"{source}; the model's clips have {frames}")
    clip = clip[:frames]
    if clip.shape[1:3] != size:
        if not resize:
            raise CLIError(f"{spec}: frames of {clip.shape[1]}x{clip.shape[2]}; the model takes "
                           f"{size[0]}x{size[1]} (--resize resizes them)")
        clip = np.stack([resize_box(frame, size) for frame in clip])
    return clip


def check_index(name: str, index: str, count: int) -> int:
    if not 0 <= int(index) < count:
        raise CLIError(f"{name} holds {count} clips; index {index} is out of range")
    return int(index)


def run_video(args: argparse.Namespace, model: VideoTransformer) -> int:
    """sample.py's run() for a video model (the arguments are checked already)."""
    from ..plots import clip_grid, save_gif

    config = model.config
    c, frames, (h, w) = config.channels, config.frames, config.image_size
    if args.rows_given is not None:
        raise CLIError("--rows-given is for image models; a video model predicts the rest of a "
                       "clip from its first frames: --frames-given K")
    if args.out is not None and Path(args.out).suffix.lower() != ".gif":
        raise CLIError(f"--out {args.out}: a video model writes a .gif (an animated grid of the "
                       "clips)")
    class_labels(args.class_, config)  # --class: refused, a video model has no classes
    clip = given = None
    if args.complete is not None:
        k = args.frames_given
        if not 0 < k < frames:
            raise CLIError(f"--frames-given must be 1 to {frames - 1} (the first K of the clip's "
                           f"{frames} frames are given, the rest predicted), got {k}")
        clip = torch.from_numpy(load_clip(args.complete, c, frames, (h, w), args.resize))
        clip = clip.permute(3, 0, 1, 2)  # [C, T, H, W]
        given = given_frames(clip[None, :, :k], frames)
    num_samples = args.num_samples or (8 if clip is not None else VIDEO_SAMPLES)
    out = Path(args.out) if args.out is not None else default_out(
        Path(args.checkpoint), output_name(args, None, num_samples, num_samples, video=True))
    outputs = [out, out.with_suffix(".npy")] + [out.with_suffix("")] * args.per_image
    for path in outputs:  # before the compute: a result that cannot be written is refused now
        check_output(path, "--out", c * frames * h * w * num_samples, replace=args.overwrite,
                     folder=path.suffix == "")
    device = torch.device(args.device)
    model.to(device).eval()
    request = Request(num_samples, temperature=args.temperature, batch_size=args.batch_size,
                      progress=True, generator=torch.Generator(device).manual_seed(args.seed),
                      compile=args.compile,
                      **(given or {}))
    start = time.perf_counter()
    samples = draw(model, request).cpu()  # (N, C, T, H, W) uint8
    seconds = time.perf_counter() - start
    print(f"{num_samples} clips of {c}x{frames}x{h}x{w} in {seconds:.1f} s "
          f"({seconds / num_samples:.3f} s per clip)", flush=True)

    if clip is None:
        pictures = clip_grid(samples, math.ceil(math.sqrt(num_samples)), config.levels)
    else:  # original | predictions, the given frames marked on the bar below
        pictures = clip_grid(torch.cat([clip[None], samples]), num_samples + 1, config.levels,
                             given=args.frames_given)
    pixels = np.ascontiguousarray(samples.permute(0, 2, 3, 4, 1).numpy())  # (N, T, H, W, C)

    def save_each(folder: Path) -> None:
        digits = max(5, len(str(num_samples - 1)))
        for k, one in enumerate(samples):
            save_gif(clip_grid(one[None], 1, config.levels), folder / f"{k:0{digits}d}.gif")

    writes = [lambda tmp: save_gif(pictures, tmp), lambda tmp: save_npy(tmp, pixels), save_each]
    write_outputs(dict(zip(outputs, writes, strict=False)), folders=tuple(outputs[2:]))
    print(f"-> {', '.join(map(str, outputs))}")
    return 0
