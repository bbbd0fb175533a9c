"""Sampling speed: the naive sampler, the official code's scheme and the cached sampler.

    python bench/sample_bench.py                 # "small" preset, 16x16 and 32x32 RGB, batch 1, 64
    python bench/sample_bench.py --quick         # a tiny model; checks agreement (compiles)
    python bench/sample_bench.py --threads 8 --device cuda

Seconds per image for
  naive     one teacher-forced forward pass per subpixel (`sampling.sample_naive`);
  official  the official code's scheme: the outer decoder recomputed over the whole image once per
            row, the inner decoder over the whole row once per pixel, no caches;
  ours      `sampling.sample`: channel encoder once per channel, outer decoder one row at a time,
            inner decoder one pixel at a time, both with key/value caches;
  compiled  `sampling.sample(compile=True)`: the same, each row step and subpixel step one
            torch.compile'd graph, timed after its compilation (printed apart);
and ours divided by one teacher-forced forward pass over every slice of the same batch (1.0 is
the compute bound: sampling does the same arithmetic). Naive and official are timed over their
first steps and multiplied out to the whole image (marked *): every one of their steps costs the
same. Each time is the median of torch.utils.benchmark's blocked_autorange.

To time this tree's sampler against another commit's, run the script in a checkout of each
(`git worktree add`); what each eager-decoding setting buys: bench/cpu_paths_bench.py.
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import machine_line, sampler_precision, seconds, table

from axial_transformer import AxialTransformer, AxialTransformerConfig
from axial_transformer.model.transformer import shift_down, shift_right
from axial_transformer.precision import choose_precision
from axial_transformer.sampling.sampler import sample, sample_naive


@torch.inference_mode()
def sample_official(
    model: AxialTransformer, num_samples: int, noise: torch.Tensor | None = None,
    max_rows: int | None = None,
) -> torch.Tensor:
    """The official code's sampling scheme, no caches, stopping after `max_rows` rows if given.

    Per channel the channel encoder runs once; per row the outer decoder runs over the whole
    image; per pixel the inner decoder runs over the whole row. Draws by Gumbel-max from `noise`
    [B, C, H, W, V] or fresh noise.
    """
    c, (h, w), levels = model.config.channels, model.config.image_size, model.config.levels
    device = next(model.parameters()).device
    x = torch.zeros((num_samples, c, h, w), dtype=torch.long, device=device)
    pos, rows = model.positions(), 0
    for ci in range(c):
        ctx = model.channel_context(x, torch.full((num_samples,), ci, device=device))
        for i in range(h):
            if rows == max_rows:
                return x
            h_all = model.pixel_embedding(x[:, ci])
            u = shift_down(model.outer_decoder(h_all + pos + ctx))
            for j in range(w):
                h_row = model.pixel_embedding(x[:, ci, i : i + 1])
                r = model.inner_decoder(shift_right(h_row) + u[:, i : i + 1] + pos[i : i + 1]
                                        + ctx[:, i : i + 1])
                logits = model.logits(r[:, 0, j])
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                if noise is None:
                    u01 = torch.rand((num_samples, levels), device=device).clamp_(min=1e-30)
                    gumbel = -torch.log(-torch.log(u01))
                else:
                    gumbel = noise[:, ci, i, j].to(logits)
                x[:, ci, i, j] = (logits + gumbel).argmax(-1)
            rows += 1
    return x


class StopSampling(Exception):
    pass


def sample_naive_steps(model: AxialTransformer, batch: int, steps: int) -> None:
    """The first `steps` subpixels of `sample_naive`."""
    done = []

    def count(*_) -> None:
        done.append(1)
        if len(done) == steps:
            raise StopSampling

    try:
        sample_naive(model, batch, on_logits=count)
    except StopSampling:
        pass


def check_agreement(model: AxialTransformer, device: torch.device) -> None:
    """The three samplers are the same distribution: identical images from the same noise
    (float64, so that no near-tie flips)."""
    c, (h, w) = model.config.channels, model.config.image_size
    shape = (2, c, h, w, model.config.levels)
    noise = -torch.log(-torch.log(torch.rand(shape, device=device, dtype=torch.float64)))
    ours = sample(model, 2, noise=noise, autocast=False).long()
    naive = sample_naive(model, 2, noise=noise, autocast=False).long()
    official = sample_official(model, 2, noise=noise)
    agree = torch.equal(ours, naive) and torch.equal(ours, official)
    verdict = "identical" if agree else "DIFFERENT"
    print(f"# agreement check (same noise, float64): the three samplers give {verdict} images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model at 4x4: checks that it runs")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float,
                        help="seconds of timing per sampler and case (default 3; --quick: 0)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.quick:
        # One size: each case compiles for a minute, which is most of a quick run.
        preset, sizes, batches, naive_steps, official_rows = "tiny", (4,), (1, 4), 3, 1
    else:
        preset, sizes, batches, naive_steps, official_rows = "small", (16, 32), (1, 64), 4, 2
    run_time = args.min_run_time if args.min_run_time is not None else 0 if args.quick else 3
    timed = lambda fn: seconds(fn, run_time)
    width = AxialTransformerConfig.from_preset(preset).dim
    autocast = choose_precision("auto", device, width).bf16  # what `sample` does by default

    if args.quick:
        tiny = AxialTransformerConfig.from_preset(preset, image_size=(sizes[0], sizes[0] + 1))
        check_agreement(AxialTransformer(tiny).to(device).double().eval(), device)
    print(f"# Sampling benchmark, {machine_line(sampler_precision(width, device))}, "
          f"device {device}, preset {preset!r}")
    print("# seconds per image; * = timed over the first steps and multiplied out; compiled: "
          "torch.compiler.reset() before each case, so that no case runs with another's graphs "
          "(what a fresh process per case was once for)\n")
    compile_seconds, summary = [], []

    def rows():
        for size in sizes:
            cfg = AxialTransformerConfig.from_preset(preset, image_size=(size, size), channels=3)
            model = AxialTransformer(cfg).to(device).eval()
            for batch in batches:
                yield [f"{size}x{size}x3", batch, *case(model, size, batch)]

    def case(model: AxialTransformer, size: int, batch: int) -> list[str]:
        x = torch.randint(0, 256, (batch, 3, size, size), device=device)
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16,
                                                    enabled=autocast):
            forward = timed(lambda: model(x))
            naive = timed(lambda: sample_naive_steps(model, batch, naive_steps)
                          ) * 3 * size * size / naive_steps
            # Row 0 also runs the channel encoder: time it alone, then the rows after it.
            first = timed(lambda: sample_official(model, batch, max_rows=1))
            more = timed(lambda: sample_official(model, batch, max_rows=1 + official_rows))
            per_row = (more - first) / official_rows
            official = 3 * (first - per_row) + 3 * size * per_row
        ours = timed(lambda: sample(model, batch))
        torch.compiler.reset()
        start = time.perf_counter()
        sample(model, batch, compile=True).cpu()  # compiles
        first = time.perf_counter() - start
        compiled = timed(lambda: sample(model, batch, compile=True))
        compile_seconds.append(f"{size}x{size} batch {batch}: {first - compiled:.0f} s")
        if size == sizes[-1]:  # the targets are for the larger image
            for name, t in (("ours", ours), ("compiled", compiled)):
                summary.append(
                    f"# {size}x{size}x3 batch {batch}, {name}: {naive / t:.0f}x naive, "
                    f"{official / t:.1f}x official, {t / forward:.2f}x forward"
                    + (" (targets at batch 64: >= 500x, >= 15x, <= 1.3x)" if batch > 1
                       else " (target at batch 1: <= 4x forward)"))
        return [f"{naive / batch:.3f}*", f"{official / batch:.3f}*", f"{ours / batch:.4f}",
                f"{naive / ours:.0f}x", f"{official / ours:.1f}x", f"{ours / forward:.2f}",
                f"{compiled / batch:.4f}", f"{compiled / forward:.2f}"]

    table(["image", "batch", "naive", "official", "ours", "vs naive", "vs official",
           "ours / forward", "compiled", "compiled / forward"], rows())
    print(f"\n# compilation (first compiled call minus a later one): "
          f"{', '.join(compile_seconds)}")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
