"""Draw images from a trained Axial Transformer, or complete the bottom of a real one.

    python sample.py --checkpoint runs/demo --num-samples 64

--checkpoint takes a run directory (its export/ holds the EMA weights), one of its checkpoints
(RUN/checkpoints/step_NNNNNNN) or an export directory (config.json + model.safetensors). Writes a
PNG grid and the raw pixels beside it (.npy: uint8 [N, H, W, C]) into the run's samples/ folder
(RUN/samples/sample_seed0.png; for an export outside a run, a samples/ folder beside it, as
RUN/samples is beside RUN/export), or to --out, and prints the time per image. Completion keeps
the top K rows of a real image and samples the rest:

    python sample.py --checkpoint runs/demo --complete photo.png --rows-given 8
    python sample.py --checkpoint runs/demo --complete data/cifar10/test.npy:7 --rows-given 16

writing original | given rows | completions side by side (and the completions as .npy). A
class-conditional model draws the class given by --class (a number or one of its class names;
`all` draws a row of --num-samples images per class), with classifier-free guidance --guidance:

    python sample.py --checkpoint runs/digits --class 7 --guidance 3
    python sample.py --checkpoint runs/cifar --class all --num-samples 8
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

COMPLETION_CAVEAT = (
    "Completion of an RGB image is approximate: the model draws channel after channel, so the "
    "red rows below K are drawn without seeing the known green and blue rows (they are kept, "
    "not conditioned on). For a one-channel image it is exact."
)


class CLIError(ValueError):
    """A problem with the command line or its inputs, reported as one line (exit code 2)."""


def load_image(spec: str, channels: int, size: tuple[int, int]) -> np.ndarray:
    """A PNG/JPEG file, or PATH.npy:INDEX of a prepared uint8 [N, H, W, C] array -> [H, W, C]."""
    from axial_transformer.data import read_image_file
    from axial_transformer.formats import load_array

    path, _, index = spec.rpartition(":")
    if not (path.endswith(".npy") and index.lstrip("-").isdigit()):
        return read_image_file(spec, channels, size)
    array = load_array(path)  # a missing, damaged or object array is an error naming it
    if not 0 <= int(index) < len(array):
        raise CLIError(f"{path} holds {len(array)} images; index {index} is out of range")
    if tuple(array.shape[1:]) != (*size, channels):
        raise CLIError(f"{path}: the model takes {size[0]}x{size[1]} images with {channels} "
                       f"channel(s), got {'x'.join(map(str, array.shape[1:3]))} with "
                       f"{array.shape[3]}")
    return np.array(array[int(index)])


def default_out(checkpoint: Path, name: str) -> Path:
    """RUN/samples/NAME for a run directory, one of its checkpoints or its export; for an export
    outside a run, samples/NAME beside it (as RUN/samples is beside RUN/export); for a Hub
    repository id, samples/OWNER--NAME/NAME here."""
    if not checkpoint.exists():  # a Hub repository id
        return Path("samples") / str(checkpoint).replace("/", "--") / name
    checkpoint = checkpoint.resolve()
    if (checkpoint / "trainer_state.json").is_file():  # RUN/checkpoints/step_NNNNNNN
        return checkpoint.parent.parent / "samples" / name
    if (checkpoint / "export" / "config.json").is_file():  # RUN
        return checkpoint / "samples" / name
    return checkpoint.parent / "samples" / name  # an export: RUN/export or a copy of one


def output_name(args: argparse.Namespace) -> str:
    """sample_seed0.png, or completion_photo_k8_seed0.png for --complete photo.png."""
    temperature = f"_t{args.temperature:g}" if args.temperature != 1 else ""
    if args.class_ is not None:
        guidance = f"_g{args.guidance:g}" if args.guidance != 1 else ""
        return f"sample_class_{args.class_}_seed{args.seed}{temperature}{guidance}.png"
    if args.complete is None:
        return f"sample_seed{args.seed}{temperature}.png"
    path, _, index = args.complete.rpartition(":")
    image = f"{Path(path).stem}_{index}" if path.endswith(".npy") else Path(args.complete).stem
    return f"completion_{image}_k{args.rows_given}_seed{args.seed}{temperature}.png"


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    """uint8 [N, C, H, W] -> a PNG grid, `nrow` images per row, written atomically."""
    from torchvision.utils import save_image

    from axial_transformer.io import atomic_write

    atomic_write(path, lambda tmp: save_image(images.float() / 255, tmp, format="PNG", nrow=nrow,
                                              padding=2, pad_value=1.0))


def save_array(images: torch.Tensor, path: Path) -> None:
    """uint8 [N, C, H, W] -> a .npy of uint8 [N, H, W, C], written atomically."""
    from axial_transformer.io import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # np.save would append .npy to a path without it
            np.save(f, images.permute(0, 2, 3, 1).numpy(), allow_pickle=False)

    atomic_write(path, write)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true",
                        default=os.environ.get("AXIAL_DEBUG") == "1",
                        help="show the traceback of an error (also AXIAL_DEBUG=1)")
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, checkpoint directory, export directory or Hub "
                        "repository id (owner/name)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="images to draw (default 64, or 8 completions with --complete)")
    parser.add_argument("--out",
                        help="PNG to write (default: RUN/samples/sample_seed{SEED}.png, or "
                        "completion_{IMAGE}_k{K}_seed{SEED}.png; for an export outside a run, "
                        "samples/ beside it); the raw uint8 [N, H, W, C] pixels go to the same "
                        "name with .npy")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="divides the logits: < 1 sharper, > 1 more diverse (must be > 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="images drawn at once")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true",
                        help="run each decoding step as a torch.compile'd graph: faster at "
                        "batch 1 on a CPU, after compiling once per model and batch size "
                        "(about a minute on 2 CPU cores)")
    parser.add_argument("--class", dest="class_", metavar="C",
                        help="class-conditional models: the class to draw, a number or a class "
                        "name; 'all' draws --num-samples images (default 8) of each class, one "
                        "row per class")
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance scale with --class (1: the conditional "
                        "model as it is; above 1 more typical of the class; needs a model "
                        "trained with train.label_dropout)")
    parser.add_argument("--complete", metavar="IMAGE",
                        help="a PNG/JPEG of the model's size, or PATH.npy:INDEX of a prepared "
                        "split: keep its top --rows-given rows and sample the rest. "
                        + COMPLETION_CAVEAT)
    parser.add_argument("--rows-given", type=int, metavar="K",
                        help="rows of --complete kept as given (top K, less than the image "
                        "height)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if not 0 < args.temperature < math.inf:
        raise CLIError(f"--temperature must be a positive number, got {args.temperature}")
    if args.num_samples is not None and args.num_samples < 1:
        raise CLIError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    if (args.complete is None) != (args.rows_given is None):
        raise CLIError("--complete IMAGE and --rows-given K go together")
    if args.rows_given is not None and args.rows_given < 0:
        raise CLIError(f"--rows-given must be 0 or more (K rows are kept, the rest sampled), "
                       f"got {args.rows_given}")
    if not -math.inf < args.guidance < math.inf:
        raise CLIError(f"--guidance must be a finite number, got {args.guidance}")
    if args.guidance != 1 and args.class_ is None:
        raise CLIError("--guidance needs --class (classifier-free guidance toward a class)")
    if args.out is not None and Path(args.out).suffix.lower() != ".png":
        raise CLIError(f"--out {args.out}: expected a .png file (the pixels go beside it as .npy)")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise CLIError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available on this machine")


def class_labels(spec: str | None, config) -> list[int] | None:
    """--class as the class numbers to draw: one, or every class for 'all'; None without it."""
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
    known = f" or one of {', '.join(names)}" if names else ""
    raise CLIError(f"--class {spec}: expected a class number 0..{k - 1}{known}, or 'all'")


def warm_up(model, batch: int, known, known_mask, labels, guidance: float) -> float:
    """Compile the decoding steps for this batch size by drawing the first two rows of the first
    channel (the rest given), and return the seconds it took."""
    from axial_transformer.sampling import sample

    c, (h, w) = model.config.channels, model.config.image_size
    mask = torch.ones((1, c, h, w), dtype=torch.bool)
    mask[:, 0, :2] = False
    start = time.perf_counter()
    sample(model, batch, known=torch.zeros((1, c, h, w), dtype=torch.uint8), known_mask=mask,
           labels=labels, guidance=guidance, compile=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        from axial_transformer.checkpoint import load_trained_model

        checkpoint = Path(args.checkpoint)
        model, _ = load_trained_model(args.checkpoint)
        c, (h, w) = model.config.channels, model.config.image_size
        classes = class_labels(args.class_, model.config)
        if classes is None and args.guidance != 1:
            raise CLIError("--guidance needs a class-conditional model")
        known = known_mask = image = None
        if args.complete is not None:
            if args.rows_given >= h:  # all rows given: nothing would be sampled
                raise CLIError(f"--rows-given must be less than the image height {h} (K rows "
                               f"are kept, the rest sampled), got {args.rows_given}")
            image = torch.from_numpy(load_image(args.complete, c, (h, w))).permute(2, 0, 1)
            known = image[None]
            known_mask = torch.zeros((1, c, h, w), dtype=torch.bool)
            known_mask[:, :, : args.rows_given] = True
    except (ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2

    from axial_transformer.sampling import sample

    device = torch.device(args.device)
    model.to(device).eval()
    per_class = args.num_samples or (8 if image is not None or args.class_ == "all" else 64)
    num_samples = per_class * len(classes or [None])
    # One label per image, class after class (the rows of the grid).
    labels = None if classes is None else torch.tensor(classes).repeat_interleave(per_class)
    generator = torch.Generator(device).manual_seed(args.seed)
    if args.compile:
        sizes = sorted({min(args.batch_size, num_samples - first)
                        for first in range(0, num_samples, args.batch_size)})
        print(f"compiling the decoding steps for batch size {', '.join(map(str, sizes))} (once "
              "per model and batch size)...", flush=True)
        warm = sum(warm_up(model, n, known, known_mask, None if labels is None else labels[:n],
                           args.guidance) for n in sizes)
        print(f"compiled in {warm:.0f} s", flush=True)
    start = time.perf_counter()
    batches = []
    for first in range(0, num_samples, args.batch_size):
        n = min(args.batch_size, num_samples - first)
        batches.append(sample(model, n, temperature=args.temperature, generator=generator,
                              known=known, known_mask=known_mask, progress=True,
                              compile=args.compile, guidance=args.guidance,
                              labels=None if labels is None else labels[first:first + n]).cpu())
    seconds = time.perf_counter() - start
    samples = torch.cat(batches)  # (N, C, H, W) uint8

    out = Path(args.out) if args.out is not None else default_out(checkpoint, output_name(args))
    if classes is not None:
        save_grid(samples, out, nrow=per_class)  # one row per class
    elif image is None:
        save_grid(samples, out, nrow=math.ceil(math.sqrt(num_samples)))
    else:
        given = image * known_mask[0]  # the rows the model saw, black below
        save_grid(torch.cat([image[None], given[None], samples]), out, nrow=num_samples + 2)
    save_array(samples, out.with_suffix(".npy"))
    print(f"{num_samples} images of {c}x{h}x{w} in {seconds:.1f} s "
          f"({seconds / num_samples:.3f} s per image) -> {out}, {out.with_suffix('.npy')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
