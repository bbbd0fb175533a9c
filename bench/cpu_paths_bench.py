"""What each CPU-specific speed path buys: each timed on and off in turn in one process.

The paths measured and deleted (the aten softmax-backward kernel, bf16 softmax through fp32, the
drop-in layers' plain matmuls, column-major linear weights, the fused EMA update, glibc's
`mallopt`) are timed by this file at commit 3d99ff6, the tree before they went
(docs/benchmarks.md).

    python bench/cpu_paths_bench.py                            # this CPU's widest vector code
    ATEN_CPU_CAPABILITY=avx2 python bench/cpu_paths_bench.py   # as an AVX2-only CPU computes
    python bench/cpu_paths_bench.py --threads 1 --paths decoding --rounds 9

For every path the two variants (the path on, and what the code does without it) run in turn,
the order swapping every round, each call the best of `--repeats`; the table gives the median
over rounds of off / on (above 1: the path gains) and its range. On a shared machine the speed
drifts; calls in turn meet a drift alike, so the ratio holds where the seconds do not.

The model is the shape of the demo (16x16x3, dim 64, 4 heads, 2+2+2 layers), training
at batch 16 and sampling at batch 1 and 4, plus the "small" preset at 32x32 (batch 2) for the
paths whose gain grows with the axis length.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from machine import cpu_model

from axial_transformer import (
    AxialTransformer,
    AxialTransformerConfig,
    cpu_speedups,
)
from axial_transformer.sampling.sampler import sample

DEMO = dict(image_size=(16, 16), channels=3, dim=64, heads=4, encoder_layers=2, outer_layers=2,
            inner_layers=2)


def best_of(function: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def in_turn(on: Callable[[], object], off: Callable[[], object], rounds: int,
            repeats: int) -> tuple[float, float, list[float]]:
    """(median seconds on, median seconds off, off / on of every round), the order swapping."""
    on(), off()  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for enabled in ((True, False) if r % 2 == 0 else (False, True)):
            times[enabled].append(best_of(on if enabled else off, repeats))
    ratios = [b / a for a, b in zip(times[True], times[False], strict=True)]
    return statistics.median(times[True]), statistics.median(times[False]), ratios


def row(path: str, case: str, result: tuple[float, float, list[float]]) -> None:
    on, off, ratios = result
    print(f"| {path} | {case} | {on * 1e3:.2f} | {off * 1e3:.2f} | "
          f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)


@contextlib.contextmanager
def patched(owner: object, name: str, value: object) -> Iterator[None]:
    real = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, real)


def model(attention_path: str = "auto", preset: str | None = None, size: int = 16,
          dtype: torch.dtype = torch.float32) -> AxialTransformer:
    torch.manual_seed(0)
    if preset:
        cfg = AxialTransformerConfig.from_preset(preset, image_size=(size, size), channels=3)
    else:
        cfg = AxialTransformerConfig(**DEMO)
    return AxialTransformer(cfg).set_attention(attention_path).to(dtype)


def training_step(m: AxialTransformer, batch: int, autocast: bool = False) -> Callable[[], None]:
    h, w = m.config.image_size
    x = torch.randint(0, 256, (batch, 3, h, w), generator=torch.Generator().manual_seed(0))
    channel = torch.zeros(batch, dtype=torch.long)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = m.loss(x, channel=channel)
        loss.backward()
        m.zero_grad(set_to_none=True)

    return step


def attention_paths(args: argparse.Namespace) -> None:
    """Plain-matmul attention against SDPA in training steps, fp32 and under bf16 autocast."""
    cases = [("demo 16x16, batch 16", {}, 16), ("small 32x32, batch 2",
                                                 {"preset": "small", "size": 32}, 2)]
    for label, kwargs, batch in cases:
        fast, fused = model("matmul", **kwargs), model("sdpa", **kwargs)
        row("plain-matmul attention vs SDPA (fp32 step)", label,
            in_turn(training_step(fast, batch), training_step(fused, batch),
                    args.rounds, args.repeats))
    fast, fused = model("matmul"), model("sdpa")
    row("plain-matmul attention vs SDPA (bf16 autocast step)", "demo 16x16, batch 16",
        in_turn(training_step(fast, 16, True), training_step(fused, 16, True),
                max(3, args.rounds // 2), 1))


def inference_paths(args: argparse.Namespace) -> None:
    """Plain-matmul attention against SDPA without autograd: the forward pass of an evaluation
    batch, and eager sampling (a decoding step of 8 or more sequences takes plain matmuls under
    "auto")."""
    fast, fused = model("matmul").eval(), model("sdpa").eval()
    x = torch.randint(0, 256, (64, 3, 16, 16), generator=torch.Generator().manual_seed(0))

    def forward(m: AxialTransformer) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return m(x)
        return call

    row("plain-matmul attention vs SDPA (forward, no autograd)", "demo 16x16, batch 64",
        in_turn(forward(fast), forward(fused), args.rounds, args.repeats))
    for batch in (1, 64):
        row("plain-matmul attention vs SDPA (eager sampling)", f"demo 16x16, batch {batch}",
            in_turn(lambda batch=batch: sample(fast, batch),
                    lambda batch=batch: sample(fused, batch), args.rounds, 1))


def decoding_paths(args: argparse.Namespace) -> None:
    """Eager sampling with plain attribute lookups off."""
    m = model().eval()
    for batch in (1, 4):
        def without(batch=batch) -> None:
            with patched(cpu_speedups, "plain_attributes", lambda *_: contextlib.nullcontext()):
                sample(m, batch)

        row("eager decoding: `plain_attributes`", f"demo 16x16, batch {batch}",
            in_turn(lambda batch=batch: sample(m, batch), without, args.rounds, 1))


def decoding_threads(args: argparse.Namespace) -> None:
    """Eager sampling below batch 8 on one thread, against torch's thread count (--threads)."""
    m = model().eval()
    for batch in (1, 4):
        def draw(batch=batch) -> None:
            sample(m, batch)

        def without(draw=draw) -> None:
            with patched(cpu_speedups, "decoding_threads", lambda *_: contextlib.nullcontext()):
                draw()

        row(f"eager decoding: `decoding_threads` (1 against {torch.get_num_threads()})",
            f"demo 16x16, batch {batch}", in_turn(draw, without, args.rounds, 1))


PATHS = {"attention": attention_paths, "inference": inference_paths,
         "decoding": decoding_paths, "threads": decoding_threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    parser.add_argument("--rounds", type=int, default=7, help="rounds of on and off in turn")
    parser.add_argument("--repeats", type=int, default=3, help="calls per timing (best kept)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# CPU speed paths, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# {cpu_model()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 unless a row "
          f"says bf16; {args.rounds} rounds, best of {args.repeats} calls per timing "
          "(sampling: 1)\n")
    print("| path | case | on (ms) | off (ms) | off / on (range) |")
    print("|---|---|--:|--:|--:|")
    for name in args.paths:
        PATHS[name](args)


if __name__ == "__main__":
    main()
