"""Where bf16 autocast pays on this CPU: training steps in fp32 and bf16 by model width, the
measurement behind `precision.CPU_BF16_MIN_WIDTH`.

    python bench/precision_bench.py                       # widths 32-512: ~4 minutes
    python bench/precision_bench.py --widths 64 256 --rounds 3

Each width is the "tiny" preset's depth (2/2/2 layers, 64 channels a head, at least 4 heads) on
16x16 RGB images at batch 16, the demo's shape; a step is forward, backward and Adam of the
random-channel loss. fp32 and bf16 steps are timed in turn in one process, one thread.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from machine import in_turn, machine_line, ratio, table

from axial_transformer import AxialTransformerConfig, build_model
from axial_transformer.precision import CPU_BF16_MIN_WIDTH, bf16_is_fast


def step_times(width: int, rounds: int, min_run_time: float) -> dict[str, list[float]]:
    config = AxialTransformerConfig.from_preset("tiny", image_size=(16, 16), dim=width,
                                                heads=max(4, width // 64))
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)

    def step(bf16: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(x, "random")
        loss.backward()
        optimizer.step()

    return in_turn({"fp32": lambda: step(False), "bf16": lambda: step(True)}, rounds,
                   min_run_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=1.0,
                        help="seconds of timing per precision and round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# bf16 autocast against fp32 by width, {machine_line('fp32 and bf16 in turn', 1)}")
    print(f"bf16 on this CPU: {bf16_is_fast(torch.device('cpu'))[1]}; precision 'auto' takes "
          f"it from width {CPU_BF16_MIN_WIDTH}\n")
    rows = []
    for width in args.widths:
        t = step_times(width, args.rounds, args.min_run_time)
        rows.append([width, f"{1e3 * statistics.median(t['fp32']):.1f}",
                     f"{1e3 * statistics.median(t['bf16']):.1f}", ratio(t["bf16"], t["fp32"])])
    table(["width", "fp32 step ms", "bf16 step ms", "bf16 speed-up (range over rounds)"], rows)


if __name__ == "__main__":
    main()
