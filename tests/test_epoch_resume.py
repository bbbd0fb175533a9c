"""A run killed after its first epoch resumes bit for bit.

test_faults.py kills its runs inside the first epoch. A resume past it also needs the loader
that skips the epoch's used batches to keep that epoch's order: accelerate before 1.15 rebuilt it
at epoch 0 (its `skip_first_batches` dropped the loader's `iteration`), so a resumed run trained
on the wrong order from the resume on. pyproject.toml's accelerate floor is the first release that
keeps it; docs/testing.md gives the run that shows this test failing on 1.14.0.
"""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import ENV, ROOT, run_args

# 40 training images (conftest's data_dir) in batches of 8: 5 batches per epoch. 14 steps, a
# checkpoint every 2; killed right after step 9, the run resumes from step 8, 3 batches into
# its second epoch, and goes on through the third.
RUN = ("train.steps=14", "train.batch_size=8", "train.grad_accumulation=1", "checkpoint.every=2",
       "checkpoint.keep=1", "eval.max_images=4")

# train.py with accelerate's batch skipping as releases before 1.15 had it: the loader it
# rebuilds starts at epoch 0 whatever epoch the loader it was given had reached.
EPOCH_DROPPED = """
import sys
sys.argv[0] = "train.py"
import accelerate.accelerator as A
keep_epoch = A.skip_first_batches
def skip_first_batches(loader, num_batches=0):
    skipping = keep_epoch(loader, num_batches=num_batches)
    skipping.iteration = 0
    return skipping
A.skip_first_batches = skip_first_batches
import train
sys.exit(train.main(sys.argv[1:]))
"""


def launch(run_dir: Path, data_dir: Path, *extra: str, patch: str | None = None,
           kill_after: int | None = None):
    """train.py, the script `patch`, or tests/train_with_faults.py killing it after a step."""
    entry, env = ["-c", patch] if patch else [str(ROOT / "train.py")], ENV
    if kill_after:
        entry = [str(ROOT / "tests" / "train_with_faults.py")]
        env = {**ENV, "TRAIN_FAULTS": json.dumps({"kill_after": kill_after})}
    return subprocess.run([sys.executable, *entry, *run_args(data_dir, run_dir, *RUN, *extra)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def steps(run_dir: Path) -> list[tuple]:
    """(step, loss, grad norm) of every training record, in the order written."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss_bpd"], r["train/grad_norm"]) for r in records
            if "train/loss_bpd" in r]


def exported(run_dir: Path) -> dict:
    return load_file(run_dir / "export" / "model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted run, and the same run killed after step 9."""
    root = tmp_path_factory.mktemp("epochs")
    straight, killed = root / "straight", root / "killed"
    done = launch(straight, data_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    done = launch(killed, data_dir, kill_after=9)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert [s for s, *_ in steps(killed)] == list(range(1, 10))
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["step_0000008"]
    return straight, killed


def test_a_resume_in_the_second_epoch_is_bit_identical(runs, data_dir, tmp_path):
    straight, killed = runs
    run = Path(shutil.copytree(killed, tmp_path / "run"))
    done = launch(run, data_dir, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step_0000008" in done.stdout
    assert [s for s, *_ in steps(run)] == list(range(1, 15))
    assert steps(run) == steps(straight)
    assert same(exported(run), exported(straight))


def test_a_resume_that_restarts_the_epoch_order_is_caught(runs, data_dir, tmp_path):
    """Negative control: the same resume through accelerate's old batch skipping matches the
    uninterrupted run up to the checkpoint and not after it."""
    straight, killed = runs
    run = Path(shutil.copytree(killed, tmp_path / "run"))
    done = launch(run, data_dir, "resume=auto", patch=EPOCH_DROPPED)
    assert done.returncode == 0, done.stderr[-3000:]
    assert steps(run)[:8] == steps(straight)[:8]
    assert steps(run)[8:] != steps(straight)[8:]
    assert not same(exported(run), exported(straight))
