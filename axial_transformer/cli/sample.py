"""Draw images from a trained Axial Transformer, or complete the bottom of a real one; draw
clips from a video model, or predict the rest of a real clip from its first frames.

    python sample.py --checkpoint runs/demo --num-samples 64
    python sample.py --checkpoint runs/demo --complete photo.png --rows-given 8 --resize
    python sample.py --checkpoint runs/demo --complete data/cifar10/test.npy:7 --rows-given 16
    python sample.py --checkpoint runs/digits --class 7 --guidance 3
    python sample.py --checkpoint runs/cifar --class all --num-samples 8
    python sample.py --checkpoint runs/video-demo --num-samples 16
    python sample.py --checkpoint runs/video-demo --complete moving-digits:0 --frames-given 2

Writes a PNG grid (enlarged to at least 512 pixels) and the pixels beside it (.npy: uint8
[N, H, W, C]) into the run's samples/ folder, or to --out, and prints the time per image. The
names carry every setting that changes the images, and an existing output is replaced only with
--overwrite. A completion keeps the top K rows of a real image and samples the rest; its grid
shows original | given rows | completions. `--class all` draws one labelled row per class.
A video model's clips go to an animated GIF grid (a GIF frame per frame) and a .npy (uint8
[N, T, H, W, C]); a prediction's GIF shows original | predictions; --compile compiles as asked.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..data.clips import BUILTIN_CLIPS
from ..model.transformer import AxialTransformer
from ..sampling.sampler import Request, draw, sample
from .common import (
    CLIError,
    check_output,
    check_positive,
    command_parser,
    parse_device,
    run_command,
    save_npy,
    save_pngs,
    write_outputs,
)

COMPLETION_CAVEAT = (
    "Completion of an RGB image is approximate: the model draws channel after channel, so the "
    "red rows below K are drawn without seeing the known green and blue rows (they are kept, "
    "not conditioned on). For a one-channel image it is exact."
)
# Compiling the decoding steps took 24 to 91 s on a 2-core CPU (docs/sampling.md): a request that
# eager sampling finishes in less than this is sampled eagerly, as compiling could not pay.
COMPILE_FLOOR_S = 20.0
# A video model's default: 16 clips of the demo's 8 frames draw 128 frames, twice the 64 images.
VIDEO_SAMPLES = 16


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    add = parser.add_argument
    add("--num-samples", type=int,
        help="images to draw (default 64; 8 completions; 8 per class with --class all); a video "
        f"model's clips (default {VIDEO_SAMPLES}; 8 predictions)")
    add("--out", help="PNG to write (a GIF for a video model; default: RUN/samples/NAME, NAME "
        "carrying the settings); the pixels go to the same name with .npy")
    add("--overwrite", action="store_true", help="replace outputs of the same name")
    add("--per-image", action="store_true",
        help="also write each image as a PNG of its own (each clip as a GIF), in a folder named "
        "as the grid")
    add("--temperature", type=float, default=1.0,
        help="divides the logits: < 1 sharper, > 1 more diverse (must be > 0)")
    add("--seed", type=int, default=0, help="the same seed and settings draw the same images")
    add("--batch-size", type=int, default=64, help="images drawn at once")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N (default: cuda when available)")
    add("--compile", action="store_true",
        help="run each decoding step as a torch.compile'd graph when that pays: only when eager "
        f"sampling takes longer than compiling can ({COMPILE_FLOOR_S:.0f} s) and the compiled "
        "steps are faster, saying which")
    add("--class", dest="class_", metavar="C",
        help="a class-conditional model's class: a number, a class name (any case) or 'all' "
        "(one labelled row per class)")
    add("--guidance", type=float, default=1.0,
        help="classifier-free guidance scale with --class (1: the conditional model as it is; "
        "needs a model trained with train.label_dropout)")
    add("--complete", metavar="IMAGE",
        help="a PNG/JPEG of the model's size, or PATH.npy:INDEX of a prepared split: keep its "
        "top --rows-given rows and sample the rest. " + COMPLETION_CAVEAT + " For a video "
        "model, a clip: PATH.npy:INDEX of prepared clips, moving-digits:INDEX (the built-in "
        "test split's) or a GIF/MP4/WebM/AVI file: keep its first --frames-given frames and "
        "predict the rest (exact: they are a prefix of the model's order)")
    add("--rows-given", type=int, metavar="K",
        help="rows of --complete kept (top K, less than the image height)")
    add("--frames-given", type=int, metavar="K",
        help="a video model's: frames of the clip of --complete given (the first K, 1 to T-1)")
    add("--resize", action="store_true",
        help="box-resize the image (each frame of the clip) of --complete to the model's size "
        "(the aspect ratio is not kept)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


def check_args(args: argparse.Namespace) -> None:
    if not 0 < args.temperature < math.inf:
        raise CLIError(f"--temperature must be a positive number, got {args.temperature}")
    check_positive(args, "--num-samples", "--batch-size")
    if args.frames_given is not None and args.complete is None:
        raise CLIError("--frames-given K needs --complete CLIP (the clip whose first K frames "
                       "are given)")
    if args.rows_given is not None and args.frames_given is not None:
        raise CLIError("--rows-given is for image models, --frames-given for video models; "
                       "pass one")
    if args.complete is None and args.rows_given is not None:
        raise CLIError("--complete IMAGE and --rows-given K go together")
    if args.complete is not None and args.rows_given is None and args.frames_given is None:
        raise CLIError("--complete needs --rows-given K (an image model) or --frames-given K "
                       "(a video model)")
    if args.resize and args.complete is None:
        raise CLIError("--resize resizes the image of --complete; it needs --complete IMAGE")
    if args.rows_given is not None and args.rows_given < 0:
        raise CLIError(f"--rows-given must be 0 or more (K rows are kept, the rest sampled), "
                       f"got {args.rows_given}")
    if not -math.inf < args.guidance < math.inf:
        raise CLIError(f"--guidance must be a finite number, got {args.guidance}")
    if args.guidance != 1 and args.class_ is None:
        raise CLIError("--guidance needs --class (classifier-free guidance toward a class)")
    if args.out is not None and Path(args.out).suffix.lower() not in (".png", ".gif"):
        raise CLIError(f"--out {args.out}: expected a .png file (a .gif for a video model; the "
                       "pixels go beside it as .npy)")
    parse_device(args.device)


def load_image(spec: str, channels: int, size: tuple[int, int], resize: bool) -> np.ndarray:
    """A PNG/JPEG file, or PATH.npy:INDEX of a prepared uint8 [N, H, W, C] array -> [H, W, C];
    box-resized to `size` with `resize`."""
    from ..data.image_files import read_image_file, resize_box
    from ..data.sources import load_array

    path, _, index = spec.rpartition(":")
    if not (path.endswith(".npy") and index.lstrip("-").isdigit()):
        return read_image_file(spec, channels, size, resize=resize)
    array = load_array(path)  # a missing, damaged or object array is an error naming it
    if not 0 <= int(index) < len(array):
        raise CLIError(f"{path} holds {len(array)} images; index {index} is out of range")
    if array.shape[3] != channels or (tuple(array.shape[1:3]) != size and not resize):
        raise CLIError(f"{path}: the model takes {size[0]}x{size[1]} images with {channels} "
                       f"channel(s), got {'x'.join(map(str, array.shape[1:3]))} with "
                       f"{array.shape[3]}{'' if array.shape[3] != channels else ' (--resize)'}")
    image = np.array(array[int(index)])
    return image if image.shape[:2] == size else resize_box(image, size)


def class_labels(spec: str | None, config) -> list[int] | None:
    """--class as the class numbers to draw: one, or every class for 'all'; None without it.
    A name matches exactly, or else in any case when only one class name does."""
    k, names = config.num_classes, list(config.class_names or [])
    if spec is None:
        if k:
            raise CLIError(f"this model is class-conditional ({k} classes): pass --class C "
                           "(a number, a class name or 'all')")
        return None
    if k == 0:
        raise CLIError("--class needs a class-conditional model; this one has num_classes=0")
    if spec == "all":
        return list(range(k))
    if spec.lstrip("-").isdigit() and -1 <= int(spec) < k:
        return [int(spec)]
    if spec in names:
        return [names.index(spec)]
    folded = [i for i, name in enumerate(names) if name.casefold() == spec.casefold()]
    if len(folded) == 1:
        return folded
    if folded:
        raise CLIError(f"--class {spec}: matches {', '.join(names[i] for i in folded)} but "
                       "for case; give one exactly")
    known = f" or one of {', '.join(names)}" if names else ""
    raise CLIError(f"--class {spec}: expected a class number 0..{k - 1}{known}, or 'all'")


def class_name(label: int, config) -> str:
    if label == -1:
        return "none"
    return config.class_names[label] if config.class_names else str(label)


def default_out(checkpoint: Path, name: str) -> Path:
    """RUN/samples/NAME for a run, one of its checkpoints or its export; samples/NAME beside an
    export outside a run; samples/OWNER--NAME/NAME here for a Hub repository id."""
    if not checkpoint.exists():  # a Hub repository id
        return Path("samples") / str(checkpoint).replace("/", "--") / name
    checkpoint = checkpoint.resolve()
    if (checkpoint / "trainer_state.json").is_file():  # RUN/checkpoints/step_NNNNNNN
        return checkpoint.parent.parent / "samples" / name
    if (checkpoint / "export" / "config.json").is_file():  # RUN
        return checkpoint / "samples" / name
    return checkpoint.parent / "samples" / name  # an export: RUN/export or a copy of one


def output_name(args: argparse.Namespace, label: str | None, per_class: int,
                num_samples: int, video: bool = False) -> str:
    """A name carrying every setting that changes the images, so that two different requests
    never share a file. _b4: batches of 4 split the request (the noise is drawn batch by batch)."""

    def safe(text: str) -> str:  # a class named 'T-shirt/top' makes no sub-folder
        return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".") or "_"

    settings = f"n{per_class}_seed{args.seed}"
    settings += f"_t{args.temperature:g}" if args.temperature != 1 else ""
    settings += f"_g{args.guidance:g}" if args.guidance != 1 else ""
    settings += f"_b{args.batch_size}" if args.batch_size < num_samples else ""
    device = torch.device(args.device).type
    settings += f"_{device}" if device != "cpu" else ""
    if label is not None:
        return f"sample_class_{safe(label)}_{settings}.png"
    suffix = ".gif" if video else ".png"
    if args.complete is None:
        return f"sample_{settings}{suffix}"
    path, _, index = args.complete.rpartition(":")
    indexed = (path.endswith(".npy") or path == BUILTIN_CLIPS) and index.isdigit()
    image = f"{Path(path).stem}_{index}" if indexed else Path(args.complete).stem
    if args.frames_given is not None:
        return f"completion_{safe(image)}_f{args.frames_given}_{settings}{suffix}"
    return f"completion_{safe(image)}_k{args.rows_given}_{settings}{suffix}"


def two_rows(model: AxialTransformer, request: Request, n: int, compile: bool) -> float:
    """Seconds to draw the first two rows of the first channel of a batch of n (every other
    pixel given): 2 / (C H) of the batch's work, to time the sampler by."""
    c, (h, w) = model.config.channels, model.config.image_size
    mask = torch.ones((1, c, h, w), dtype=torch.bool)
    mask[:, 0, :2] = False
    labels = None if request.labels is None else request.labels[:n]
    start = time.perf_counter()
    sample(model, n, known=torch.zeros((1, c, h, w), dtype=torch.uint8), known_mask=mask,
           labels=labels, guidance=request.guidance, compile=compile)
    return time.perf_counter() - start


def estimate(model: AxialTransformer, request: Request, compile: bool) -> float:
    """Seconds the whole request takes, from the faster of two timings of two rows per batch
    size (the first call of a size also allocates what the later ones reuse)."""
    c, (h, _) = model.config.channels, model.config.image_size
    sizes = [batch.num_samples for batch in request.batches()]
    per_size = {n: min(two_rows(model, request, n, compile) for _ in range(2)) * c * h / 2
                for n in set(sizes)}
    return sum(per_size[n] for n in sizes)


def choose_compiled(model: AxialTransformer, request: Request) -> bool:
    """Whether compiled decoding pays, saying why: not when eager sampling is done sooner than a
    compilation can be, nor when the compiled steps are no faster than the eager ones."""
    eager = estimate(model, request, compile=False)
    if eager < COMPILE_FLOOR_S:
        print(f"--compile: sampling eagerly takes about {eager:.1f} s here, less than a "
              f"compilation takes ({COMPILE_FLOOR_S:.0f} s or more): sampling eagerly", flush=True)
        return False
    sizes = sorted({batch.num_samples for batch in request.batches()})
    print(f"--compile: about {eager:.0f} s eagerly; compiling the decoding steps for batch size "
          f"{', '.join(map(str, sizes))} (once per model and batch size)...", flush=True)
    start = time.perf_counter()
    for n in sizes:
        two_rows(model, request, n, compile=True)
    print(f"compiled in {time.perf_counter() - start:.0f} s", flush=True)
    compiled = estimate(model, request, compile=True)
    if compiled >= eager:
        print(f"--compile: the compiled steps are no faster here (about {compiled:.0f} s "
              f"against {eager:.0f} s eagerly): sampling eagerly", flush=True)
        return False
    print(f"--compile: about {compiled:.0f} s compiled against {eager:.0f} s eagerly", flush=True)
    return True


def run(args: argparse.Namespace) -> int:
    from ..plots import image_grid
    from ..training.checkpoint import load_trained_model

    check_args(args)
    model, _ = load_trained_model(args.checkpoint)
    if model.config.frames:
        from .sample_video import run_video

        return run_video(args, model)
    if args.frames_given is not None:
        raise CLIError("--frames-given is for video models; this image model completes an "
                       "image from its top rows: --rows-given K")
    if args.out is not None and Path(args.out).suffix.lower() != ".png":
        raise CLIError(f"--out {args.out}: an image model writes a .png grid")
    config = model.config
    c, (h, w) = config.channels, config.image_size
    classes = class_labels(args.class_, config)
    known = known_mask = image = None
    if args.complete is not None:
        if args.rows_given >= h:  # all rows given: nothing would be sampled
            raise CLIError(f"--rows-given must be less than the image height {h} (K rows "
                           f"are kept, the rest sampled), got {args.rows_given}")
        image = torch.from_numpy(load_image(args.complete, c, (h, w), args.resize))
        image = image.permute(2, 0, 1)
        known = image[None]
        known_mask = torch.zeros((1, c, h, w), dtype=torch.bool)
        known_mask[:, :, : args.rows_given] = True
    per_class = args.num_samples or (8 if image is not None or args.class_ == "all" else 64)
    num_samples = per_class * len(classes or [None])
    names = None if classes is None else [class_name(k, config) for k in classes]
    label = None if names is None else "all" if args.class_ == "all" else names[0]
    out = Path(args.out) if args.out is not None else default_out(
        Path(args.checkpoint), output_name(args, label, per_class, num_samples))
    outputs = [out, out.with_suffix(".npy")] + [out.with_suffix("")] * args.per_image
    for path in outputs:  # before the compute: a result that cannot be written is refused now
        check_output(path, "--out", c * h * w * num_samples, replace=args.overwrite,
                     folder=path.suffix == "")

    device = torch.device(args.device)
    model.to(device).eval()
    labels = None if classes is None else torch.tensor(classes).repeat_interleave(per_class)
    request = Request(num_samples, temperature=args.temperature, known=known,
                      known_mask=known_mask, labels=labels, guidance=args.guidance,
                      batch_size=args.batch_size, progress=True,
                      generator=torch.Generator(device).manual_seed(args.seed))
    if image is not None and c > 1:
        print(f"warning: {COMPLETION_CAVEAT}", file=sys.stderr)
    compiled = args.compile and choose_compiled(model, request)
    start = time.perf_counter()
    samples = draw(model, dataclasses.replace(request, compile=compiled)).cpu()
    seconds = time.perf_counter() - start
    # The figures first: a disk that fails the write below does not take them with it.
    print(f"{num_samples} images of {c}x{h}x{w} in {seconds:.1f} s "
          f"({seconds / num_samples:.3f} s per image{', compiled' if compiled else ''})",
          flush=True)

    if names is not None:  # one labelled row per class
        grid = image_grid(samples, per_class, config.levels, names)
    elif image is None:
        grid = image_grid(samples, math.ceil(math.sqrt(num_samples)), config.levels)
    else:
        given = image * known_mask[0]  # the rows the model saw, black below
        grid = image_grid(torch.cat([image[None], given[None], samples]), num_samples + 2,
                          config.levels)
    pixels = samples.permute(0, 2, 3, 1).numpy()
    writes = [lambda tmp: grid.save(tmp, format="PNG"), lambda tmp: save_npy(tmp, pixels),
              lambda folder: save_pngs(folder, pixels)]
    write_outputs(dict(zip(outputs, writes, strict=False)), folders=tuple(outputs[2:]))
    print(f"-> {', '.join(map(str, outputs))}")
    return 0
