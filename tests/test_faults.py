"""Long runs that survive faults: SIGKILL and exact resume, SIGTERM at any point from start-up to
exit, a second run on the same run_dir, a full disk, corrupt or planted checkpoint files (never
unpickled), non-finite steps, and bad input caught at start-up with one clear line.
The runs are tiny models in subprocesses (Accelerate keeps process-wide state)."""

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import ENV, ROOT, run_args

from axial_transformer import AxialTransformer
from axial_transformer.training.checkpoint import (
    CheckpointError,
    checkpoint_problem,
    nonfinite_parameter,
    prune_checkpoints,
    seal,
)
from axial_transformer.training.config import config_from_dict
from axial_transformer.training.resume import read_checkpoint
from axial_transformer.training.startup import check_disk_space, run_bytes

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
# Six steps of two accumulated micro-batches, a checkpoint every two, the last two kept.
RUN = ("train.steps=6", "checkpoint.every=2", "checkpoint.keep=2", "eval.max_images=4",
       "train.grad_accumulation=2")


def launch(data_dir: Path, run_dir: Path, *extra: str, launcher: tuple = (),
           env: dict | None = None, preexec_fn=None, faults: dict | None = None
           ) -> subprocess.CompletedProcess:
    """train.py on the data, or with `faults` tests/train_with_faults.py (its docstring says
    which faults it injects)."""
    env = env or ENV
    if faults:
        env = {**env, "TRAIN_FAULTS": json.dumps(faults)}
    script = ROOT / "tests" / "train_with_faults.py" if faults else ROOT / "train.py"
    command = [*(launcher or (sys.executable,)), str(script),
               *run_args(data_dir, run_dir, *RUN, *extra)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240, preexec_fn=preexec_fn)


# train.py with one library function patched to send the process SIGTERM as it is called: a
# signal that arrives in that phase of the run.
SIGTERM_IN = """
import os, signal, sys
sys.argv[0] = "train.py"
import {module} as target
original = target.{name}
def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)
target.{name} = signalled
import train
sys.exit(train.main(sys.argv[1:]))
"""


def launch_with_sigterm_in(function: str, data_dir: Path, run_dir: Path, *extra: str):
    module, name = function.rsplit(".", 1)
    return subprocess.run([sys.executable, "-c", SIGTERM_IN.format(module=module, name=name),
                           *run_args(data_dir, run_dir, *RUN, *extra)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)


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


def leftovers(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if p.name.endswith(".tmp") or p.name.startswith(".tmp"))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> Path:
    """Six uninterrupted steps: the reference every interrupted run must match bit for bit. Run
    under umask 002, in a run_dir holding the lock file of a process that died."""
    run = tmp_path_factory.mktemp("straight") / "run"
    run.mkdir()
    (run / ".lock").write_text(f"{dead_pid()} {os.uname().nodename}\n")
    os.chmod(run / ".lock", 0o664)
    done = launch(data_dir, run, preexec_fn=lambda: os.umask(0o002))
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def killed(data_dir, tmp_path_factory) -> Path:
    """The same run killed with SIGKILL right after step 5 (last checkpoint: step 4)."""
    run = tmp_path_factory.mktemp("killed") / "run"
    done = launch(data_dir, run, faults={"kill_after": 5})
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert [r["step"] for r in records(run) if "train/loss_bpd" in r] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_0000002", "step_0000004"]
    return run


def copy_run(run: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


def test_created_files_get_the_umask_modes(straight):
    modes = {str(p.relative_to(straight)): p.stat().st_mode & 0o777 for p in straight.rglob("*")}
    assert modes["checkpoints/step_0000006/model.safetensors"] == 0o664
    assert modes["export/model.safetensors"] == 0o664
    assert {mode for path, mode in modes.items() if (straight / path).is_file()} == {0o664}
    assert {mode for path, mode in modes.items() if (straight / path).is_dir()} == {0o775}


# ---------------------------------------------------------------------------------------------
# Exact resume after SIGKILL; what killed runs leave behind.


class RunsCode:
    """A pickle that runs a shell command when it is loaded."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class ForgedObjectDtype:
    """numpy's object dtype, its flags forged to say its arrays pickle as raw bytes."""

    def __reduce__(self):
        return np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 0x3D)


class ForgedPointers:
    """An object array rebuilt by numpy from raw bytes: every element a forged pointer."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        pointer = (0x4141414141414141).to_bytes(8, "little")
        return _reconstruct, (np.ndarray, (0,), b"b"), (1, (4,), ForgedObjectDtype(), False,
                                                        pointer * 4)


def payloads(marker: Path) -> dict[str, bytes]:
    return {"runs code": pickle.dumps(RunsCode(f"touch {marker}")),
            "forged pointers": pickle.dumps(ForgedPointers(), protocol=2)}


def test_the_pickle_payloads_are_live(tmp_path):
    """Negative control for the tests below: unpickled, one payload runs its command and the
    other crashes the process (SIGSEGV)."""
    marker = tmp_path / "ran"
    for name, payload in payloads(marker).items():
        (tmp_path / name).write_bytes(payload)
    load = "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())"
    done = subprocess.run([sys.executable, "-c", load, tmp_path / "runs code"], timeout=60)
    assert done.returncode == 0 and marker.exists()
    done = subprocess.run([sys.executable, "-c", load, tmp_path / "forged pointers"], timeout=60)
    assert done.returncode == -signal.SIGSEGV


def test_sigkill_then_resume_is_bit_identical(data_dir, straight, killed, tmp_path):
    run = copy_run(killed, tmp_path)
    # What kills during writes leave behind, all removed at the next start.
    planted = [".metrics.jsonl.k3j4h5g6.tmp", "checkpoints/.step_0000006.tmp/model.safetensors",
               "export/.model.safetensors.x8y7z6w5.tmp", "export/.tmpAb12Cd"]
    for name in planted:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(b"\0" * 100)
    # Pickles where an older version kept its optimizer and generator states: never opened.
    marker = tmp_path / "payload_ran"
    newest = run / "checkpoints" / "step_0000004"
    (newest / "optimizer.bin").write_bytes(payloads(marker)["runs code"])
    (newest / "random_states_0.pkl").write_bytes(payloads(marker)["forged pointers"])
    # Its config.yaml as older versions wrote it, with two run-time choices in the model's
    # settings and a section of test hooks; the resume turns checkpointing on (the same
    # arithmetic).
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"].update(gradient_checkpointing=False, attention="auto")
    saved["debug"] = {"rank": -1, "kill_at_step": 5, "nan_at_steps": [], "free_bytes": -1}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))

    done = launch(data_dir, run, "resume=auto", "train.gradient_checkpointing=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout + done.stderr and "step_0000004" in done.stdout
    warning = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "optimizer.bin, random_states_0.pkl" in warning[0], warning
    assert not marker.exists()
    assert leftovers(run) == []
    assert losses(run) == losses(straight)  # every step: data order, channels, dropout, Adam
    model, ema = final_weights(run)
    straight_model, straight_ema = final_weights(straight)
    assert same(model, straight_model) and same(ema, straight_ema)
    # Each step's record once; one start record per start, the final record once.
    log = records(run)
    assert [r["step"] for r in log if "train/loss_bpd" in r] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["start"]) for r in log if "start" in r] == [(0, "fresh"), (4, "resume")]
    assert [r["step"] for r in log if r.get("final")] == [6]

    # Negative control: the same resume with another seed (data order, channels, dropout)
    # matches up to the checkpoint and not after it.
    other = copy_run(killed, tmp_path, "other")
    done = launch(data_dir, other, "resume=auto", "train.seed=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(other)[:4] == losses(straight)[:4]
    assert losses(other)[4:] != losses(straight)[4:]
    assert not same(final_weights(other)[0], straight_model)

    # Negative control: a resume that restarts the data order from the top of the run (the
    # position in the epoch not restored) is caught too.
    forgetful = copy_run(killed, tmp_path, "forgetful")
    patch = ("import sys; sys.argv[0] = 'train.py'; import axial_transformer.training.loop as T; "
             "restart = T.training_batches; "
             "T.training_batches = lambda loader, acc, position: restart(loader, acc, 0); "
             "import train; sys.exit(train.main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", patch,
                           *run_args(data_dir, forgetful, *RUN, "resume=auto")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(forgetful)[:4] == losses(straight)[:4]
    assert losses(forgetful)[4:] != losses(straight)[4:]


def overwrite(file: Path, offset: int, data: bytes) -> None:
    """Change bytes in place: the file keeps its size, as with bit rot or a torn page."""
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


def body_offset(file: Path) -> int:
    """Where a safetensors file's tensor data start (after its 8-byte length and header)."""
    return 8 + int.from_bytes(file.read_bytes()[:8], "little")


def test_corrupt_latest_checkpoint_is_named_and_the_previous_one_used(
        data_dir, straight, killed, tmp_path):
    run = copy_run(killed, tmp_path)
    newest = run / "checkpoints" / "step_0000004" / "model.safetensors"
    overwrite(newest, body_offset(newest) + 64, b"\xff" * 64)  # NaNs of the right size
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


def test_no_usable_checkpoint_restarts_at_step_0_and_logs_each_step_once(
        data_dir, straight, killed, tmp_path):
    """Every checkpoint broken (as for a run killed before its first one): the run starts again
    from step 0, and the records of the attempt that was lost are dropped."""
    run = copy_run(killed, tmp_path)
    overwrite(run / "checkpoints" / "step_0000002" / "trainer_state.json", 0, b"#")
    (run / "checkpoints" / "step_0000004" / "complete.json").write_text('{"files": {}}')
    done = launch(data_dir, run, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "lists no files" in warnings[0]
    assert "trainer_state.json does not match its SHA-256" in warnings[1]
    assert losses(run) == losses(straight)
    assert [(r["step"], r["start"]) for r in records(run) if "start" in r] == [(0, "fresh")]


def like(run: Path) -> AxialTransformer:
    """The run's model on the meta device: what its checkpoints are checked against."""
    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    with torch.device("meta"):
        return AxialTransformer(cfg.model)


def test_every_damage_is_caught_and_names_the_file(killed, tmp_path):
    """Damage that keeps each file's size, a marker of the wrong form, and (sealed again, as if
    the damage happened before the seal) contents that pass the hashes but not the checks."""
    model = like(killed)
    source = killed / "checkpoints" / "step_0000004"
    assert read_checkpoint(source, model).step == 4

    def damaged(damage, reseal: bool = False) -> str:
        directory = Path(shutil.copytree(source, tmp_path / f"c{len(list(tmp_path.iterdir()))}"
                                         / "step_0000004"))
        damage(directory)
        if reseal:
            seal(directory)
        with pytest.raises(CheckpointError) as error:
            read_checkpoint(directory, model)
        return str(error.value)

    def write(name: str, text: str):
        return lambda d: (d / name).write_text(text)

    def flip(name: str, body: bool = False):
        return lambda d: overwrite(d / name, body_offset(d / name) + 16 if body else 2, b"\xff" * 8)

    assert "lists no files" in damaged(write("complete.json", '{"files": []}'))
    assert "lists no files" in damaged(write("complete.json", '{"files": {}}'))
    assert "not JSON" in damaged(write("complete.json", '{"files": '))
    assert "'../config.yaml', which is no checkpoint file" in damaged(
        write("complete.json", '{"files": {"../config.yaml": {"bytes": 1, "sha256": ""}}}'))
    old = json.dumps({"files": {p.name: p.stat().st_size for p in source.iterdir()}})
    assert "older version" in damaged(write("complete.json", old))
    for name in ("optimizer.safetensors", "optimizer.json", "trainer_state.json", "rng_0.json"):
        assert f"{name} does not match its SHA-256" in damaged(flip(name))
    assert "model.safetensors does not match its SHA-256" in damaged(flip("model.safetensors",
                                                                           body=True))
    assert "ema.safetensors has" in damaged(lambda d: (d / "ema.safetensors").write_bytes(b"x"))
    assert "rng_0.safetensors is missing" in damaged(lambda d: (d / "rng_0.safetensors").unlink())
    # Sealed after the damage: the contents themselves are checked on load.
    assert "model.safetensors: " in damaged(flip("model.safetensors", body=True), reseal=True)
    assert "holds NaN or inf" in damaged(flip("ema.safetensors", body=True), reseal=True)
    assert "trainer_state.json is not JSON" in damaged(write("trainer_state.json", "{"), True)
    assert "does not hold step 4" in damaged(write("trainer_state.json", '{"step": 6}'), True)
    assert "optimizer.json: param_groups must be" in damaged(
        write("optimizer.json", '{"param_groups": 1}'), True)
    assert "rng_0 state: not a valid generator state" in damaged(
        write("rng_0.json", '{"python": [], "numpy": []}'), True)


def test_pickles_planted_in_a_checkpoint_are_rejected_without_being_loaded(killed, tmp_path):
    """Each payload in place of a checkpoint's own files, sealed again so that only the readers
    stand between it and the process; the readers run in a subprocess, which a loaded payload
    would crash (SIGSEGV) or use to create the marker file."""
    marker = tmp_path / "payload_ran"
    targets, cases = [], []
    for i, payload in enumerate(payloads(marker).values()):
        for target in ("optimizer.safetensors", "rng_0.json", "ema.safetensors",
                       "trainer_state.json"):
            checkpoint = copy_run(killed, tmp_path, f"{i}{target}") / "checkpoints" / "step_0000004"
            (checkpoint / target).write_bytes(payload)
            seal(checkpoint)
            targets.append(target)
            cases.append(str(checkpoint))
    script = """
import sys
from pathlib import Path

import torch
import yaml

from axial_transformer import AxialTransformer
from axial_transformer.training.checkpoint import load_trained_model
from axial_transformer.training.resume import read_checkpoint
from axial_transformer.training.config import config_from_dict

for case in map(Path, sys.argv[1:]):
    cfg = config_from_dict(yaml.safe_load((case.parent.parent / "config.yaml").read_text()))
    with torch.device("meta"):
        model = AxialTransformer(cfg.model)
    for read in (lambda: read_checkpoint(case, model), lambda: load_trained_model(case)):
        try:
            read()
            print("loaded")
        except ValueError as e:
            print(f"refused: {e}")
"""
    done = subprocess.run([sys.executable, "-c", script, *cases], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2 * len(cases), lines
    for target, resume, sample in zip(targets, lines[::2], lines[1::2], strict=True):
        assert resume.startswith("refused: ") and target in resume, (target, resume)
        if target == "ema.safetensors":
            assert sample.startswith("refused: ") and target in sample, sample
        else:
            assert sample == "loaded"  # sampling reads the EMA weights alone
    assert not marker.exists()


def make_checkpoint(root: Path, step: int, sealed: bool = True) -> Path:
    """A checkpoint directory with every file a seal requires (placeholder contents)."""
    from axial_transformer.training.checkpoint import REQUIRED

    directory = root / "checkpoints" / f"step_{step:07d}"
    directory.mkdir(parents=True)
    for name in REQUIRED:
        (directory / name).write_bytes(name.encode() * 10)
    if sealed:
        seal(directory)
    return directory


def test_marker_pruning_and_fallback(tmp_path):
    one, two = make_checkpoint(tmp_path, 1), make_checkpoint(tmp_path, 2)
    unsealed = make_checkpoint(tmp_path, 3, sealed=False)
    truncated = make_checkpoint(tmp_path, 4)
    (truncated / "model.safetensors").write_bytes(b"\x10")
    assert checkpoint_problem(two) is None
    assert "complete.json" in checkpoint_problem(unsealed)
    assert "truncated" in checkpoint_problem(truncated)
    # keep=1 deletes the older complete one, never the newest complete one.
    assert prune_checkpoints(tmp_path, keep=1) == [one]
    assert two.is_dir() and unsealed.is_dir() and truncated.is_dir()
    # A file that rots after sealing (same size) is caught by its hash.
    overwrite(two / "model.safetensors", 0, b"x")
    assert "SHA-256" in checkpoint_problem(two)
    # ... but pruning looks at sizes only, so it keeps treating it as complete.
    assert prune_checkpoints(tmp_path, keep=1) == []
    assert two.is_dir()


# ---------------------------------------------------------------------------------------------
# Preemption, from start-up to exit.


def test_sigterm_anywhere_saves_what_is_unsaved_and_exits_0(data_dir, straight, tmp_path):
    """SIGTERM during start-up, after a step, during the final checkpoint, the final evaluation
    and the codec baselines: each run exits 0 having saved what was unsaved, and the run ends
    exactly as one never interrupted, with each record once. Run again when it is complete, it
    says so and changes nothing."""
    run = tmp_path / "run"
    done = launch_with_sigterm_in("axial_transformer.training.startup.select_checkpoint",
                                  data_dir, run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopped by SIGTERM during start-up; nothing to save" in done.stderr
    assert not run.exists()  # nothing left behind, not even the run_dir it created

    done = launch(data_dir, run, "checkpoint.every=0", faults={"sigterm_after": 3})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopped by SIGTERM at step 4" in done.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000004"]
    assert {"step": 4, "preempted": "SIGTERM"} in records(run)
    assert not any("eval/bpd" in r for r in records(run))  # no final evaluation when preempted

    phases = [("axial_transformer.training.loop.save_checkpoint", ()),  # the final checkpoint
              ("axial_transformer.training.loop.evaluate", ()),
              ("axial_transformer.training.loop.codec_baselines", ("eval.baselines=true",))]
    for function, extra in phases:
        done = launch_with_sigterm_in(function, data_dir, run, "resume=auto",
                                      "checkpoint.every=0", *extra)
        assert done.returncode == 0, (function, done.stderr[-3000:])
        assert "stopped by SIGTERM at step 6" in done.stderr, function
        assert checkpoint_problem(run / "checkpoints" / "step_0000006") is None
        assert not any(r.get("final") for r in records(run)), function

    done = launch(data_dir, run, "resume=auto", "checkpoint.every=0", "eval.baselines=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(run) == losses(straight)
    assert same(final_weights(run)[1], final_weights(straight)[1])
    log = records(run)
    assert [r["step"] for r in log if "train/loss_bpd" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in log if "start" in r] == [0, 4, 6]
    assert not any("preempted" in r for r in log)  # each attempt's stop was superseded
    assert [r["step"] for r in log if r.get("final")] == [6]
    assert "baseline/png_bpd" in log[-1]

    before = (run / "metrics.jsonl").read_bytes()
    done = launch(data_dir, run, "resume=auto", "eval.baselines=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is already complete" in done.stdout and "PNG" in done.stdout
    assert f"export     {run / 'export'}" in done.stdout
    assert (run / "metrics.jsonl").read_bytes() == before


def test_two_processes_stop_together_and_skip_the_same_steps(data_dir, tmp_path):
    """torchrun, 2 CPU processes: SIGTERM reaches rank 1 only, and only rank 1's loss is NaN at
    step 1. The all-reduced flags make both skip step 1 and both checkpoint at step 3 and exit
    (without them rank 0 would train on and wait forever for rank 1)."""
    run = tmp_path / "ddp"
    done = launch(data_dir, run, "train.steps=50", launcher=TORCHRUN,
                  faults={"rank": 1, "sigterm_after": 2, "nan_at": [1]})
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert checkpoints[-1].name == "step_0000003" and checkpoint_problem(checkpoints[-1]) is None
    assert {p.name for p in checkpoints[-1].glob("rng_*")} == {
        "rng_0.json", "rng_0.safetensors", "rng_1.json", "rng_1.safetensors"}
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
# Non-finite steps.


def test_nan_steps_are_skipped_and_counted_and_too_many_stop_the_run(data_dir, tmp_path):
    # Killed in a streak of two skipped steps, then resumed: the streak is not carried over, so
    # one more skipped step does not stop the run (3 in a row would).
    run = tmp_path / "run"
    done = launch(data_dir, run, "train.max_skipped_steps=3", "checkpoint.every=1",
                  faults={"nan_at": [2, 3], "kill_after": 3})
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    done = launch(data_dir, run, "train.max_skipped_steps=3", "resume=auto",
                  faults={"nan_at": [4]})
    assert done.returncode == 0, done.stderr[-3000:]
    log = {r["step"]: r for r in records(run) if "train/loss_bpd" in r}
    assert [log[s]["train/skipped_steps"] for s in range(1, 7)] == [0, 1, 2, 3, 3, 3]
    assert log[2]["train/loss_bpd"] is None and log[2]["train/grad_norm"] is None
    assert all(np.isfinite(log[s]["train/loss_bpd"]) for s in (1, 5, 6))
    model, ema = final_weights(run)
    assert all(torch.isfinite(v).all() for v in [*model.values(), *ema.values()])

    # Three in a row stop the run with one clear line; every checkpoint left is finite.
    stopped = tmp_path / "stopped"
    done = launch(data_dir, stopped, "train.max_skipped_steps=3", faults={"nan_at": [2, 3, 4]})
    one_line_error(done, "3 steps in a row (up to step 4) were skipped (non-finite loss")
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
# One run per run_dir, and a disk that fills up.


def test_a_second_run_on_the_same_run_dir_stops_naming_the_holder(data_dir, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from axial_transformer.training.startup import RunDirClaim; "
         "RunDirClaim(Path(sys.argv[1])).take(); print('locked', flush=True); time.sleep(120)",
         str(run)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = launch(data_dir, run)
        one_line_error(done, f"is in use by another run (pid {holder.pid} on ")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()


def test_a_write_that_fails_for_space_stops_with_one_line_and_leaves_no_temp_files(
        data_dir, tmp_path):
    """Files are limited to 40 kB (RLIMIT_FSIZE, as a full disk would stop them): the
    checkpoint's weights cannot be written."""
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    run = tmp_path / "run"
    done = launch(data_dir, run, preexec_fn=small_files)
    one_line_error(done, "could not write checkpoint")
    error = done.stderr.strip().splitlines()[-1]
    assert "model.safetensors" in error and "File too large" in error, error
    assert "removed its temporary files (no checkpoint yet)" in error, error
    assert leftovers(run) == [] and list((run / "checkpoints").iterdir()) == []


def pretend_free(monkeypatch, free: int) -> None:
    """The disk of every path has `free` bytes free."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free))


def test_disk_estimate_counts_keep_plus_one_checkpoints_and_the_export(tmp_path, monkeypatch):
    # A checkpoint: weights, Adam's two moments and the EMA; then the export.
    assert run_bytes(10**9, keep=2) >= 10**9 * 4 * (3 * 4 + 1)
    pretend_free(monkeypatch, run_bytes(10**6, keep=2))
    check_disk_space(tmp_path, 10**6, keep=2)
    pretend_free(monkeypatch, run_bytes(10**6, keep=2) - 1)
    with pytest.raises(ValueError, match=r"3 checkpoints \(checkpoint.keep=2 and the one being "
                                         r"written\) and the export"):
        check_disk_space(tmp_path, 10**6, keep=2)
    # What the run already holds there is replaced in place, so it counts as room.
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.safetensors").write_bytes(b"\0" * 1000)
    pretend_free(monkeypatch, run_bytes(10**6, keep=2) - 1000)
    check_disk_space(tmp_path, 10**6, keep=2)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, naming the file or key and what was expected; nothing written.


def run_main(capsys, *args: str) -> tuple[int, str]:
    """train.py's main in this process; the signal handlers it leaves for the process's exit
    are taken back."""
    sys.path.insert(0, str(ROOT))
    import train as train_cli

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = train_cli.main(list(args))
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return code, capsys.readouterr().err


def test_start_up_errors_are_one_line(data_dir, tmp_path, capsys, monkeypatch):
    """Checked before any process group or model exists, so in-process here."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (["data.spec=/no/such/data"], "/no/such/data"),
        (["train.lrr=1"], "did you mean train.lr?"),
        ([f"run_dir={blocker / 'run'}"], "cannot be written"),
        (["train.lr=inf"], "train.lr must be a positive finite number, got inf"),
        (["train.lr=nan"], "train.lr must be a positive finite number, got nan"),
        (["train.lr=0"], "train.lr must be a positive finite number, got 0.0"),
        (["train.seed=-1"], "train.seed must be in [0, 2**32), got -1"),
        (["debug.kill_at_step=3"], "unknown config key 'debug'"),  # now in the tests
        ("a full disk", "GiB free, but 2 checkpoints (checkpoint.keep=1 and"),
    ]
    for extra, message in cases:
        if extra == "a full disk":
            extra = []
            pretend_free(monkeypatch, 1000)
        code, err = run_main(capsys, *run_args(data_dir, tmp_path / "r", *extra))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (extra, err)
    assert not (tmp_path / "r").exists()
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

    from axial_transformer.data.__main__ import main as prepare_cli

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


def test_a_used_run_dir_is_refused_unless_resumed_with_the_same_model(
        data_dir, straight, tmp_path):
    run = copy_run(straight, tmp_path)
    config = (run / "config.yaml").read_text()
    one_line_error(launch(data_dir, run), "pass resume=auto to continue that run")
    one_line_error(launch(data_dir, run, "resume=auto", "model.dim=32"), "same model settings")
    assert (run / "config.yaml").read_text() == config  # a refused start writes nothing


def test_checkpoint_from_another_configuration_names_the_parameter(data_dir, straight, tmp_path):
    checkpoint = sorted((straight / "checkpoints").iterdir())[-1]
    done = launch(data_dir, tmp_path / "wider", f"resume={checkpoint}", "model.dim=32")
    one_line_error(done, "parameter ")
    assert "[6, 1, 16]" in done.stderr and "[6, 1, 32]" in done.stderr
    assert not (tmp_path / "wider").exists()  # a refused start writes nothing, not config.yaml


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
