"""The commands as a user meets them: installed entry points and `python -m axial_transformer`,
train.py's list of config keys, evaluate.py's outputs, the loss curve and prepare's messages."""

import errno
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line
from PIL import Image

from axial_transformer import AxialTransformer, AxialTransformerConfig
from axial_transformer.__main__ import COMMANDS
from axial_transformer.__main__ import main as module_main
from axial_transformer.cli import evaluate as evaluate_cli
from axial_transformer.cli import train as train_cli
from axial_transformer.plots import loss_curve
from axial_transformer.training.config import RunConfig
from axial_transformer.training.run_log import MetricsLog

ROOT = Path(__file__).resolve().parents[1]


def test_console_entry_points_name_the_commands():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"axial-train", "axial-sample", "axial-evaluate", "axial-compress",
                            "axial-decompress"}
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name
        command = name.removeprefix("axial-")
        assert module == f"axial_transformer.{COMMANDS[command]}"  # python -m runs the same
        assert (ROOT / f"{command}.py").is_file()  # and so does the script of a clone


def test_python_dash_m_runs_each_command(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit) as stop:
            module_main([command, "--help"])
        assert stop.value.code == 0
        usage = capsys.readouterr().out.splitlines()[0]
        spelled = ".data prepare" if command == "prepare" else f" {command}"
        assert usage.startswith(f"usage: python -m axial_transformer{spelled}"), usage
    assert module_main(["sampel"]) == 2
    assert error_line(capsys.readouterr().err) == (
        "error: unknown command 'sampel'; expected one of " + ", ".join(COMMANDS))


def test_python_dash_m_in_a_fresh_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "axial_transformer", "sample", "--checkpoint",
                           "runs/none"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 2 and error_line(done.stderr) == "error: runs/none does not exist"


def test_train_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    help_text = capsys.readouterr().out
    for section, values in RunConfig().to_dict().items():
        if isinstance(values, dict):
            assert f"  {section}:" in help_text, section
            for key in values:
                assert f" {key}=" in help_text, f"{section}.{key}"
        else:
            assert f"  {section}=" in help_text, section
    assert " lr=0.0001 " in help_text and " image_size=[32,32] " in help_text  # the defaults


# ---------------------------------------------------------------------------------------------
# evaluate.py: a size for a trained model, and the heatmap checked before, written after.


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("evaluate") / "export"
    config = AxialTransformerConfig(image_size=(4, 3), channels=1, dim=8, heads=2,
                                    encoder_layers=2, outer_layers=2, inner_layers=1)
    AxialTransformer(config).save_pretrained(directory)
    np.save(directory.parent / "test.npy", np.zeros((3, 4, 3, 1), np.uint8))
    np.save(directory.parent / "wide.npy", np.zeros((3, 4, 5, 1), np.uint8))
    return directory


def run_evaluate(capsys, *args) -> tuple[int, str, str]:
    code = evaluate_cli.main(list(map(str, args)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_other_size_asks_for_other_images_not_another_model(export, capsys):
    code, _, err = run_evaluate(capsys, "--checkpoint", export, "--data",
                                export.parent / "wide.npy")
    line = error_line(err)
    assert code == 2 and "this model takes images of H x W x C = 4 x 3 x 1, found 4 x 5 x 1" in line
    assert "prepare them again with --image-size 4 3 --resize" in line
    assert "model.image_size" not in line


def test_evaluate_heatmap_checked_before_and_written_after_the_figures(export, tmp_path, capsys,
                                                                     monkeypatch):
    (tmp_path / "taken").mkdir()
    data = ["--checkpoint", export, "--data", export.parent / "test.npy"]

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before the heatmap's path was checked")

    with monkeypatch.context() as patch:
        patch.setattr(evaluate_cli, "evaluate", no_scoring)
        code, _, err = run_evaluate(capsys, *data, "--heatmap", tmp_path / "taken")
        assert code == 2 and "--heatmap" in error_line(err) and "an existing folder" in err

    def full_disk(heatmap, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(evaluate_cli, "save_heatmap", full_disk)
    code, out, err = run_evaluate(capsys, *data, "--heatmap", tmp_path / "bits.png")
    assert code == 2 and "test bits/dim " in out  # the figures came first
    assert err.strip().splitlines()[-1] == (
        f"error: could not write the heatmap {tmp_path / 'bits.png'}: No space left on device")


# ---------------------------------------------------------------------------------------------
# The loss curve beside metrics.jsonl.

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)


def colours(picture: Image.Image) -> set:
    return {tuple(c) for c in np.asarray(picture).reshape(-1, 3)}


def test_loss_curve_draws_training_loss_and_test_bits():
    assert loss_curve([{"step": 0, "start": "fresh"}]) is None  # nothing to draw yet
    train = [{"step": s, "train/loss_bpd": 8 - s / 100} for s in range(50, 301, 50)]
    picture = loss_curve(train)
    assert BLUE in colours(picture) and ORANGE not in colours(picture)
    picture = loss_curve([*train, {"step": 300, "eval/bpd": 5.5, "final": True}])
    assert BLUE in colours(picture) and ORANGE in colours(picture)
    assert loss_curve([{"step": 1, "train/loss_bpd": None}]) is None  # skipped steps: null


class MainProcess:
    is_main_process = True

    def log(self, metrics, step):
        pass


class Bar:
    def write(self, text):
        pass


def test_metrics_log_keeps_the_loss_curve_current(tmp_path):
    log = MetricsLog(MainProcess(), tmp_path / "metrics.jsonl", Bar())
    log(0, {"start": "fresh"})
    assert not (tmp_path / "loss_curve.png").exists()
    log(50, {"train/loss_bpd": 7.0})
    first = (tmp_path / "loss_curve.png").read_bytes()
    log(100, {"train/loss_bpd": 6.0})
    assert (tmp_path / "loss_curve.png").read_bytes() != first
    assert Image.open(tmp_path / "loss_curve.png").size == (720, 420)


# ---------------------------------------------------------------------------------------------
# prepare's messages: what it leaves out, and options as the command line spells them.


def test_prepare_says_what_it_skips_and_names_its_options(tmp_path, capsys):
    from axial_transformer.data.__main__ import main as data_main

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, size in (("a.png", (4, 4)), ("b.png", (4, 4)), ("c.gif", (4, 4))):
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(folder / name)
    data_main(["prepare", str(folder), str(tmp_path / "out.npy")])
    captured = capsys.readouterr()
    assert "skipped 1 file(s) that are not .png, .jpg, .jpeg: c.gif" in captured.err
    assert "wrote 2 images" in captured.out
    Image.fromarray(np.zeros((5, 4, 3), np.uint8)).save(folder / "d.png")
    with pytest.raises(SystemExit):
        data_main(["prepare", str(folder), str(tmp_path / "mixed.npy")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "pass --image-size H W and --resize" in line and "resize=True" not in line
