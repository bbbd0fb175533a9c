"""What each CPU-specific speed path buys: each timed on and off in turn in one process.

The paths measured and deleted (the aten softmax-backward kernel, bf16 softmax through fp32, the
drop-in layers' plain matmuls, column-major linear weights, the fused EMA update, glibc's
`mallopt`) are timed by this file at commit 3d99ff6, the tree before they went
(docs/benchmarks.md).

    python bench/cpu_paths_bench.py                            # this CPU's widest vector code
    ATEN_CPU_CAPABILITY=avx2 python bench/cpu_paths_bench.py   # as an AVX2-only CPU computes
    python bench/cpu_paths_bench.py --threads 1 --paths decoding --rounds 9

For every path the two variants (the path on, and what the code does without it) run in turn,
the order swapping every round, each timing the median of torch.utils.benchmark's
blocked_autorange; the table gives the median over rounds of off / on (above 1: the path gains)
and its range. On a shared machine the speed drifts; calls in turn meet a drift alike, so the
ratio holds where the seconds do not.

The model is the shape of the demo (16x16x3, dim 64, 4 heads, 2+2+2 layers), training
at batch 16 and sampling at batch 1 and 4, plus the "small" preset at 32x32 (batch 2) for the
paths whose gain grows with the axis length.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable, Iterator

import torch
from machine import in_turn, machine_line, ratio, table

from axial_transformer import AxialTransformer, AxialTransformerConfig, cpu_speedups
from axial_transformer.sampling.sampler import sample

DEMO = dict(image_size=(16, 16), channels=3, dim=64, heads=4, encoder_layers=2, outer_layers=2,
            inner_layers=2)


def row(path: str, case: str, on: Callable[[], object], off: Callable[[], object],
        args: argparse.Namespace) -> list[str]:
    t = in_turn({"on": on, "off": off}, args.rounds, args.min_run_time)
    return [path, case, f"{1e3 * statistics.median(t['on']):.2f}",
            f"{1e3 * statistics.median(t['off']):.2f}", ratio(t["on"], t["off"])]


@contextlib.contextmanager
def without(setting: str):
    """`cpu_speedups.<setting>` turned into a no-op while the block runs."""
    real = getattr(cpu_speedups, setting)
    setattr(cpu_speedups, setting, lambda *_: contextlib.nullcontext())
    try:
        yield
    finally:
        setattr(cpu_speedups, setting, real)


def model(attention_path: str = "auto", preset: str | None = None,
          size: int = 16) -> AxialTransformer:
    torch.manual_seed(0)
    if preset:
        cfg = AxialTransformerConfig.from_preset(preset, image_size=(size, size), channels=3)
    else:
        cfg = AxialTransformerConfig(**DEMO)
    return AxialTransformer(cfg).set_attention(attention_path)


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


def attention_paths(args: argparse.Namespace) -> Iterator[list[str]]:
    """Plain-matmul attention against SDPA in training steps, fp32 and under bf16 autocast."""
    for label, kwargs, batch in (("demo 16x16, batch 16", {}, 16),
                                 ("small 32x32, batch 2", {"preset": "small", "size": 32}, 2)):
        fast, fused = model("matmul", **kwargs), model("sdpa", **kwargs)
        yield row("plain-matmul attention vs SDPA (fp32 step)", label,
                  training_step(fast, batch), training_step(fused, batch), args)
    fast, fused = model("matmul"), model("sdpa")
    yield row("plain-matmul attention vs SDPA (bf16 autocast step)", "demo 16x16, batch 16",
              training_step(fast, 16, True), training_step(fused, 16, True), args)


def inference_paths(args: argparse.Namespace) -> Iterator[list[str]]:
    """Plain-matmul attention against SDPA without autograd: the forward pass of an evaluation
    batch, and eager sampling."""
    fast, fused = model("matmul").eval(), model("sdpa").eval()
    x = torch.randint(0, 256, (64, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    forward = lambda m: torch.no_grad()(lambda: m(x))
    yield row("plain-matmul attention vs SDPA (forward, no autograd)", "demo 16x16, batch 64",
              forward(fast), forward(fused), args)
    for batch in (1, 64):
        yield row("plain-matmul attention vs SDPA (eager sampling)", f"demo 16x16, batch {batch}",
                  lambda b=batch: sample(fast, b), lambda b=batch: sample(fused, b), args)


def decoding_paths(args: argparse.Namespace, setting: str) -> Iterator[list[str]]:
    """Eager sampling with one eager-decoding setting of cpu_speedups off."""
    m = model().eval()
    name = f"eager decoding: `{setting}`" + (
        f" (1 thread against {torch.get_num_threads()})" if setting == "decoding_threads" else "")

    def off(batch: int) -> None:
        with without(setting):
            sample(m, batch)

    for batch in (1, 4):
        yield row(name, f"demo 16x16, batch {batch}", lambda b=batch: sample(m, b),
                  lambda b=batch: off(b), args)


PATHS = {"attention": attention_paths, "inference": inference_paths,
         "decoding": lambda args: decoding_paths(args, "plain_attributes"),
         "threads": lambda args: decoding_paths(args, "decoding_threads")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    parser.add_argument("--rounds", type=int, default=7, help="rounds of on and off in turn")
    parser.add_argument("--min-run-time", type=float, default=0.5,
                        help="seconds of calls per timing (at least one call after a warm-up)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# CPU speed paths, {machine_line('fp32 unless a row says bf16')}; {args.rounds} "
          f"rounds, blocked_autorange over {args.min_run_time:g} s per timing\n")
    table(["path", "case", "on (ms)", "off (ms)", "off / on (range)"],
          (r for name in args.paths for r in PATHS[name](args)))


if __name__ == "__main__":
    main()
