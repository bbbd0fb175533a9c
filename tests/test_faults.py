"""Long runs that survive faults: SIGKILL and exact resume, SIGTERM on one process of two,
corrupt checkpoints, non-finite steps, and bad input caught at start-up with one clear line.
The runs are tiny models in subprocesses (Accelerate keeps process-wide state)."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import ENV, ROOT, run_args

from axial_transformer.checkpoint import (
    check_disk_space,
    checkpoint_bytes,
    checkpoint_problem,
    latest_checkpoint,
    prune_checkpoints,
    seal,
)
from axial_transformer.training import nonfinite_parameter

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
# Six steps, a checkpoint every two, the last two kept.
RUN = ("train.steps=6", "checkpoint.every=2", "checkpoint.keep=2", "eval.max_images=4")


def launch(data_dir: Path, run_dir: Path, *extra: str, launcher: tuple = (),
           env: dict | None = None) -> subprocess.CompletedProcess:
    command = [*(launcher or (sys.executable,)), str(ROOT / "train.py"),
               *run_args(data_dir, run_dir, *RUN, *extra)]
    return subprocess.run(command, cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                          timeout=240)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple]:
    """(step, loss, grad norm) of every training record."""
    return [(r["step"], r["train/loss_bpd"], r["train/grad_norm"]) for r in records(run_dir)
            if "train/loss_bpd" in r]


def final_weights(run_dir: Path) -> tuple[dict, dict]:
    """The live model and the EMA of the newest checkpoint."""
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return load_file(newest / "model.safetensors"), load_file(newest / "ema.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line_error(done: subprocess.CompletedProcess, message: str) -> None:
    """Exit code 2 and one `error:` line (after the progress bar, if training had started)."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors
    assert done.stderr.strip().splitlines()[-1] == errors[0]


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> Path:
    """Six uninterrupted steps: the reference every interrupted run must match bit for bit."""
    run = tmp_path_factory.mktemp("straight") / "run"
    done = launch(data_dir, run)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def killed(data_dir, tmp_path_factory) -> Path:
    """The same run killed with SIGKILL right after step 5 (last checkpoint: step 4)."""
    run = tmp_path_factory.mktemp("killed") / "run"
    done = launch(data_dir, run, "debug.kill_at_step=5")
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert [r["step"] for r in records(run) if "train/loss_bpd" in r] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_0000002", "step_0000004"]
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------
# Exact resume after SIGKILL.


def test_sigkill_then_resume_is_bit_identical(data_dir, straight, killed, tmp_path):
    run = copy_run(killed, tmp_path)
    done = launch(data_dir, run, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout + done.stderr
    assert losses(run) == losses(straight)  # every step: data order, channels, dropout, Adam
    model, ema = final_weights(run)
    straight_model, straight_ema = final_weights(straight)
    assert same(model, straight_model) and same(ema, straight_ema)

    # Negative control: the same resume with another seed (data order, channels, dropout)
    # matches up to the checkpoint and not after it.
    other = Path(shutil.copytree(killed, tmp_path / "other"))
    done = launch(data_dir, other, "resume=auto", "train.seed=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(other)[:4] == losses(straight)[:4]
    assert losses(other)[4:] != losses(straight)[4:]
    assert not same(final_weights(other)[0], straight_model)

    # Negative control: a resume that restarts the data order from the top of the run (the
    # position in the epoch not restored) is caught too.
    forgetful = Path(shutil.copytree(killed, tmp_path / "forgetful"))
    patch = ("import sys; sys.argv[0] = 'train.py'; import axial_transformer.training as T; "
             "restart = T.training_batches; "
             "T.training_batches = lambda loader, acc, position: restart(loader, acc, 0); "
             "import train; sys.exit(train.main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", patch,
                           *run_args(data_dir, forgetful, *RUN, "resume=auto")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(forgetful)[:4] == losses(straight)[:4]
    assert losses(forgetful)[4:] != losses(straight)[4:]


def test_corrupt_latest_checkpoint_is_named_and_the_previous_one_used(
        data_dir, straight, killed, tmp_path):
    run = copy_run(killed, tmp_path)
    newest = run / "checkpoints" / "step_0000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    done = launch(data_dir, run, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    warning = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "step_0000004" in warning[0] and "model.safetensors" in warning[0]
    assert "resuming from" in done.stdout and "step_0000002" in done.stdout
    # Resumed from step 2, still exact.
    assert losses(run) == losses(straight)
    assert same(final_weights(run)[0], final_weights(straight)[0])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_0000004", "step_0000006"]


def make_checkpoint(root: Path, step: int, sealed: bool = True) -> Path:
    from safetensors.torch import save_file

    directory = root / "checkpoints" / f"step_{step:07d}"
    directory.mkdir(parents=True)
    save_file({"w": torch.ones(8)}, directory / "model.safetensors")
    (directory / "trainer_state.json").write_text(json.dumps({"step": step}))
    if sealed:
        seal(directory)
    return directory


def test_marker_pruning_and_fallback(tmp_path, capsys):
    one, two = make_checkpoint(tmp_path, 1), make_checkpoint(tmp_path, 2)
    unsealed = make_checkpoint(tmp_path, 3, sealed=False)
    truncated = make_checkpoint(tmp_path, 4)
    (truncated / "model.safetensors").write_bytes(b"\x10")
    assert checkpoint_problem(two) is None
    assert "complete.json" in checkpoint_problem(unsealed)
    assert "truncated" in checkpoint_problem(truncated)
    assert latest_checkpoint(tmp_path) == two
    err = capsys.readouterr().err
    assert "step_0000004" in err and "step_0000003" in err
    # keep=1 deletes the older complete one, never the newest complete one.
    assert prune_checkpoints(tmp_path, keep=1) == [one]
    assert two.is_dir() and unsealed.is_dir() and truncated.is_dir()
    # A file that rots after sealing (same size, garbage header) is caught too.
    (two / "model.safetensors").write_bytes(b"x" * (two / "model.safetensors").stat().st_size)
    assert "safetensors" in checkpoint_problem(two)
    # With no complete checkpoint left, nothing is pruned and nothing is resumed.
    assert prune_checkpoints(tmp_path, keep=1) == []
    assert two.is_dir() and latest_checkpoint(tmp_path, warn=False) is None


# ---------------------------------------------------------------------------------------------
# Preemption.


def test_sigterm_checkpoints_at_the_next_step_and_resume_is_exact(data_dir, straight, tmp_path):
    run = tmp_path / "run"
    done = launch(data_dir, run, "debug.sigterm_at_step=3", "checkpoint.every=0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopped by SIGTERM at step 4" in done.stderr
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step_0000004"]
    assert checkpoint_problem(checkpoints[0]) is None
    assert {"step": 4, "preempted": "SIGTERM"} in records(run)
    assert not any("eval/bpd" in r for r in records(run))  # no final evaluation when preempted
    done = launch(data_dir, run, "resume=auto", "checkpoint.every=0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(run) == losses(straight)
    assert same(final_weights(run)[1], final_weights(straight)[1])


def test_two_processes_stop_together_and_skip_the_same_steps(data_dir, tmp_path):
    """torchrun, 2 CPU processes: SIGTERM reaches rank 1 only, and only rank 1's loss is NaN at
    step 1. The all-reduced flags make both skip step 1 and both checkpoint at step 3 and exit
    (without them rank 0 would train on and wait forever for rank 1)."""
    run = tmp_path / "ddp"
    done = launch(data_dir, run, "train.steps=50", "debug.rank=1", "debug.sigterm_at_step=2",
                  "debug.nan_at_steps=[1]", launcher=TORCHRUN)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert checkpoints[-1].name == "step_0000003" and checkpoint_problem(checkpoints[-1]) is None
    log = records(run)
    assert {"step": 3, "preempted": "a signal to another process"} in log  # rank 0's view
    assert [r["train/skipped_steps"] for r in log if "train/loss_bpd" in r] == [1, 1, 1]
    model = load_file(checkpoints[-1] / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in model.values())

    done = launch(data_dir, run, "train.steps=4", "resume=auto", launcher=TORCHRUN)
    assert done.returncode == 0, done.stderr[-3000:]
    last = records(run)
    assert last[-1]["replicas_in_sync"] is True
    assert [r["train/skipped_steps"] for r in last if "train/loss_bpd" in r][-1] == 1


# ---------------------------------------------------------------------------------------------
# Non-finite loss.


def test_nan_steps_are_skipped_and_counted_and_too_many_stop_the_run(data_dir, tmp_path):
    run = tmp_path / "run"
    done = launch(data_dir, run, "debug.nan_at_steps=[2, 3]", "train.max_skipped_steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    log = {r["step"]: r for r in records(run) if "train/loss_bpd" in r}
    assert [log[s]["train/skipped_steps"] for s in range(1, 7)] == [0, 1, 2, 2, 2, 2]
    assert log[2]["train/loss_bpd"] is None and log[2]["train/grad_norm"] is None
    assert all(np.isfinite(log[s]["train/loss_bpd"]) for s in (1, 4, 5, 6))
    model, ema = final_weights(run)
    assert all(torch.isfinite(v).all() for v in [*model.values(), *ema.values()])

    # Three in a row stop the run with one clear line; every checkpoint left is finite.
    stopped = tmp_path / "stopped"
    done = launch(data_dir, stopped, "debug.nan_at_steps=[2, 3, 4]", "train.max_skipped_steps=3")
    one_line_error(done, "3 steps in a row (up to step 4) had a non-finite loss")
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step_0000002"]
    model = load_file(stopped / "checkpoints" / "step_0000002" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in model.values())


def test_nonfinite_weights_are_found_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert nonfinite_parameter(model) is None
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    assert nonfinite_parameter(model) == "1.bias"


# ---------------------------------------------------------------------------------------------
# Bad input: one line, naming the file or key and what was expected.


def run_main(capsys, *args: str) -> tuple[int, str]:
    sys.path.insert(0, str(ROOT))
    import train as train_cli

    code = train_cli.main(list(args))
    return code, capsys.readouterr().err


def test_start_up_errors_are_one_line(data_dir, tmp_path, capsys):
    """Checked before any process group or model exists, so in-process here."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (["data.spec=/no/such/data"], "/no/such/data"),
        (["train.lrr=1"], "did you mean train.lr?"),
        ([f"run_dir={blocker / 'run'}"], "cannot be written"),
        (["debug.free_bytes=1000"], "GiB free, but one checkpoint"),
    ]
    for extra, message in cases:
        code, err = run_main(capsys, *run_args(data_dir, tmp_path / "r", *extra))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (extra, err)
    assert not (tmp_path / "r" / "checkpoints").exists()
    # --debug shows the traceback instead.
    with pytest.raises(FileNotFoundError, match="/no/such/data"):
        run_main(capsys, "--debug", *run_args(data_dir, tmp_path / "r", "data.spec=/no/such/data"))


def test_prepare_errors_are_one_line(tmp_path, capsys):
    """Corrupt image in a tar (fatal with --on-error raise), an image of the wrong size in a
    folder, an npz without its key and one holding pickled objects: one line each, naming the
    file and what was expected, and no output left behind."""
    import io
    import tarfile

    from PIL import Image

    from axial_transformer.data import main as prepare_cli

    def png(size: tuple[int, int]) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for name, data in [("a.png", png((4, 4))), ("b.png", png((4, 4))[:30])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(png((4, 4)))
    (folder / "b.png").write_bytes(png((5, 4)))
    np.savez(tmp_path / "val_data.npz", images=np.zeros((2, 48), np.uint8))
    (tmp_path / "objects").mkdir()
    np.savez(tmp_path / "objects" / "val_data.npz", data=np.array([{"x": 1}], dtype=object))
    cases = [
        ([str(tmp_path / "bad.tar"), "--on-error", "raise"], "b.png"),
        ([str(folder)], "b.png"),
        ([str(tmp_path / "val_data.npz")], "'data'"),
        ([str(tmp_path / "objects" / "val_data.npz")], "never loaded"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            prepare_cli(["prepare", args[0], str(tmp_path / "out.npy"), *args[1:]])
        lines = capsys.readouterr().err.strip().splitlines()  # a progress bar, then the error
        errors = [line for line in lines if "error" in line]
        assert exit_info.value.code == 2 and errors == [lines[-1]], lines
        assert errors[0].startswith("error: ") and message in errors[0], errors
        assert not (tmp_path / "out.npy").exists()


def test_disk_estimate_counts_model_adam_ema_and_export():
    assert checkpoint_bytes(10**9) >= 10**9 * 4 * 4
    check_disk_space(".", 10**6, free_bytes=checkpoint_bytes(10**6))  # exactly enough
    with pytest.raises(ValueError, match="needs about"):
        check_disk_space(".", 10**6, free_bytes=checkpoint_bytes(10**6) - 1)


def test_checkpoint_from_another_configuration_names_the_parameter(data_dir, straight, tmp_path):
    checkpoint = sorted((straight / "checkpoints").iterdir())[-1]
    done = launch(data_dir, tmp_path / "wider", f"resume={checkpoint}", "model.dim=32")
    one_line_error(done, "parameter model.")
    assert "[6, 1, 16]" in done.stderr and "[6, 1, 32]" in done.stderr


@pytest.mark.slow
def test_sigterm_to_the_torchrun_agent_checkpoints_every_worker(data_dir, tmp_path):
    """A scheduler signals the launcher: torchrun forwards SIGTERM to both workers, which
    checkpoint at the same step and exit; the launcher itself then exits with code 1."""
    run = tmp_path / "ddp"
    command = [*TORCHRUN, str(ROOT / "train.py"),
               *run_args(data_dir, run, *RUN, "train.steps=100000", "checkpoint.every=0")]
    agent = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        log = run / "metrics.jsonl"
        while not log.is_file() or "train/loss_bpd" not in log.read_text():  # training began
            assert time.monotonic() < deadline and agent.poll() is None
            time.sleep(0.2)
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    finally:
        agent.kill()
    preempted = [r for r in records(run) if "preempted" in r]
    assert len(preempted) == 1
    checkpoint = run / "checkpoints" / f"step_{preempted[0]['step']:07d}"
    assert checkpoint_problem(checkpoint) is None
    step = preempted[0]["step"]
    done = launch(data_dir, run, f"train.steps={step + 1}", "resume=auto", launcher=TORCHRUN)
    assert done.returncode == 0, done.stderr[-3000:]
    assert records(run)[-1]["replicas_in_sync"] is True
