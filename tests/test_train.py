"""Training: LR schedule, EMA warm-up, one optimizer step, exact evaluation, codec baselines, and
end-to-end runs in subprocesses, since Accelerate keeps process-wide state (exact resume and
fault handling: test_faults.py)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_
from safetensors.torch import load_file

from axial_transformer import AxialTransformer, AxialTransformerConfig
from axial_transformer.data.splits import ImageArrayDataset
from axial_transformer.evaluation import (
    bit_sums,
    heatmap_image,
    lossless_bits_per_dim,
    shard_indices,
    summarize,
)
from axial_transformer.training.config import OptimConfig
from axial_transformer.training.distributed import weights_fingerprint
from axial_transformer.training.ema import EMA, ema_decay_at
from axial_transformer.training.step import learning_rate

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def tiny_model(seed: int = 0) -> AxialTransformer:
    cfg = AxialTransformerConfig(image_size=(4, 5), channels=3, dim=16, heads=2,
                                 encoder_layers=2, outer_layers=2, inner_layers=1)
    torch.manual_seed(seed)
    return randomize_(AxialTransformer(cfg), seed=seed)


# ---------------------------------------------------------------------------------------------
# Pure functions.


def test_learning_rate_warmup_then_constant_or_cosine():
    cfg = OptimConfig(steps=100, lr=1e-3, warmup_steps=10, schedule="constant")
    lrs = [learning_rate(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10], strict=False))  # linear ramp
    assert all(lr == 1e-3 for lr in lrs[10:])
    cos = OptimConfig(steps=100, lr=1e-3, warmup_steps=10, schedule="cosine", min_lr=1e-5)
    lrs = [learning_rate(s, cos) for s in range(100)]
    assert lrs[10] == pytest.approx(1e-3) and lrs[99] == pytest.approx(1e-5)
    assert lrs[55] == pytest.approx((1e-3 + 1e-5) / 2, rel=0.05)
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert learning_rate(0, OptimConfig(lr=3e-4, warmup_steps=0)) == 3e-4


def test_ema_warms_up():
    assert ema_decay_at(0, 0.99995) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.99995) == pytest.approx(91 / 100)
    assert ema_decay_at(10**7, 0.99995) == 0.99995

    live = torch.nn.Linear(3, 3)
    ema = EMA(live, decay=0.99995)
    start = ema.model.weight.clone()
    with torch.no_grad():
        live.weight.add_(1.0)
    ema.update(live, step=0)  # decay 0.1: 90% of the way to the live weights at once
    assert torch.allclose(ema.model.weight, 0.1 * start + 0.9 * live.weight)
    for step in range(1, 200):
        ema.update(live, step)
    assert torch.allclose(ema.model.weight, live.weight, atol=1e-5)
    # Negative control: the fixed paper decay would still be at the init after 200 steps.
    fixed = start.clone()
    for _ in range(200):
        fixed.lerp_(live.weight, 1 - 0.99995)
    assert (fixed - live.weight).abs().max() > 0.9


def test_weights_fingerprint_sees_a_tiny_change():
    model = tiny_model()
    before = weights_fingerprint(model)
    with torch.no_grad():
        model.to_logits.bias[3] += 1e-6
    assert not torch.equal(before, weights_fingerprint(model))


# ---------------------------------------------------------------------------------------------
# Evaluation.


def test_evaluation_counts_each_image_once_across_processes():
    """Sharded sums over 3 simulated processes equal one process's, with no remainder dropped
    (10 images, 3 processes, batch 2: neither divides)."""
    model = tiny_model()
    images = torch.randint(0, 256, (10, 3, 4, 5), dtype=torch.uint8)
    dataset = ImageArrayDataset(images.permute(0, 2, 3, 1).numpy())
    whole = bit_sums(model, dataset, range(10), batch_size=4, per_pixel=True)
    shares = [bit_sums(model, dataset, shard_indices(10, r, 3), batch_size=2, per_pixel=True)
              for r in range(3)]
    total = shares[0] + shares[1] + shares[2]
    assert total.images == whole.images == 10
    assert torch.allclose(total.channel_bits, whole.channel_bits, rtol=1e-10)
    assert torch.allclose(total.pixel_bits, whole.pixel_bits, rtol=1e-10)
    metrics = summarize(total, (4, 5))
    with torch.no_grad():
        direct = model.bits_per_dim(images).double().mean().item()
    assert metrics["bpd"] == pytest.approx(direct, rel=1e-6)
    assert np.mean(metrics["bpd_channel"]) == pytest.approx(metrics["bpd"])
    # Negative control: a drop-last split (each process takes 10 // 3 images) loses one image,
    # and the sums notice.
    dropped = sum((bit_sums(model, dataset, range(3 * r, 3 * r + 3), 2) for r in range(1, 3)),
                  bit_sums(model, dataset, range(0, 3), 2))
    assert dropped.images == 9
    assert not torch.allclose(dropped.channel_bits, whole.channel_bits)


def heatmap_panels(channels: int) -> int:
    """Coloured panels crossed by a row through the middle of the heatmap's tiles."""
    image = np.asarray(heatmap_image(torch.rand(channels, 4, 5) * 8))
    row = image[image.shape[0] // 2]
    coloured = (row != 255).any(axis=-1).astype(int)  # the background is white
    return int((np.diff(coloured) == 1).sum() + coloured[0])


def test_heatmap_has_a_panel_per_channel_plus_mean():
    assert heatmap_panels(3) == 4
    assert heatmap_panels(1) == 2


def test_lossless_baselines_count_file_bytes():
    flat = np.full((4, 16, 16, 3), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    for codec in ("png", "webp"):
        assert lossless_bits_per_dim(flat, codec) < 1.0  # a flat image costs almost nothing
        assert lossless_bits_per_dim(noise, codec) > 7.9  # noise cannot be compressed
    gray = noise[..., :1]
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.fromarray(gray[0, ..., 0]).save(buffer, format="PNG", optimize=True, compress_level=9)
    assert lossless_bits_per_dim(gray[:1], "png") == 8 * buffer.tell() / (16 * 16)
    with pytest.raises(ValueError, match="uint8 images"):
        lossless_bits_per_dim(noise.astype(np.int32), "png")


# ---------------------------------------------------------------------------------------------
# One optimizer step.


def test_accumulating_micro_batches_equals_one_batch(tmp_path):
    """objective=all, dropout 0: one optimizer step over 4 micro-batches of 2 images has the
    loss, gradient norm and resulting weights of one step over the 8 images at once."""
    from accelerate.state import AcceleratorState, GradientState

    from axial_transformer.training.config import load_config
    from axial_transformer.training.distributed import build_accelerator
    from axial_transformer.training.step import Objective, optimizer_step

    images = torch.randint(0, 256, (8, 3, 4, 5), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread

    def one_step(micro_batches: list) -> tuple:
        cfg = load_config(None, [f"train.grad_accumulation={len(micro_batches)}",
                                 "train.objective=all", f"run_dir={tmp_path}"])
        accelerator = build_accelerator(cfg)
        model = tiny_model()
        # eps 1e-4, not 1e-8: the key biases get gradients of pure rounding noise (softmax
        # ignores them), which Adam's first step at eps 1e-8 would scale up to +-lr.
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
        objective, optimizer = accelerator.prepare(Objective(model, "all"), optimizer)
        try:
            result = optimizer_step(accelerator, objective, optimizer, iter(micro_batches), 0,
                                    1e-3, cfg.train, lambda: False)
        finally:  # Accelerate's state is process-wide: leave none behind for other tests
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
        assert not result.skipped
        return float(result.loss), float(result.grad_norm), model.state_dict()

    try:
        loss, norm, weights = one_step([images])
        loss4, norm4, weights4 = one_step(list(images.split(2)))
        # Negative control: the same four micro-batches but the last one replaced by the first.
        _, norm_wrong, wrong = one_step([*images.split(2)[:3], images[:2]])
    finally:
        torch.set_num_threads(threads)
    assert loss4 == pytest.approx(loss, rel=1e-6) and norm4 == pytest.approx(norm, rel=1e-5)
    assert all(torch.allclose(weights[k], weights4[k], rtol=0, atol=1e-7) for k in weights)
    assert norm_wrong != pytest.approx(norm, rel=1e-3)
    assert not all(torch.allclose(weights[k], wrong[k], rtol=0, atol=1e-7) for k in weights)


# ---------------------------------------------------------------------------------------------
# End to end, in subprocesses.


def run_args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "demo.yaml"),
            f"data.spec={data_dir}", f"run_dir={run_dir}", "model.image_size=[6, 7]",
            "model.dim=16", "model.heads=2", "model.inner_layers=1", "model.dropout=0.1",
            "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=2",
            "train.schedule=constant", "train.mixed_precision=no", "train.ema_decay=0.9",
            "eval.batch_size=4", "eval.heatmap=false", "eval.baselines=false",
            "log.every=1", "log.sample_every=0", "checkpoint.every=2", "resume=", *extra]


def train(data_dir: Path, run_dir: Path, *extra: str, launcher: tuple = ()) -> dict:
    """Run train.py; return the last record of each kind in metrics.jsonl."""
    command = [*(launcher or (sys.executable,)), str(ROOT / "train.py"),
               *run_args(data_dir, run_dir, *extra)]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = {}
    for record in records:
        last.update(record)
    return last


def export_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "export" / "model.safetensors")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_count_each_test_image_once(data_dir, tmp_path, capsys):
    """torchrun with 2 CPU processes (gloo) and gradient accumulation: 13 test images over
    2 processes x batch 4 are each scored once, and the replicas end with identical weights.
    evaluate.py on one process, on the run, its export and its last checkpoint, agrees."""
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2")
    run = tmp_path / "ddp"
    final = train(data_dir, run, "train.steps=3", "train.objective=all",
                  "train.grad_accumulation=2", launcher=launcher)
    assert final["processes"] == 2 and final["eval/images"] == 13
    assert final["replicas_in_sync"] is True
    assert final["train/loss_bpd"] < 8.0
    for target in (run, run / "export", run / "checkpoints" / "step_0000003"):
        done = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--checkpoint",
                               str(target), "--json", "--batch-size", "5", "--heatmap",
                               str(tmp_path / "h.png")],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "evaluating" in done.stderr  # the progress bar
        single = json.loads(done.stdout.strip().splitlines()[-1])
        assert single["images"] == 13
        assert final["eval/bpd"] == pytest.approx(single["bpd"], rel=1e-6)
    assert (tmp_path / "h.png").stat().st_size > 0
    assert AxialTransformer.from_pretrained(run / "export").config.image_size == (6, 7)

    sys.path.insert(0, str(ROOT))
    import evaluate as evaluate_cli

    assert evaluate_cli.main(["--checkpoint", str(run), "--split", "bogus"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --split must be one of train, test, got 'bogus'")


def test_demo_smoke_prints_codec_comparison_and_samples(tmp_path):
    """The demo config end to end on the built-in data, a few steps: bits/dim beside PNG and
    WebP, a heatmap and a sample grid."""
    run = tmp_path / "demo"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "train.steps=2",
                           "eval.max_images=6", "log.sample_every=2", "log.num_samples=2",
                           "model.image_size=[8, 8]", f"run_dir={run}"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WebP lossless" in done.stdout and "PNG" in done.stdout
    assert re.match(r"precision: (fp32|bf16) \(auto: .+\); 1 CPU thread", done.stdout)
    assert (run / "heatmap.png").is_file()
    assert [p.name for p in (run / "samples").iterdir()] == ["step_0000002.png"]
    # The export's config.json holds what defines the model's function, no run-time choice.
    exported = json.loads((run / "export" / "config.json").read_text())
    assert (run / "config.yaml").is_file() and exported["dim"] == 64
    assert not {"gradient_checkpointing", "attention"} & exported.keys()
    # It says where everything went, and shows progress while it evaluates.
    for kind, path in [("metrics", "metrics.jsonl"), ("export", "export"),
                       ("heatmap", "heatmap.png"), ("checkpoint", "checkpoints/step_0000002"),
                       ("samples", "samples/step_0000002.png")]:
        assert f"  {kind:<10} {run / path}" in done.stdout, kind
    for bar in ("evaluating", "png baseline", "webp baseline"):
        assert f"{bar}:" in done.stderr, bar


def test_wandb_that_cannot_start_fails_at_startup(data_dir, tmp_path):
    env = {**ENV, "WANDB_MODE": "no-such-mode"}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"),
                           *run_args(data_dir, tmp_path / "run", "log.wandb=true")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "wandb could not start" in done.stderr
    assert not (tmp_path / "run").exists()  # a failed start-up leaves no run_dir behind


@pytest.mark.slow
def test_compiled_training_matches_eager(data_dir, tmp_path):
    eager = train(data_dir, tmp_path / "eager", "train.steps=2", "model.dropout=0.0")
    compiled = train(data_dir, tmp_path / "compiled", "train.steps=2", "model.dropout=0.0",
                     "train.compile=true")
    assert math.isclose(compiled["train/loss_bpd"], eager["train/loss_bpd"], rel_tol=1e-4)


def test_a_label_dropout_model_is_conditional_and_unconditional(data_dir, tmp_path):
    """model.num_classes trains on the labels beside each split; with label dropout the final
    evaluation scores the model given each image's class and given none, and the export carries
    the class names. A label outside the classes stops the run at start-up, naming the file."""
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    for split in ("train", "test"):
        images = np.load(data_dir / f"{split}.npy")
        np.save(labelled / f"{split}.npy", images)
        np.save(labelled / f"{split}_labels.npy", np.arange(len(images)) % 2)
        (labelled / f"{split}_classes.json").write_text(json.dumps(["even", "odd"]))
    classes = ("model.num_classes=2", "train.label_dropout=0.5", "train.steps=4")
    final = train(labelled, tmp_path / "run", *classes)
    assert final["eval/images"] == 13
    assert final["eval/bpd_no_class"] != final["eval/bpd"]  # two modes of one model
    exported = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert exported["num_classes"] == 2 and exported["class_names"] == ["even", "odd"]

    np.save(labelled / "test_labels.npy", np.full(13, 5))
    done = subprocess.run([sys.executable, str(ROOT / "train.py"),
                           *run_args(labelled, tmp_path / "bad", *classes)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()
    assert len(error) == 1 and "test_labels.npy" in error[0], error
