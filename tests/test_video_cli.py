"""The commands on a video model: train.py on the built-in moving digits, resume, evaluate.py's
bits/dim per clip and per frame, sample.py's GIF and .npy and its prediction from given frames,
the one-line refusals, and configs/bair64.yaml's step at a reduced size."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line
from PIL import Image
from safetensors.torch import load_file

from axial_transformer.cli import compress as compress_cli
from axial_transformer.cli import evaluate as evaluate_cli
from axial_transformer.cli import sample as sample_cli
from axial_transformer.data.moving_digits import moving_digits

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
FRAMES, SIZE = 4, (12, 12)  # 8x8 digits with room to move on a 12x12 canvas
TINY = [f"model.frames={FRAMES}", f"model.image_size=[{SIZE[0]},{SIZE[1]}]", "model.dim=16",
        "model.heads=2", "model.encoder_layers=2", "model.outer_layers=2",
        "model.inner_layers=1", "model.frame_layers=3", "train.batch_size=4",
        "train.warmup_steps=1", "train.mixed_precision=no", "data.workers=0",
        "eval.batch_size=4", "eval.max_images=4", "log.every=1", "checkpoint.every=1",
        "resume=auto"]


def train(run_dir: Path, *overrides: str, config: str = "video-demo") -> list[dict]:
    """Run train.py in a subprocess (Accelerate keeps process-wide state); its records."""
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config",
                           str(ROOT / "configs" / f"{config}.yaml"), f"run_dir={run_dir}",
                           *overrides], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Two steps of a tiny video model on moving digits, as the overrides a user would type."""
    run_dir = tmp_path_factory.mktemp("video") / "run"
    train(run_dir, *TINY, "train.steps=2", "log.sample_every=2", "log.num_samples=2",
          "eval.heatmap=true", "eval.baselines=true", "data.spec=moving-digits",
          "model.channels=1")
    return run_dir


def test_training_reports_bits_per_clip_and_per_frame(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["final"] and final["eval/images"] == 4
    frames = final["eval/bpd_frame"]
    assert len(frames) == FRAMES and final["eval/bpd"] == pytest.approx(np.mean(frames),
                                                                        rel=1e-12)
    assert final["eval/bpd_gray"] == pytest.approx(final["eval/bpd"], rel=1e-12)
    assert {"baseline/png_bpd", "baseline/webp_bpd", "baseline/jxl_bpd"} <= final.keys()
    # The samples: a GIF of a frame per frame beside the clips' pixels.
    gif = Image.open(run / "samples" / "step_0000002.gif")
    assert gif.n_frames == FRAMES
    assert np.load(run / "samples" / "step_0000002.npy").shape == (2, FRAMES, *SIZE, 1)
    assert (run / "heatmap.png").is_file()
    assert json.loads((run / "export" / "config.json").read_text())["frames"] == FRAMES


def test_a_video_run_resumes_bit_for_bit(run, tmp_path):
    """Two steps, then a resume for the third, against three steps in one go: the same losses
    and the same weights (the third step moved them: the two-step export differs)."""
    rest = ["train.steps=3", "eval.heatmap=false", "eval.baselines=false",
            "data.spec=moving-digits", "model.channels=1"]
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    records = train(resumed, *TINY, *rest)
    starts = [r for r in records if "start" in r]
    assert [(r["step"], r["start"]) for r in starts] == [(0, "fresh"), (2, "resume")]
    assert records[-1]["final"] and records[-1]["step"] == 3
    straight = train(tmp_path / "straight", *TINY, *rest)
    losses = lambda records: [(r["step"], r["train/loss_bpd"], r["train/grad_norm"])
                              for r in records if "train/loss_bpd" in r]
    assert losses(records) == losses(straight)
    weights = {name: load_file(path / "export" / "model.safetensors")
               for name, path in (("two", run), ("resumed", resumed),
                                  ("straight", tmp_path / "straight"))}
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert same(weights["resumed"], weights["straight"])
    assert not same(weights["two"], weights["straight"])


def test_evaluate_prints_bits_per_clip_and_per_frame(run, tmp_path, capsys):
    assert evaluate_cli.main(["--checkpoint", str(run), "--max-images", "4", "--json",
                              "--heatmap", str(tmp_path / "h.png")]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["bpd"] == pytest.approx(final["eval/bpd"], rel=1e-9)
    assert metrics["bpd_frame"] == pytest.approx(final["eval/bpd_frame"], rel=1e-9)
    assert metrics["bpd"] == pytest.approx(sum(metrics["bpd_frame"]) / FRAMES, rel=1e-12)
    assert (tmp_path / "h.png").stat().st_size > 0
    assert evaluate_cli.main(["--checkpoint", str(run / "export"), "--max-images", "2"]) == 0
    out = capsys.readouterr().out
    assert f"over 2 clips of {FRAMES} frames of moving-digits" in out and "per frame: " in out


def sample(capsys, *args) -> tuple[int, str, str]:
    code = sample_cli.main(["--device", "cpu", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sample_writes_a_gif_and_the_clips(run, tmp_path, capsys):
    code, out, _ = sample(capsys, "--checkpoint", run, "--num-samples", 3, "--per-image")
    assert code == 0 and f"3 clips of 1x{FRAMES}x{SIZE[0]}x{SIZE[1]}" in out
    gif = run / "samples" / "sample_n3_seed0.gif"
    assert Image.open(gif).n_frames == FRAMES
    clips = np.load(gif.with_suffix(".npy"))
    assert clips.shape == (3, FRAMES, *SIZE, 1) and clips.dtype == np.uint8
    assert sorted(p.name for p in gif.with_suffix("").iterdir()) == [
        "00000.gif", "00001.gif", "00002.gif"]


def test_prediction_keeps_the_given_frames_bit_for_bit(run, tmp_path, capsys):
    out = tmp_path / "p.gif"
    code, _, _ = sample(capsys, "--checkpoint", run, "--complete", "moving-digits:0",
                        "--frames-given", 2, "--num-samples", 2, "--out", out)
    assert code == 0
    clip = moving_digits("test", frames=FRAMES, image_size=SIZE)[0]
    predicted = np.load(out.with_suffix(".npy"))
    assert predicted.shape == (2, FRAMES, *SIZE, 1)
    assert (predicted[:, :2] == clip[:2]).all()
    assert Image.open(out).n_frames == FRAMES
    # The same from a prepared clip array; the names carry the clip and the frames given.
    np.save(tmp_path / "clips.npy", moving_digits("test", count=3, frames=6, image_size=SIZE))
    code, out, _ = sample(capsys, "--checkpoint", run, "--complete", tmp_path / "clips.npy:2",
                          "--frames-given", 1, "--num-samples", 1)
    assert code == 0 and "completion_clips_2_f1_n1_seed0.gif" in out


@pytest.mark.parametrize("args, message", [
    (["--frames-given", "2"], "error: --frames-given K needs --complete CLIP"),
    (["--complete", "moving-digits:0", "--rows-given", "2"],
     "error: --rows-given is for image models; a video model predicts"),
    (["--complete", "moving-digits:0", "--frames-given", str(FRAMES)],
     f"error: --frames-given must be 1 to {FRAMES - 1}"),
    (["--complete", "moving-digits:0", "--frames-given", "0"],
     f"error: --frames-given must be 1 to {FRAMES - 1}"),
    (["--complete", "moving-digits:9999", "--frames-given", "1"],
     "error: moving-digits holds 512 clips; index 9999 is out of range"),
    (["--complete", "photo.png", "--frames-given", "1"],
     "error: --complete photo.png: a video model takes a clip"),
    (["--out", "x.png"], "error: --out x.png: a video model writes a .gif"),
    (["--class", "3"], "error: --class needs a class-conditional model"),
])
def test_video_misuse_is_one_line(run, capsys, args, message):
    code, _, err = sample(capsys, "--checkpoint", run, *args)
    assert code == 2 and error_line(err).startswith(message)


def test_compress_refuses_a_video_model(run, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((1, *SIZE, 1), np.uint8))
    code = compress_cli.main(["--checkpoint", str(run), str(tmp_path / "x.npy"), "-o",
                              str(tmp_path / "x.axc")])
    assert code == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: {run}: the codec compresses images; this is a video model (clips of "
        f"{FRAMES} frames)")


def test_bair64_config_trains_a_step_at_a_reduced_size(tmp_path):
    """configs/bair64.yaml as shipped but smaller: the tiny widths, 4 frames of 8x8 RGB."""
    data = tmp_path / "bair"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        np.save(data / f"{split}.npy", rng.integers(0, 256, (n, 4, 8, 8, 3), dtype=np.uint8))
    records = train(tmp_path / "run", f"data.spec={data}", "model.preset=tiny",
                    "model.frames=4", "model.image_size=[8,8]", "model.frame_layers=3",
                    "train.steps=1", "train.batch_size=2", "data.workers=0", "log.sample_every=0",
                    "eval.batch_size=2", "eval.heatmap=false", config="bair64")
    final = records[-1]
    assert final["final"] and final["eval/images"] == 2 and len(final["eval/bpd_frame"]) == 4
