"""The video model on the moving digits: what the temporal context pays, what sampling and a
training step cost (issue #25).

    python bench/video_bench.py                   # the three tables: ~15 CPU minutes, one thread
    python bench/video_bench.py --quick           # tiny models, seconds of training: checks it runs
    python bench/video_bench.py --parts bits --seconds 300 --gif /tmp/video_bench/continuation.gif
    python bench/video_bench.py --parts bits --checkpoint runs/video-demo   # a trained run
    python bench/video_bench.py --parts sampling steps --threads 1 2

It prints, each as a markdown table under the machine it ran on:

1. bits: held-out bits/dim of the video model against an image model of about the same
   parameter count, each trained for the same CPU seconds (`time.process_time`, one thread) on
   the moving digits' training clips, the image model on their frames one at a time; both scored
   exactly on every subpixel of the test clips, with the video model's bits/dim frame by frame.
   Then a continuation: the first two frames of test clips given, the rest drawn
   (`sampling.given_frames`), against the truth, beside copying the last given frame, repeating
   the motion-compensated guess and the image model's unconditional frames (mean absolute pixel
   error), and as a GIF with --gif. With --checkpoint, a trained run's bits and continuation;
2. sampling: `model.sample(batch)` of the video model, eager and compiled (`compile=True`,
   the compilation timed apart), against one teacher-forced forward pass of the same batch, in
   seconds (torch.utils.benchmark) and in FLOPs (torch.utils.flop_counter.FlopCounterMode);
3. steps: a training step (forward + backward) of the video model against a model of the same
   width and depth whose attention is full causal self-attention over the T*H*W subpixels of the
   clip, at several clip lengths: time, FLOPs and peak memory (`ru_maxrss`, a fresh process per
   case);
4. motion: how well two frames predict the next in the data itself, by copying frame t-1 or
   by the model's motion-compensated guess (no model): what the frame encoder is handed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from machine import in_turn, machine_line, ratio, seconds, table
from model_bench import CPU_FLASH_FLOPS, PixelGPT, in_fresh_process, rss_mib
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from axial_transformer import AxialTransformerConfig, build_model
from axial_transformer.data.moving_digits import moving_digits
from axial_transformer.model.video import motion_compensated
from axial_transformer.sampling import given_frames
from axial_transformer.training.checkpoint import load_trained_model


@dataclasses.dataclass
class Demo:
    """The model and training settings measured (the values of configs/video-demo.yaml)."""

    image_size: int = 16
    frames: int = 8
    dim: int = 32
    heads: int = 4
    layers: int = 2  # each of the channel encoder, the outer and the inner decoder
    frame_layers: int = 3
    batch: int = 2  # clips per step; the image model takes their frames, batch * frames images
    lr: float = 5e-3
    warmup: int = 20  # steps of linear warm-up; then cosine decay to 0 over the CPU seconds

    def config(self, frames: int, dim: int | None = None) -> AxialTransformerConfig:
        return AxialTransformerConfig(
            image_size=(self.image_size, self.image_size), channels=1, dim=dim or self.dim,
            heads=self.heads, encoder_layers=self.layers, outer_layers=self.layers,
            inner_layers=self.layers, frames=frames, frame_layers=self.frame_layers if frames
            else 3,
        )


QUICK = Demo(image_size=8, frames=3, dim=16, heads=2, frame_layers=3, batch=2, warmup=2)
GIVEN = 2  # frames given to the continuation: a position and a velocity


# ------------------------------------------------------------------------------------------------
# Data and training.


def clips(split: str, demo: Demo, count: int | None = None) -> Tensor:
    """Moving-digit clips as [N, 1, T, H, W] uint8."""
    size = (demo.image_size, demo.image_size)
    array = moving_digits(split, count, frames=demo.frames, image_size=size)
    return rearrange(torch.from_numpy(array), "n t h w c -> n c t h w")


def matching_image_dim(demo: Demo, parameters: int) -> int:
    """The image model's width (a multiple of its heads) whose parameter count comes closest to
    the video model's: the frame encoder's blocks are paid for by a wider image model."""
    widths = range(demo.heads, 8 * demo.dim + 1, demo.heads)
    count = {d: build_model(demo.config(0, d)).num_parameters() for d in widths
             if d >= demo.dim}
    return min(count, key=lambda d: abs(count[d] - parameters))


def learning_rate(demo: Demo, step: int, progress: float) -> float:
    """Linear warm-up over steps, then cosine decay over the share of CPU seconds used."""
    return demo.lr * min(1.0, (step + 1) / demo.warmup) * 0.5 * (1 + math.cos(math.pi * progress))


def train(model: nn.Module, data: Tensor, batch: int, demo: Demo, cpu_seconds: float,
          seed: int = 0) -> dict:
    """Adam on random batches of `data` for `cpu_seconds` of this process's CPU time."""
    optimizer = torch.optim.Adam(model.parameters(), lr=demo.lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start, step, losses = time.process_time(), 0, []
    while (used := time.process_time() - start) < cpu_seconds:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(demo, step, used / cpu_seconds)
        loss = model.loss(data[torch.randint(len(data), (batch,), generator=generator)], "all")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
    model.eval()
    return {"steps": step, "cpu": time.process_time() - start,
            "train_bits": float(np.mean(losses[-20:]))}


@torch.inference_mode()
def test_bits(model: nn.Module, data: Tensor, batch: int = 16) -> Tensor:
    """-log2 p of every subpixel of `data`, exactly: [N, 1, (T,) H, W]."""
    return torch.cat([model.subpixel_bits(x) for x in data.split(batch)])


# ------------------------------------------------------------------------------------------------
# 1. Bits/dim and a continuation.


def bits_part(args: argparse.Namespace, demo: Demo) -> nn.Module:
    torch.manual_seed(0)
    train_clips, test_clips = clips("train", demo), clips("test", demo, args.test_clips)
    video = build_model(demo.config(demo.frames))
    image_dim = matching_image_dim(demo, video.num_parameters())
    image = build_model(demo.config(0, image_dim))
    frames = rearrange(train_clips, "n c t h w -> (n t) c h w")  # every frame its own image
    runs = {"video": train(video, train_clips, demo.batch, demo, args.seconds),
            "image": train(image, frames, demo.batch * demo.frames, demo, args.seconds)}
    video_bits = test_bits(video, test_clips).mean((0, 1, 3, 4))  # per frame
    image_bits = test_bits(image, rearrange(test_clips, "n c t h w -> (n t) c h w"),
                           batch=16 * demo.frames)
    image_bits = rearrange(image_bits, "(n t) c h w -> n c t h w", t=demo.frames).mean((0, 1, 3, 4))
    bpd = {"video": video_bits.mean().item(), "image": image_bits.mean().item()}

    print(f"\n## Held-out bits/dim at equal CPU time ({args.seconds:.0f} CPU s each)\n")
    print(machine_line("fp32", 1))
    print(f"moving digits {demo.image_size}x{demo.image_size}, {demo.frames} frames; "
          f"{len(train_clips)} training clips, {len(test_clips)} test clips; Adam lr {demo.lr}, "
          f"{demo.warmup} steps warm-up, cosine decay over the CPU seconds\n")
    models = {"video": video, "image": image}
    table(["model", "width", "parameters", "batch", "steps", "CPU s", "train bits/dim",
           "test bits/dim", "/ image"],
          ([name, models[name].config.dim, f"{models[name].num_parameters():,}",
            f"{demo.batch} clips" if name == "video" else f"{demo.batch * demo.frames} frames",
            runs[name]["steps"], f"{runs[name]['cpu']:.0f}", f"{runs[name]['train_bits']:.3f}",
            f"{bpd[name]:.3f}", f"{bpd[name] / bpd['image']:.3f}"] for name in models))
    met = bpd["video"] <= 0.6 * bpd["image"]
    print(f"\ntarget: video / image <= 0.6: {'met' if met else 'NOT met'}\n\n"
          "Test bits/dim frame by frame:\n")
    table(["model", *(f"frame {t}" for t in range(demo.frames))],
          [[name, *(f"{b:.3f}" for b in bits.tolist())]
           for name, bits in (("video", video_bits), ("image", image_bits))])
    continuation(args, demo, video, image, test_clips)
    return video


def trained_part(args: argparse.Namespace, demo: Demo) -> nn.Module:
    """--checkpoint: a trained video run's test bits/dim frame by frame, and its continuation."""
    video = load_trained_model(args.checkpoint)[0].eval()
    c = video.config
    demo = dataclasses.replace(demo, image_size=c.image_size[0], frames=c.frames)
    test_clips = clips("test", demo, args.test_clips)
    bits = test_bits(video, test_clips).mean((0, 1, 3, 4))
    print(f"\n## {args.checkpoint}: test bits/dim of {len(test_clips)} clips\n")
    print(machine_line("fp32", 1))
    table(["clip", *(f"frame {t}" for t in range(demo.frames))],
          [[f"{bits.mean():.3f}", *(f"{b:.3f}" for b in bits.tolist())]])
    continuation(args, demo, video, None, test_clips)
    return video


@torch.inference_mode()
def continuation(args: argparse.Namespace, demo: Demo, video: nn.Module,
                 image: nn.Module | None, test_clips: Tensor) -> None:
    """Frames GIVEN.. drawn given the first GIVEN frames of test clips, against the truth."""
    truth = test_clips[: args.continuations]
    n, later = len(truth), slice(GIVEN, None)
    generator = torch.Generator().manual_seed(0)
    drawn = {f"video, temperature {temperature}":
             video.sample(n, **given_frames(truth[:, :, :GIVEN], demo.frames),
                          temperature=temperature, generator=generator)
             for temperature in args.temperatures}
    copy = truth[:, :, GIVEN - 1 : GIVEN].expand_as(truth[:, :, later])

    def error(predicted: Tensor) -> Tensor:  # mean absolute pixel error per predicted frame
        return (predicted.float() - truth[:, :, later].float()).abs().mean((0, 1, 3, 4))

    rows = {name: error(clip[:, :, later]) for name, clip in drawn.items()}
    rows[f"copy frame {GIVEN - 1}"] = error(copy)
    rows["motion-compensated guess, repeated"] = error(extrapolated(truth[:, :, :GIVEN],
                                                                    demo.frames)[:, :, later])
    if image is not None:
        unconditional = image.sample(n * (demo.frames - GIVEN), generator=generator)
        rows["image model, unconditional"] = error(
            rearrange(unconditional, "(n t) c h w -> n c t h w", n=n))
    print(f"\nContinuation of {n} test clips, frames 0-{GIVEN - 1} given: mean absolute error "
          "against the true frames (pixel values 0-255)\n")
    table(["prediction", f"frames {GIVEN}-{demo.frames - 1}",
           *(f"frame {t}" for t in range(GIVEN, demo.frames))],
          [[name, f"{e.mean():.1f}", *(f"{v:.1f}" for v in e.tolist())]
           for name, e in rows.items()])
    if args.gif:
        save_gif(args.gif, truth, next(iter(drawn.values())))


def extrapolated(first: Tensor, frames: int) -> Tensor:
    """Clips [N, C, T, H, W] whose frames after `first` [N, C, k, H, W] (k >= 2) are each the
    motion-compensated guess from the two before: constant motion, with no model."""
    x = [f.float() / 255 for f in first.unbind(2)]
    while len(x) < frames:
        x.append(motion_compensated(x[-1], x[-2]))
    return (torch.stack(x, 2) * 255).round().to(torch.uint8)


def save_gif(path: Path, truth: Tensor, predicted: Tensor, clips: int = 8, scale: int = 4) -> None:
    """Clips side by side, each the truth above its prediction, one GIF frame per clip frame."""
    from PIL import Image

    pair = torch.stack([truth[:clips, 0], predicted[:clips, 0]], 1)  # [N, 2, T, H, W]
    pair = torch.nn.functional.pad(pair, (1, 1, 1, 1), value=128)  # grey borders
    grid = rearrange(pair, "n k t h w -> t (k h) (n w)").numpy()
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale),
                                        Image.Resampling.NEAREST) for f in grid]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=250, loop=0)
    print(f"\n{path}: {len(pair)} test clips, the truth (top) above the video model's "
          f"continuation (bottom), frames 0-{GIVEN - 1} given")


# ------------------------------------------------------------------------------------------------
# 2. Sampling against a forward pass.


def sampling_part(args: argparse.Namespace, demo: Demo, model: nn.Module | None) -> None:
    """Eager and compiled sampling against one forward pass, all in fp32: at the demo's width
    bf16 (precision "auto" on a CPU with fast bf16) samples more slowly than fp32."""
    model = (model or build_model(demo.config(demo.frames))).eval()
    x = clips("test", demo, args.sample_batch)
    generator = torch.Generator().manual_seed(0)

    def sampler(compile: bool):
        return lambda: model.sample(len(x), generator=generator, autocast=False, compile=compile)

    def forward() -> Tensor:
        with torch.inference_mode():
            return model(x)

    flops = {}
    for name, fn in (("sample", sampler(False)), ("forward", forward)):
        counter = FlopCounterMode(display=False, custom_mapping=CPU_FLASH_FLOPS)
        with counter:
            fn()
        flops[name] = counter.get_total_flops()
    print(f"\n## Sampling against one forward pass, batch {len(x)}\n")
    rows, worst = [], {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        sampler(True)()  # compiles the decoding steps for this model and batch
        compiling = time.perf_counter() - start
        # In turn: a process's forward pass alone has run at 1.1 s and at 1.8 s on the same
        # machine, so a ratio is taken within a round, never across processes or minutes.
        times = in_turn({"eager": sampler(False), "compiled": sampler(True), "forward": forward},
                        args.rounds, args.min_run_time)
        for name in ("eager", "compiled"):
            worst[name] = max(worst.get(name, 0.0), statistics.median(
                s / f for s, f in zip(times[name], times["forward"], strict=True)))
        rows.append([threads, *(f"{statistics.median(times[n]):.2f}" for n in times),
                     f"{compiling:.0f}", ratio(times["forward"], times["eager"]),
                     ratio(times["forward"], times["compiled"])])
    torch.set_num_threads(1)
    print(machine_line("fp32", " and ".join(map(str, args.threads))))
    print(f"video model of {model.num_parameters():,} parameters, {demo.frames} frames of "
          f"{demo.image_size}x{demo.image_size}, clips of the test split; sampling FLOPs / "
          f"forward FLOPs: {flops['sample'] / 1e9:.2f} / {flops['forward'] / 1e9:.2f} G = "
          f"{flops['sample'] / flops['forward']:.3f}; the three calls timed in turn for "
          f"{args.rounds} rounds: medians, and each ratio's median over rounds (range)\n")
    table(["threads", "eager s", "compiled s", "forward s", "compiling s", "eager / forward",
           "compiled / forward"], rows)
    for name, r in worst.items():
        print(f"\ntarget: {name} sampling at batch 64 <= 1.3 forward passes: "
              f"{'met' if r <= 1.3 else 'NOT met'} (median {r:.2f})")


# ------------------------------------------------------------------------------------------------
# 3. A training step against full attention over the clip.


def full_attention_model(config: AxialTransformerConfig) -> nn.Module:
    """model_bench's PixelGPT over the clip flattened to (t, i, j) order as one tall image
    [B, 1, T*H, W]: the same width, MLP and number of blocks (channel encoder, decoders and frame
    encoder), full causal self-attention over T*H*W tokens."""
    (h, w), t = config.image_size, config.frames
    flat = dataclasses.replace(config, image_size=(t * h, w), frames=0, frame_layers=3,
                               inner_layers=config.inner_layers + config.frame_layers)
    return PixelGPT(flat)


def step_case(args: argparse.Namespace, variant: str, demo: Demo, frames: int) -> dict:
    """Forward + backward of one model on a batch of clips: seconds, FLOPs, peak memory."""
    torch.set_num_threads(args.threads[0])
    torch.manual_seed(0)
    base = rss_mib()
    config = demo.config(frames)
    x = torch.randint(0, 256, (args.step_batch, 1, frames, demo.image_size, demo.image_size),
                      dtype=torch.uint8)
    if variant == "axial":
        model = build_model(config)
        loss = lambda: model.loss(x, "all")
    else:
        model = full_attention_model(config)
        loss = lambda: model.loss(rearrange(x, "b c t h w -> b c (t h) w"))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss().backward()

    counter = FlopCounterMode(display=False, custom_mapping=CPU_FLASH_FLOPS)
    with counter:
        step()
    return {"seconds": seconds(step, args.min_run_time), "flops": counter.get_total_flops(),
            "parameters": sum(p.numel() for p in model.parameters()), "base_mib": base,
            "peak_mib": rss_mib()}


def steps_part(args: argparse.Namespace, demo: Demo) -> None:
    print(f"\n## Training step: axial against full attention over the clip, batch "
          f"{args.step_batch}\n")
    print(machine_line("fp32", args.threads[0]))
    print(f"width {demo.dim}, {demo.heads} heads, {3 * demo.layers + demo.frame_layers} blocks, "
          f"{demo.image_size}x{demo.image_size} frames; forward + backward of every subpixel's "
          "loss; peak MiB is ru_maxrss of the case's own process\n")
    results = {}
    for frames in args.step_frames:
        for variant in ("axial", "full attention"):
            # --quick runs the cases in this process: a fresh one takes seconds to start
            results[variant, frames] = (step_case(args, variant, demo, frames) if args.quick
                                        else in_fresh_process(args, step_case, variant, demo,
                                                              frames))
    rows = []
    for (variant, frames), r in results.items():
        tokens = frames * demo.image_size**2
        if "error" in r:
            rows.append([variant, frames, f"{tokens:,}", r["error"], "", "", "", ""])
            continue
        axial = results["axial", frames]
        speedup = "" if variant == "axial" or "error" in axial else \
            f"{r['seconds'] / axial['seconds']:.2f}x"
        rows.append([variant, frames, f"{tokens:,}", f"{r['parameters']:,}",
                     f"{r['seconds'] * 1e3:,.0f}", f"{r['flops'] / 1e9:.1f}",
                     f"{r['peak_mib']:.0f}", speedup])
    table(["model", "frames", "tokens", "parameters", "step ms", "GFLOP", "peak MiB",
           "/ axial"], rows)


# ------------------------------------------------------------------------------------------------


def motion_part(args: argparse.Namespace, demo: Demo) -> None:
    """How far the data lets two frames predict the next, with no model: frame t by copying
    frame t-1; by the video model's motion-compensated guess from frames t-1 and t-2
    (`model.video.motion_compensated`, what its frame encoder is handed); and by the best shift
    of frame t-1 within a pixel, chosen per pixel with frame t in view (the best any guess made
    of shifted copies of frame t-1 can do). Mean absolute error, pixel values 0-255."""
    x = clips("test", demo, args.test_clips or 64).float()[:, 0]  # [N, T, H, W]
    before, last, now = (x[:, k:x.shape[1] - 2 + k].flatten(0, 1)[:, None] for k in range(3))
    n, (h, w) = len(now), now.shape[-2:]
    shifted = F.unfold(last, 3, padding=1).view(n, 9, h, w)  # last at p + o
    best = (shifted - now).abs().min(1).values
    rows = [["copy frame t-1", (last - now).abs().mean()],
            ["motion-compensated guess from frames t-1 and t-2",
             (motion_compensated(last, before) - now).abs().mean()],
            ["best shift within a pixel, chosen with frame t in view", best.mean()]]
    print(f"\n## How predictable the motion is ({len(x)} test clips, frames 2-{x.shape[1] - 1})\n")
    print(machine_line("fp32"))
    table(["prediction of frame t", "mean absolute error"], [[r, f"{e:.1f}"] for r, e in rows])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, a few CPU seconds of training: checks that it runs")
    parser.add_argument("--parts", nargs="+", default=["bits", "sampling", "steps", "motion"],
                        choices=["bits", "sampling", "steps", "motion"])
    parser.add_argument("--seconds", type=float,
                        help="CPU seconds of training for each model (default 300; --quick 3)")
    for field in dataclasses.fields(Demo):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=field.type == "float"
                            and float or int, help=f"demo setting (default {field.default})")
    parser.add_argument("--checkpoint", type=Path,
                        help="bits: score and continue this trained video run, training nothing")
    parser.add_argument("--test-clips", type=int, help="test clips scored (default: all 512)")
    parser.add_argument("--continuations", type=int, default=64,
                        help="test clips continued from their first frames")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--gif", type=Path, help="save ground truth above continuation here")
    parser.add_argument("--sample-batch", type=int, help="clips sampled at once (default 64)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="intra-op threads for the timings (training always takes 1)")
    parser.add_argument("--step-frames", type=int, nargs="+",
                        help="clip lengths of the training-step table (default 4 8 16)")
    parser.add_argument("--step-batch", type=int, help="clips per training step (default 4)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds of timing per case (default 5; --quick 0)")
    parser.add_argument("--rounds", type=int, help="rounds of the sampling timings (default 5; "
                        "--quick 1)")
    parser.add_argument("--case-timeout", type=float, default=1200.0)
    args = parser.parse_args()
    quick = args.quick
    args.seconds = args.seconds if args.seconds is not None else (3.0 if quick else 300.0)
    args.test_clips = args.test_clips or (4 if quick else None)
    args.continuations = 2 if quick else args.continuations
    args.sample_batch = args.sample_batch or (2 if quick else 64)
    args.step_frames = args.step_frames or ([2, 3] if quick else [4, 8, 16])
    args.step_batch = args.step_batch or (1 if quick else 4)
    args.rounds = args.rounds or (1 if quick else 5)
    args.min_run_time = args.min_run_time if args.min_run_time is not None else (
        0.0 if quick else 5.0)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Demo)
                 if getattr(args, f.name) is not None}
    args.demo = dataclasses.replace(QUICK if quick else Demo(), **overrides)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # training and scoring: the CPU time of one thread
    model = None
    if "bits" in args.parts:
        model = (trained_part if args.checkpoint else bits_part)(args, args.demo)
    if "sampling" in args.parts:
        sampling_part(args, args.demo, model)
    if "steps" in args.parts:
        steps_part(args, args.demo)
    if "motion" in args.parts:
        motion_part(args, args.demo)


if __name__ == "__main__":
    main()
