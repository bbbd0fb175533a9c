"""Sampling speed: the naive sampler, the official code's scheme and the cached sampler.

    python bench/sample_bench.py                 # "small" preset, 16x16 and 32x32 RGB, batch 1, 64
    python bench/sample_bench.py --quick         # a tiny model; checks agreement (3 min: compiles)
    python bench/sample_bench.py --threads 8 --device cuda
    python bench/sample_bench.py --against HEAD~1  # this tree's sampler against another commit's
    python bench/sample_bench.py --settings      # what each eager-decoding setting buys

Seconds per image for
  naive     one teacher-forced forward pass per subpixel (`sampling.sample_naive`);
  official  the official code's scheme: the outer decoder recomputed over the whole image once per
            row, the inner decoder over the whole row once per pixel, no caches;
  ours      `sampling.sample`: channel encoder once per channel, outer decoder one row at a time,
            inner decoder one pixel at a time, both with key/value caches;
  compiled  `sampling.sample(compile=True)`: the same, each row step and subpixel step one
            torch.compile'd graph, timed in a fresh process per case after the compilation
            (printed apart): compiled graphs and autotuning choices of one case otherwise slow
            the next one down;
and ours divided by one teacher-forced forward pass over every slice of the same batch (1.0 is
the compute bound: sampling does the same arithmetic). Naive and official are timed over their
first steps and multiplied out to the whole image (marked *): every one of their steps costs the
same.

--against REV times `sample` (eager and compiled) of this tree and of commit REV, each held
warm in a fresh process of its own, the calls taken in turn between the two (the order swapping
every call), and reports the median over rounds of ours / theirs, each side's best call of the
round after a warm-up (of 5 at batch 1, of one at batch 64): on a shared machine the speed
drifts, in stalls that last seconds, and calls in turn meet a drift alike.

--settings times eager `sample` with each setting of `cpu_speedups.eager_decoding` turned off in
turn against all of them on, in one process, the order swapping every round, and reports the
median over rounds of off / on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import machine_line, sampler_precision

from axial_transformer import AxialTransformer, AxialTransformerConfig, cpu_speedups
from axial_transformer.model.transformer import shift_down, shift_right
from axial_transformer.precision import choose_precision
from axial_transformer.sampling.sampler import sample, sample_naive


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls after one untimed warm-up call, in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


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


def naive_seconds_per_step(model: AxialTransformer, batch: int, steps: int,
                           device: torch.device) -> float:
    """Steady-state seconds per subpixel of `sample_naive`, from its first `steps` steps."""
    stamps: list[float] = []

    def stamp(*_):
        sync(device)
        stamps.append(time.perf_counter())
        if len(stamps) > steps:
            raise StopSampling

    try:
        sample_naive(model, batch, on_logits=stamp)
    except StopSampling:
        pass
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


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


ROOT = Path(__file__).resolve().parents[1]


# A batch-1 call takes seconds: the best of several rides out a shared machine's stalls, which
# only ever slow a call down. A batch-64 call takes long enough as it is.
def timed_calls(batch: int) -> int:
    return 5 if batch == 1 else 1


class TimedSampler:
    """`sample` of the package in `tree`, held warm in a fresh process of its own that times one
    call per request: compiled graphs and autotuning choices of one case otherwise slow the next
    one. The first call (which compiles, if compiled) is made on start."""

    def __init__(self, tree: Path, preset: str, size: int, batch: int, compiled: bool,
                 args: argparse.Namespace) -> None:
        command = [sys.executable, os.path.abspath(__file__), "--case", "serve", "--preset",
                   preset, "--size", str(size), "--batch", str(batch), "--device", args.device]
        if compiled:
            command.append("--compile")
        if args.threads:
            command += ["--threads", str(args.threads)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env={**os.environ, "PYTHONPATH": str(tree)})
        self.first = self.call()

    def call(self) -> float:
        """Seconds of one `sample` call."""
        self.process.stdin.write("call\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith("seconds "):
                return float(line.split()[1])
        raise RuntimeError(f"the timed sampler exited with code {self.process.wait()}")

    def best(self, calls: int) -> float:
        """Best of `calls` calls after a warm-up call."""
        self.call()
        return min(self.call() for _ in range(calls))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def serve_timed_calls(args: argparse.Namespace) -> None:
    """The other end of `TimedSampler`: a model of the preset, one timed `sample` per line."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = AxialTransformerConfig.from_preset(args.preset, image_size=(args.size, args.size),
                                             channels=3)
    model = AxialTransformer(cfg).to(device).eval()
    for _ in sys.stdin:
        sync(device)
        start = time.perf_counter()
        sample(model, args.batch, compile=args.compile)
        sync(device)
        print(f"seconds {time.perf_counter() - start}", flush=True)


def compare_with(rev: str, args: argparse.Namespace) -> None:
    """Seconds per image of this tree's `sample` and of commit `rev`'s, rounds taken in turn."""
    with tempfile.TemporaryDirectory() as theirs:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", theirs], input=archive, check=True)
        print(f"# Sampling speed against {rev}, "
              f"{datetime.datetime.now().isoformat(timespec='seconds')}")
        print(f"# {machine_line(sampler_precision(args.device), args.threads)}, device "
              f"{args.device}, "
              f"preset 'small', {args.rounds} rounds per case; seconds per image\n")
        print("| image | batch | sampler | ours | theirs | ours / theirs (range) |")
        print("|---|--:|---|--:|--:|--:|")
        for size in args.sizes:
            for batch in args.batches:
                for compiled in [sampler == "compiled" for sampler in args.samplers]:
                    ours, their, ratios = [], [], []
                    for r in range(args.rounds):
                        trees = [ROOT, Path(theirs)] if r % 2 == 0 else [Path(theirs), ROOT]
                        best = against_in_turn(trees, size, batch, compiled, args)
                        ours.append(best[ROOT] / batch)
                        their.append(best[Path(theirs)] / batch)
                        ratios.append(ours[-1] / their[-1])
                    print(f"| {size}x{size}x3 | {batch} | {'compiled' if compiled else 'eager'} "
                          f"| {statistics.median(ours):.4f} | {statistics.median(their):.4f} | "
                          f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-"
                          f"{max(ratios):.2f}) |", flush=True)


def against_in_turn(trees: list[Path], size: int, batch: int, compiled: bool,
                    args: argparse.Namespace) -> dict[Path, float]:
    """Best seconds of a `sample` call of each tree's package, both held warm in processes of
    their own and called in turn (the order swapping every call): a stall of the machine, which
    may last seconds, then falls on both alike."""
    samplers = {tree: TimedSampler(tree, "small", size, batch, compiled, args) for tree in trees}
    try:
        for sampler in samplers.values():
            sampler.call()  # warm-up
        best = dict.fromkeys(trees, float("inf"))
        for k in range(timed_calls(batch)):
            for tree in trees if k % 2 == 0 else trees[::-1]:
                best[tree] = min(best[tree], samplers[tree].call())
        return best
    finally:
        for sampler in samplers.values():
            sampler.close()


EAGER_SETTINGS = ("decoding_threads", "plain_attributes")


def compare_settings(args: argparse.Namespace) -> None:
    """Seconds per image of eager `sample` with each eager-decoding setting off, against all on."""
    device = torch.device(args.device)
    print(f"# Eager decoding settings, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# {machine_line(sampler_precision(device))}, device {device}, preset 'small', "
          f"{args.rounds} rounds per case; seconds per image\n")
    print("| image | batch | setting turned off | all on | this one off | off / on (range) |")
    print("|---|--:|---|--:|--:|--:|")
    for size in args.sizes:
        cfg = AxialTransformerConfig.from_preset("small", image_size=(size, size), channels=3)
        torch.manual_seed(0)
        model = AxialTransformer(cfg).to(device).eval()
        for batch in args.batches:
            sample(model, batch)  # warm-up
            for name in EAGER_SETTINGS:
                real = getattr(cpu_speedups, name)
                on, off = [], []
                for r in range(args.rounds):
                    for enabled in ((True, False) if r % 2 == 0 else (False, True)):
                        setattr(cpu_speedups, name, real if enabled else
                                lambda *_: contextlib.nullcontext())
                        try:
                            start = time.perf_counter()
                            sample(model, batch)
                            sync(device)
                            seconds = (time.perf_counter() - start) / batch
                        finally:
                            setattr(cpu_speedups, name, real)
                        (on if enabled else off).append(seconds)
                ratios = [b / a for a, b in zip(on, off, strict=True)]
                print(f"| {size}x{size}x3 | {batch} | `{name}` | {statistics.median(on):.4f} | "
                      f"{statistics.median(off):.4f} | {statistics.median(ratios):.2f} "
                      f"({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes, seconds")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--against", metavar="REV",
                        help="compare this tree's sampler with commit REV's instead")
    parser.add_argument("--settings", action="store_true",
                        help="time each eager-decoding setting off against all on")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per case with --against or --settings")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32],
                        help="image sizes with --against or --settings")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64],
                        help="batch sizes with --against or --settings")
    parser.add_argument("--samplers", nargs="+", choices=["eager", "compiled"],
                        default=["eager", "compiled"], help="samplers timed with --against")
    # Internal: one timed case in a fresh process.
    parser.add_argument("--case", choices=["serve"], help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case == "serve":
        serve_timed_calls(args)
        return
    if args.against:
        compare_with(args.against, args)
        return
    if args.settings:
        compare_settings(args)
        return
    device = torch.device(args.device)
    torch.manual_seed(0)

    if args.quick:
        preset, sizes, batches, naive_steps, official_rows = "tiny", (4, 6), (1, 4), 3, 1
    else:
        preset, sizes, batches, naive_steps, official_rows = "small", (16, 32), (1, 64), 4, 2
    autocast = choose_precision("auto", device).bf16  # what `sample` does by default

    if args.quick:
        tiny = AxialTransformerConfig.from_preset(preset, image_size=(sizes[0], sizes[0] + 1))
        check_agreement(AxialTransformer(tiny).to(device).double().eval(), device)
    print(f"# Sampling benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# {machine_line(sampler_precision(device))}, device {device}, preset {preset!r}")
    print("# seconds per image; * = timed over the first steps and multiplied out\n")
    print("| image    | batch | naive     | official  | ours     | vs naive | vs official "
          "| ours / forward | compiled | compiled / forward |")
    print("|----------|------:|----------:|----------:|---------:|---------:|------------:"
          "|---------------:|---------:|-------------------:|")
    compile_seconds, summary = [], []
    for size in sizes:
        cfg = AxialTransformerConfig.from_preset(preset, image_size=(size, size), channels=3)
        model = AxialTransformer(cfg).to(device).eval()
        subpixels, rows = 3 * size * size, 3 * size
        for batch in batches:
            x = torch.randint(0, 256, (batch, 3, size, size), device=device)
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16,
                                                        enabled=autocast):
                forward = clock(lambda: model(x), device, repeats=3)  # noqa: B023
                naive = naive_seconds_per_step(model, batch, naive_steps, device) * subpixels
                # Row 0 also runs the channel encoder: time it alone, then the rows after it.
                first = clock(lambda: sample_official(model, batch, max_rows=1),  # noqa: B023
                              device, repeats=2)
                more = clock(lambda: sample_official(model, batch,  # noqa: B023
                                                     max_rows=1 + official_rows), device)
                per_row = (more - first) / official_rows
                official = 3 * (first - per_row) + rows * per_row
            ours = clock(lambda: sample(model, batch), device, repeats=2)  # noqa: B023
            timed = TimedSampler(ROOT, preset, size, batch, True, args)
            first, compiled = timed.first, timed.best(timed_calls(batch))
            timed.close()
            compile_seconds.append(f"{size}x{size} batch {batch}: {first - compiled:.0f} s")
            print(f"| {f'{size}x{size}x3':8} | {batch:5d} | {naive / batch:8.3f}* | "
                  f"{official / batch:8.3f}* | {ours / batch:8.4f} | {naive / ours:7.0f}x | "
                  f"{official / ours:10.1f}x | {ours / forward:14.2f} | "
                  f"{compiled / batch:8.4f} | {compiled / forward:18.2f} |", flush=True)
            if size == sizes[-1]:  # the targets are for the larger image
                for name, t in (("ours", ours), ("compiled", compiled)):
                    summary.append(
                        f"# {size}x{size}x3 batch {batch}, {name}: {naive / t:.0f}x naive, "
                        f"{official / t:.1f}x official, {t / forward:.2f}x forward"
                        + (" (targets at batch 64: >= 500x, >= 15x, <= 1.3x)" if batch > 1
                           else " (target at batch 1: <= 4x forward)"))
    print(f"\n# compilation (first compiled call minus a later one): {', '.join(compile_seconds)}")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
