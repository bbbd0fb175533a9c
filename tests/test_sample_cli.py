"""sample.py's argument checks and where it writes, through `sample.main([...])` on a tiny
exported model."""

import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line, randomize_
from PIL import Image

from axial_transformer import AxialTransformer, AxialTransformerConfig, cpu_speedups

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
sample_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sample_cli)


def export_tiny_model(directory: Path) -> Path:
    config = AxialTransformerConfig(image_size=(4, 3), channels=1, dim=8, heads=2,
                                    encoder_layers=2, outer_layers=2, inner_layers=1)
    AxialTransformer(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    export_tiny_model(run / "export")
    return run


def run_sample(capsys, *args) -> tuple[int, str, str]:
    code = sample_cli.main(["--device", "cpu", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_rows_given_must_leave_rows_to_sample(run_dir, tmp_path, capsys):
    Image.fromarray(np.full((4, 3), 200, np.uint8)).save(tmp_path / "photo.png")
    complete = ["--checkpoint", run_dir, "--complete", tmp_path / "photo.png"]
    for k in (4, 9):
        code, _, err = run_sample(capsys, *complete, "--rows-given", k)
        assert code == 2 and error_line(err) == (
            f"error: --rows-given must be less than the image height 4 (K rows are kept, the "
            f"rest sampled), got {k}")
    code, _, err = run_sample(capsys, *complete, "--rows-given", -1)
    assert code == 2 and "--rows-given must be 0 or more" in error_line(err)
    assert not (run_dir / "samples").exists()
    code, out, _ = run_sample(capsys, *complete, "--rows-given", 3, "--num-samples", 2)
    done = run_dir / "samples" / "completion_photo_k3_seed0.npy"
    assert code == 0 and str(done.with_suffix(".png")) in out
    assert (np.load(done)[:, :3] == 200).all()


def test_complete_refuses_damaged_arrays_naming_the_file(run_dir, tmp_path, capsys):
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY not really")
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    for name in ("garbage.npy", "empty.npy", "objects.npy", "missing.npy"):
        code, _, err = run_sample(capsys, "--checkpoint", run_dir, "--complete",
                                  f"{tmp_path / name}:0", "--rows-given", 1)
        assert code == 2 and f"error: {tmp_path / name}: " in error_line(err), name


def test_samples_go_to_the_run_directory(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the old default wrote samples.png here
    for checkpoint in (run_dir, run_dir / "export"):
        code, out, _ = run_sample(capsys, "--checkpoint", checkpoint, "--num-samples", 2,
                                  "--seed", 5)
        png = run_dir / "samples" / "sample_seed5.png"
        assert code == 0 and f"-> {png}, {png.with_suffix('.npy')}" in out
        assert np.load(png.with_suffix(".npy")).shape == (2, 4, 3, 1)
        png.unlink()
    code, out, _ = run_sample(capsys, "--checkpoint", run_dir, "--num-samples", 1,
                              "--temperature", 0.5, "--out", "mine.png")
    assert code == 0 and (tmp_path / "mine.png").is_file() and (tmp_path / "mine.npy").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.npy", "mine.png"]
    code, _, err = run_sample(capsys, "--checkpoint", run_dir, "--out", "grid.jpg")
    assert code == 2 and "expected a .png file" in error_line(err)


def test_bare_export_samples_go_beside_it(tmp_path, capsys):
    export = export_tiny_model(tmp_path / "models" / "tiny")
    code, _, _ = run_sample(capsys, "--checkpoint", export, "--num-samples", 1,
                            "--temperature", 0.5)
    assert code == 0 and (tmp_path / "models" / "samples" / "sample_seed0_t0.5.png").is_file()
    assert sorted(p.name for p in export.iterdir()) == [
        "README.md", "config.json", "model.safetensors"]


def test_default_out_of_a_checkpoint_is_its_run(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step_0000008"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    assert sample_cli.default_out(step, "x.png") == tmp_path / "run" / "samples" / "x.png"


@pytest.fixture(scope="module")
def conditional_export(tmp_path_factory) -> Path:
    config = AxialTransformerConfig(image_size=(4, 3), channels=1, dim=8, heads=2,
                                    encoder_layers=2, outer_layers=2, inner_layers=1,
                                    num_classes=3, class_names=["cat", "dog", "ship"])
    directory = tmp_path_factory.mktemp("conditional") / "export"
    randomize_(AxialTransformer(config), std=0.5).save_pretrained(directory)
    return directory


def test_class_by_number_name_or_all(conditional_export, tmp_path, capsys):
    args = ["--checkpoint", conditional_export, "--num-samples", 2]
    code, out, _ = run_sample(capsys, *args, "--class", "ship", "--out", tmp_path / "ship.png")
    by_number = run_sample(capsys, *args, "--class", 2, "--out", tmp_path / "two.png")
    assert code == 0 and by_number[0] == 0
    assert np.array_equal(np.load(tmp_path / "ship.npy"), np.load(tmp_path / "two.npy"))
    code, out, _ = run_sample(capsys, *args, "--class", "all", "--guidance", 2)
    grid = conditional_export.parent / "samples" / "sample_class_all_seed0_g2.npy"
    assert code == 0 and str(grid.with_suffix(".png")) in out
    drawn = np.load(grid)
    assert drawn.shape == (6, 4, 3, 1)  # two of each class, class after class
    assert not np.array_equal(drawn[:2], drawn[4:])


def test_class_errors_are_one_line(conditional_export, run_dir, capsys):
    cases = [
        (["--checkpoint", conditional_export, "--class", "horse"],
         "--class horse: expected a class number 0..2 or one of cat, dog, ship, or 'all'"),
        (["--checkpoint", conditional_export], "class-conditional (3 classes): pass --class"),
        (["--checkpoint", run_dir, "--class", "1"], "needs a class-conditional model"),
        (["--checkpoint", conditional_export, "--guidance", "2"], "--guidance needs --class"),
    ]
    for args, message in cases:
        code, _, err = run_sample(capsys, *args)
        assert code == 2 and message in error_line(err)


def test_compiled_sampling_reports_its_compilation_apart(conditional_export, tmp_path, capsys,
                                                        monkeypatch):
    # What the command line reports is under test here, not the autotuned GEMM kernels
    # (test_sampling's compiled sampler test has them), whose search takes a minute when cold.
    monkeypatch.setattr(cpu_speedups, "frozen_weights_compilation",
                        functools.partial(cpu_speedups.frozen_weights_compilation, autotune=False))
    args = ["--checkpoint", conditional_export, "--num-samples", 2, "--class", "dog",
            "--guidance", 1.5]
    run_sample(capsys, *args, "--out", tmp_path / "eager.png")
    code, out, _ = run_sample(capsys, *args, "--out", tmp_path / "compiled.png", "--compile")
    assert code == 0
    assert "compiling the decoding steps for batch size 2" in out
    compiled_in = float(out.split("compiled in ")[1].split(" s")[0])
    per_image = float(out.split("(")[-1].split(" s per image")[0])
    assert per_image < compiled_in / 10  # the time per image leaves the compilation out
    assert np.array_equal(np.load(tmp_path / "eager.npy"), np.load(tmp_path / "compiled.npy"))
