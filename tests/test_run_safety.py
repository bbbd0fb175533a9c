"""What a run writes stays its own and whole: no write through a symbolic link, no start-up
that loses a race deleting the winner's run_dir, an export that always matches the last
checkpoint, hostile checkpoint settings refused in one line, nothing written before the
start-up checks pass, a full disk named by its file, and exit code 0 for a signal after the
run is complete. The end-to-end runs are tiny models in subprocesses, as in test_faults.py."""

import errno
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_faults import launch, one_line_error, records
from test_train import ENV, ROOT, run_args

from axial_transformer import AxialTransformer
from axial_transformer.training.checkpoint import CheckpointError, checkpoint_problem, seal
from axial_transformer.training.config import load_config
from axial_transformer.training.ema import EMA
from axial_transformer.training.errors import SetupError
from axial_transformer.training.optimizer_state import adam
from axial_transformer.training.resume import export_problem, read_checkpoint, save_checkpoint
from axial_transformer.training.run_log import MetricsLog
from axial_transformer.training.startup import RunDirClaim, check_no_links

# train.py with one library function patched: on its CALL-th call, ACTION runs first.
PATCHED = """
import errno, os, signal, sys
sys.argv[0] = "train.py"
import {module} as target
original, calls = target.{name}, []
def patched(*args, **kwargs):
    calls.append({counted})
    if sum(calls) == {call} and calls[-1]:
        {action}
    return original(*args, **kwargs)
target.{name} = patched
import train
sys.exit(train.main(sys.argv[1:]))
"""
ACTIONS = {
    "SIGKILL": "os.kill(os.getpid(), signal.SIGKILL)",
    "SIGTERM": "os.kill(os.getpid(), signal.SIGTERM)",
    # A full disk: write() and fsync() fail with ENOSPC and name no file.
    "ENOSPC": "raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))",
    "ValueError": "raise ValueError('injected: the model cannot be built')",
}
# Four steps, a checkpoint every two: step_0000002 and step_0000004 (the final one).
STEPS = ("train.steps=4", "checkpoint.every=2", "checkpoint.keep=2", "eval.max_images=4")


def launch_patched(function: str, action: str, data_dir: Path, run_dir: Path, *extra: str,
                   call: int = 1, counted: str = "True") -> subprocess.CompletedProcess:
    """A run whose `call`-th call of `function` (among those for which the expression `counted`
    of its `args` holds) does `action` first."""
    module, name = function.split(":")
    script = PATCHED.format(module=module, name=name, call=call, counted=counted,
                            action=ACTIONS[action])
    return subprocess.run([sys.executable, "-c", script,
                           *run_args(data_dir, run_dir, *STEPS, *extra)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)


def run(data_dir: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return launch(data_dir, run_dir, *STEPS, *extra)


def newest_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step_*"))[-1]


def export_is_ema_of(run_dir: Path, checkpoint: Path) -> bool:
    export = load_file(run_dir / "export" / "model.safetensors")
    ema = load_file(checkpoint / "ema.safetensors")
    return export.keys() == ema.keys() and all(torch.equal(export[k], ema[k]) for k in export)


# ---------------------------------------------------------------------------------------------
# A run is complete only when its export matches its last checkpoint.


def test_a_kill_between_checkpoint_and_export_is_repaired_on_resume(data_dir, tmp_path):
    """SIGKILL as the final checkpoint's export is about to be written: step_0000004 is sealed,
    export/ still holds step 2's EMA. resume=auto writes the export again before completing."""
    run_dir = tmp_path / "run"
    done = launch_patched("axial_transformer.training.resume:write_export", "SIGKILL", data_dir,
                          run_dir, call=2)
    assert done.returncode == -9, done.stderr[-3000:]
    final = newest_checkpoint(run_dir)
    assert final.name == "step_0000004" and checkpoint_problem(final) is None
    assert export_is_ema_of(run_dir, run_dir / "checkpoints" / "step_0000002")  # stale
    assert "not the EMA weights of step_0000004" in export_problem(run_dir)

    done = run(data_dir, run_dir, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert export_is_ema_of(run_dir, final) and export_problem(run_dir) is None
    assert "writing the export again from step_0000004" in done.stdout + done.stderr
    assert [r["step"] for r in records(run_dir) if r.get("final")] == [4]

    # A finished run whose export went stale afterwards is not complete: it is resumed, the
    # export written again and the final phase redone, its record still there once.
    shutil.copy(final / "model.safetensors", run_dir / "export" / "model.safetensors")
    done = run(data_dir, run_dir, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is not the EMA weights of step_0000004 (stale); resuming" in done.stderr
    assert export_is_ema_of(run_dir, final) and export_problem(run_dir) is None
    assert [r["step"] for r in records(run_dir) if r.get("final")] == [4]


def test_a_full_disk_at_the_export_says_the_checkpoint_was_kept(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    done = launch_patched("axial_transformer.hub:write_safetensors", "ENOSPC", data_dir,
                          run_dir, call=2)
    one_line_error(done, "checkpoint ")
    error = done.stderr.strip().splitlines()[-1]
    assert "step_0000004 is saved, but refreshing the export failed" in error, error
    assert "No space left on device" in error and str(run_dir / "export") in error, error
    assert "removed" not in error  # the checkpoint is kept, and the message says so
    assert checkpoint_problem(newest_checkpoint(run_dir)) is None
    assert newest_checkpoint(run_dir).name == "step_0000004"
    assert "not the EMA weights of step_0000004" in export_problem(run_dir)  # resume repairs it


# ---------------------------------------------------------------------------------------------
# The final phase: a full disk names its file after showing the figures; a late signal exits 0.


def test_a_full_disk_in_the_final_phase_names_the_file_after_showing_the_figures(
        data_dir, tmp_path):
    run_dir = tmp_path / "run"
    # The heatmap's write fails (the loss curve, also a PNG, is written along the way).
    done = launch_patched("PIL.Image:Image.save", "ENOSPC", data_dir, run_dir,
                          "eval.heatmap=true", counted="'.heatmap.png' in str(args[1])")
    one_line_error(done, "No space left on device")
    error = done.stderr.strip().splitlines()[-1]
    assert str(run_dir / "heatmap.png") in error, error
    assert "final True eval/bpd" in done.stdout + done.stderr  # shown before the failed write
    assert not any(r.get("final") for r in records(run_dir))  # resume=auto does it again
    assert not list(run_dir.glob(".heatmap.png.*"))  # no temporary file left


def test_metrics_log_names_its_file_when_the_disk_is_full(tmp_path, monkeypatch, capsys):
    from axial_transformer.training import run_log

    class Full:
        def __init__(self, fd, mode):
            os.close(fd)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_log, "open", Full, raising=False)
    log = MetricsLog(OneProcess(), tmp_path / "metrics.jsonl", Bar())
    with pytest.raises(OSError, match="No space left on device: '.*metrics.jsonl'"):
        log(6, {"final": True, "eval/bpd": 3.25})
    assert "eval/bpd 3.25" in capsys.readouterr().out  # shown before the write failed


def test_sigterm_after_the_final_record_exits_0(data_dir, tmp_path):
    """SIGTERM while train.py prints its outputs, and (run again on the complete run) while
    the interpreter shuts down: the run is complete, so the process still exits with code 0,
    not killed by the signal (-15)."""
    run_dir = tmp_path / "run"
    done = launch_patched("axial_transformer.training.run_log:print_outputs", "SIGTERM", data_dir,
                          run_dir)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert "outputs in" in done.stdout
    log = records(run_dir)
    assert log[-1].get("final") and not any("preempted" in r for r in log)

    script = ("import atexit, os, signal, sys; sys.argv[0] = 'train.py'; "
              "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM)); "
              "import train; sys.exit(train.main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", script,
                           *run_args(data_dir, run_dir, *STEPS, "resume=auto")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert "is already complete" in done.stdout


# ---------------------------------------------------------------------------------------------
# Nothing is written before the start-up checks pass.


def test_a_failure_while_building_the_run_writes_nothing(data_dir, tmp_path):
    """The model, Adam and the loader are built after the checks: a failure or SIGTERM there
    leaves run_dir as it was (a new one is removed; an existing one keeps every file, even the
    temporary files of a killed run, and gets no config.yaml)."""
    fresh = tmp_path / "fresh"
    done = launch_patched("axial_transformer.training.loop:build", "ValueError", data_dir, fresh)
    one_line_error(done, "injected: the model cannot be built")
    assert not fresh.exists()

    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    (used / ".metrics.jsonl.k3j4h5g6.tmp").write_text("left by a kill")
    before = sorted(p.name for p in used.iterdir())
    done = launch_patched("axial_transformer.training.loop:build", "SIGTERM", data_dir, used)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopped by SIGTERM during start-up; nothing to save" in done.stderr
    assert sorted(p.name for p in used.iterdir()) == before


# ---------------------------------------------------------------------------------------------
# No write through a symbolic link.


def test_a_dangling_metrics_link_is_refused_and_nothing_is_written_outside(data_dir, tmp_path):
    run_dir, outside = tmp_path / "run", tmp_path / "outside.jsonl"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to(outside)
    done = run(data_dir, run_dir)
    one_line_error(done, f"{run_dir / 'metrics.jsonl'} is a symbolic link (to {outside})")
    assert not outside.exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]


def test_a_lock_link_is_refused_and_its_target_left_alone(tmp_path):
    run_dir, outside = tmp_path / "run", tmp_path / "precious.txt"
    run_dir.mkdir()
    outside.write_text("precious")
    (run_dir / ".lock").symlink_to(outside)
    with pytest.raises(SetupError, match=r"\.lock is a symbolic link"):
        RunDirClaim(run_dir).take()
    assert outside.read_text() == "precious"
    assert (run_dir / ".lock").is_symlink()  # not removed either: it was not the run's

    (run_dir / ".lock").unlink()
    (run_dir / ".lock").symlink_to(tmp_path / "nowhere")  # dangling: nothing created there
    with pytest.raises(SetupError, match=r"\.lock is a symbolic link"):
        RunDirClaim(run_dir).take()
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("link", ["config.yaml", "metrics.jsonl", "heatmap.png", "checkpoints",
                                  "export", "samples", "checkpoints/step_0000002",
                                  "export/model.safetensors", "samples/step_0000002.png"])
def test_every_link_where_the_run_writes_is_refused(tmp_path, link):
    run_dir = tmp_path / "run"
    for folder in ("checkpoints", "export", "samples"):
        (run_dir / folder).mkdir(parents=True)
    (run_dir / "checkpoints" / "step_0000001").mkdir()
    (run_dir / "metrics.jsonl").write_text("")
    check_no_links(run_dir)  # negative control: real files and folders pass
    path = run_dir / link
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.symlink_to(tmp_path)
    with pytest.raises(SetupError, match=re.escape(f"{path} is a symbolic link")):
        check_no_links(run_dir)


def test_metrics_log_does_not_follow_a_link(tmp_path):
    outside = tmp_path / "outside.jsonl"
    (tmp_path / "metrics.jsonl").symlink_to(outside)
    log = MetricsLog(OneProcess(), tmp_path / "metrics.jsonl", Bar())
    with pytest.raises(OSError, match="metrics.jsonl"):
        log(1, {"train/loss_bpd": 1.0}, echo=False)
    assert not outside.exists()


# ---------------------------------------------------------------------------------------------
# Two start-ups racing for a new run_dir.


def claim_rounds(root: Path, rounds: int, start: float, barrier, results) -> None:
    """Take a RunDirClaim on root/rN at the same instant as the other process (both spin to
    the round's time on the shared monotonic clock); once both have tried, report whether this
    one won and whether what it holds is still there."""
    for i in range(rounds):
        run_dir = root / f"r{i}"
        claim = RunDirClaim(run_dir)
        while time.monotonic() < start + i * ROUND_S:
            pass
        try:
            claim.take()
            won = True
        except SetupError:
            won = False
        barrier.wait()  # the loser has given up (and removed whatever it removes)
        intact = won and run_dir.is_dir() and claim._still_linked(claim.fd)
        results.put((i, won, intact))
        barrier.wait()
        claim.release()


ROUND_S = 0.002


def test_two_start_ups_racing_for_a_new_run_dir_never_delete_the_winners(tmp_path):
    """1000 races (about 3 s). Before the fix, the loser deleted the winner's run_dir in 4 to
    140 of 1000 on the shared 2-core test machine."""
    rounds = 1000
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2, timeout=60), context.Queue()
    start = time.monotonic() + 0.1
    racers = [context.Process(target=claim_rounds,
                              args=(tmp_path, rounds, start, barrier, results))
              for _ in range(2)]
    for racer in racers:
        racer.start()
    outcomes: dict[int, list] = {}
    for _ in range(2 * rounds):
        i, won, intact = results.get(timeout=60)
        outcomes.setdefault(i, []).append((won, intact))
    for racer in racers:
        racer.join(timeout=60)
        assert racer.exitcode == 0
    for i, pair in outcomes.items():
        assert sorted(won for won, _ in pair) == [False, True], (i, pair)  # one winner
        assert all(intact for won, intact in pair if won), f"round {i}: the winner lost run_dir"
        assert (tmp_path / f"r{i}" / ".lock").is_file()


def test_a_start_up_that_loses_by_a_hair_removes_nothing(tmp_path):
    """The race made certain: the winner takes run_dir just as the loser creates it, after
    the loser saw it missing. The loser is refused, and the winner keeps its run_dir and lock."""
    winner = RunDirClaim(tmp_path / "run")

    class JustTooLate(type(tmp_path)):
        def mkdir(self, *args, **kwargs):
            if not winner.fd:
                winner.take()
            return super().mkdir(*args, **kwargs)

    with pytest.raises(SetupError, match="is in use by another run"):
        RunDirClaim(JustTooLate(tmp_path / "run")).take()
    assert winner.fd is not None and winner._still_linked(winner.fd)
    assert (tmp_path / "run").is_dir()
    winner.release()


# ---------------------------------------------------------------------------------------------
# Hostile checkpoint settings, sealed again (a seal is a checksum anyone can recompute).


class OneProcess:
    """What save_checkpoint and MetricsLog ask of an Accelerator, for one process."""

    is_main_process, process_index, num_processes = True, 0, 1

    def wait_for_everyone(self) -> None:
        pass

    def log(self, metrics: dict, step: int) -> None:
        pass


class Bar:
    def write(self, text: str) -> None:
        print(text)


@pytest.fixture(scope="module")
def sealed(tmp_path_factory, data_dir) -> tuple[Path, AxialTransformer]:
    """A genuine checkpoint at step 1 of the model the end-to-end runs train, and that model."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", run_args(data_dir, Path("unused"))[2:])
    torch.manual_seed(0)
    model = AxialTransformer(cfg.model)
    optimizer = adam(model.parameters(), cfg.train)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    run_dir = tmp_path_factory.mktemp("sealed")
    checkpoint = save_checkpoint(OneProcess(), model, optimizer, EMA(model, 0.9),
                                 {"step": 1, "skipped_steps": 0}, run_dir, keep=1)
    return checkpoint, model


def edit_json(name: str, change):
    def edit(directory: Path) -> None:
        value = json.loads((directory / name).read_text())
        change(value)
        (directory / name).write_text(json.dumps(value))
    return edit


def edit_group(key: str, value):
    return edit_json("optimizer.json", lambda v: v["param_groups"][0].__setitem__(key, value))


def edit_moment(key: str, change):
    def edit(directory: Path) -> None:
        tensors = load_file(directory / "optimizer.safetensors")
        tensors[key] = change(tensors[key])
        save_file(tensors, directory / "optimizer.safetensors")
    return edit


HOSTILE = [
    (edit_group("betas", "0.9,0.999"),
     "optimizer.json: param_groups[0].betas must be two numbers in [0, 1), got '0.9,0.999'"),
    (edit_group("betas", ["0.9", 0.999]), "param_groups[0].betas must be two numbers"),
    (edit_group("betas", [0.9, 1.5]), "param_groups[0].betas must be two numbers in [0, 1)"),
    (edit_group("amsgrad", True),
     "optimizer.json: param_groups[0].amsgrad must be false (the run's Adam), got True"),
    (edit_group("capturable", True), "param_groups[0].capturable must be false"),
    (edit_group("fused", True), "param_groups[0].fused must be null"),
    (edit_group("eps", "1e-8"),
     "optimizer.json: param_groups[0].eps must be a positive finite number, got '1e-8'"),
    (edit_group("weight_decay", -1e30),
     "param_groups[0].weight_decay must be a finite number >= 0, got -1e+30"),
    (edit_group("lr", float("nan")), "param_groups[0].lr must be a finite number >= 0"),
    (edit_group("extra", 1), "param_groups[0] has a key 'extra'; expected the keys of"),
    (edit_json("optimizer.json", lambda v: v["param_groups"][0].pop("eps")),
     "param_groups[0] has no 'eps'"),
    (edit_json("optimizer.json", lambda v: v.__setitem__("state", [])),
     "optimizer.json: state must be a mapping"),
    (edit_json("optimizer.json", lambda v: v["state"].__setitem__("0", {"max_exp_avg_sq": 1})),
     "optimizer.safetensors: the state of parameter 0 holds"),
    (edit_moment("0.step", lambda step: -step),
     "optimizer.safetensors: the step count of parameter 0 must be a finite number >= 0"),
    (edit_moment("0.exp_avg_sq", lambda moment: -1 - moment),
     "optimizer.safetensors: tensor 0.exp_avg_sq holds negative values"),
    (lambda d: (d / "trainer_state.json").write_text("[" * 100_000 + "]" * 100_000),
     "trainer_state.json is nested too deeply"),
    (edit_json("trainer_state.json", lambda v: v.__setitem__("step", {"step": 1})),
     "trainer_state.json does not hold step 1"),
    (lambda d: (d / "optimizer.json").write_text("[" * 100_000 + "]" * 100_000),
     "optimizer.json is nested too deeply"),
]


@pytest.mark.parametrize("damage, message", HOSTILE, ids=[m[:40] for _, m in HOSTILE])
def test_hostile_settings_under_a_recomputed_seal_are_refused_in_one_line(
        sealed, tmp_path, damage, message):
    source, model = sealed
    assert read_checkpoint(source, model).step == 1  # negative control: the genuine one loads
    directory = Path(shutil.copytree(source, tmp_path / "checkpoints" / source.name))
    damage(directory)
    seal(directory)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(directory, model)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_a_hostile_checkpoint_given_to_resume_stops_the_run_in_one_line(
        data_dir, sealed, tmp_path):
    source, _ = sealed
    directory = Path(shutil.copytree(source, tmp_path / "hostile" / source.name))
    edit_group("amsgrad", True)(directory)
    seal(directory)
    done = run(data_dir, tmp_path / "run", f"resume={directory}")
    one_line_error(done, f"resume={directory}: optimizer.json: param_groups[0].amsgrad must be")
    assert not (tmp_path / "run").exists()
