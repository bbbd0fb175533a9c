"""sample.py's argument checks and where it writes, through `sample_cli.main([...])` on a tiny
exported model."""

import errno
import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line, randomize_
from PIL import Image

from axial_transformer import AxialTransformer, AxialTransformerConfig, cpu_speedups
from axial_transformer.cli import sample as sample_cli
from axial_transformer.sampling import Request


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
    done = run_dir / "samples" / "completion_photo_k3_n2_seed0.npy"
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
        png = run_dir / "samples" / "sample_n2_seed5.png"
        assert code == 0 and f"-> {png}, {png.with_suffix('.npy')}" in out
        assert np.load(png.with_suffix(".npy")).shape == (2, 4, 3, 1)
        png.unlink()
        png.with_suffix(".npy").unlink()
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
    assert code == 0 and (tmp_path / "models" / "samples" / "sample_n1_seed0_t0.5.png").is_file()
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
    grid = conditional_export.parent / "samples" / "sample_class_all_n2_seed0_g2.npy"
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
    monkeypatch.setattr(sample_cli, "COMPILE_FLOOR_S", 0.0)  # compile however short the request
    args = ["--checkpoint", conditional_export, "--num-samples", 2, "--class", "dog",
            "--guidance", 1.5]
    run_sample(capsys, *args, "--out", tmp_path / "eager.png")
    code, out, _ = run_sample(capsys, *args, "--out", tmp_path / "compiled.png", "--compile")
    assert code == 0
    assert "compiling the decoding steps for batch size 2" in out
    assert "compiled in " in out and "eagerly" in out  # the compiled and the eager estimate
    assert np.array_equal(np.load(tmp_path / "eager.npy"), np.load(tmp_path / "compiled.npy"))


def timed_two_rows(monkeypatch, eager: float, compiled: float) -> list[int]:
    """Two-row timings that are given, eager and compiled seconds per call, for a request of
    10 images in batches of 4, 4 and 2 -> the list that counts the compiled calls."""
    calls = []

    def two_rows(model, request, n, compile):
        assert request.num_samples == 10 and n in (4, 2)
        if compile:
            calls.append(n)
        return compiled if compile else eager

    monkeypatch.setattr(sample_cli, "two_rows", two_rows)
    return calls


TIMED_MODEL = AxialTransformer(AxialTransformerConfig(
    image_size=(4, 3), channels=1, dim=8, heads=2, encoder_layers=2, outer_layers=2,
    inner_layers=1))


@pytest.mark.parametrize("eager, compiled, chosen, says", [
    (0.1, 0.01, False, "less than a compilation takes"),  # 4 rows x 2 sizes: 1.6 s, under the floor
    (10.0, 20.0, False, "no faster here"),  # compiled, measured slower: falls back
    (10.0, 1.0, True, "compiled against"),
])
def test_compile_only_when_it_pays(eager, compiled, chosen, says, capsys, monkeypatch):
    compiled_calls = timed_two_rows(monkeypatch, eager, compiled)
    request = Request(10, batch_size=4)
    assert sample_cli.choose_compiled(TIMED_MODEL, request) is chosen
    assert says in capsys.readouterr().out
    assert (len(compiled_calls) == 0) == (eager < 1)  # nothing compiled under the floor


def test_request_estimate_multiplies_out_two_rows(monkeypatch):
    timed_two_rows(monkeypatch, 0.5, 0.1)  # 0.5 s per two rows; 4 rows (1 channel) per batch
    estimate = sample_cli.estimate(TIMED_MODEL, Request(10, batch_size=4), compile=False)
    assert estimate == pytest.approx(3 * 0.5 * 4 / 2)


# ---------------------------------------------------------------------------------------------
# Outputs: named by what differs, never overwritten silently, checked before the compute.


def test_outputs_never_overwrite_each_other(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    samples = run_dir / "samples"
    commands = {  # a setting that changes the images changes the name
        "sample_n3_seed0.png": ["--num-samples", 3],
        "sample_n2_seed0.png": ["--num-samples", 2],
        "sample_n2_seed1.png": ["--num-samples", 2, "--seed", 1],
        "sample_n2_seed0_t0.8.png": ["--num-samples", 2, "--temperature", 0.8],
        "sample_n3_seed0_b2.png": ["--num-samples", 3, "--batch-size", 2],
    }
    for name, args in commands.items():
        code, out, _ = run_sample(capsys, "--checkpoint", run_dir, *args)
        assert code == 0 and f"-> {samples / name}," in out
    before = (samples / "sample_n2_seed0.npy").read_bytes()
    code, out, err = run_sample(capsys, "--checkpoint", run_dir, "--num-samples", 2,
                                "--batch-size", 7)  # one batch either way: the same images
    assert code == 2 and "sample_n2_seed0.png: exists already" in error_line(err)
    assert "per image" not in out  # refused before drawing anything
    assert (samples / "sample_n2_seed0.npy").read_bytes() == before
    code, out, _ = run_sample(capsys, "--checkpoint", run_dir, "--num-samples", 2, "--overwrite")
    assert code == 0 and (samples / "sample_n2_seed0.npy").read_bytes() == before
    for png in samples.glob("*.png"):
        png.unlink()
        png.with_suffix(".npy").unlink()


def test_grid_is_enlarged_and_per_image_pngs_hold_the_pixels(run_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, _, _ = run_sample(capsys, "--checkpoint", run_dir, "--num-samples", 5, "--per-image",
                            "--out", out)
    assert code == 0
    assert max(Image.open(out).size) >= 512  # 4 x 3 images, enlarged by nearest neighbour
    drawn = np.load(tmp_path / "grid.npy")
    files = sorted((tmp_path / "grid").iterdir())
    assert [f.name for f in files] == [f"{k:05d}.png" for k in range(5)]
    for image, file in zip(drawn, files, strict=True):
        assert np.array_equal(np.asarray(Image.open(file)), image[:, :, 0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid", "grid.npy", "grid.png"]


def test_class_rows_are_labelled(conditional_export, tmp_path, capsys):
    from axial_transformer.plots import image_grid

    args = ["--checkpoint", conditional_export, "--class", "all", "--num-samples", 2]
    run_sample(capsys, *args, "--out", tmp_path / "all.png")
    grid = np.asarray(Image.open(tmp_path / "all.png").convert("L"))
    drawn = torch.from_numpy(np.load(tmp_path / "all.npy")).permute(0, 3, 1, 2)
    bare = np.asarray(image_grid(drawn, 2).convert("L"))
    margin = grid.shape[1] - bare.shape[1]
    assert grid.shape[0] == bare.shape[0] and margin > 0
    assert np.array_equal(grid[:, margin:], bare)  # the images, right of the labels
    for k in range(3):  # text in each class's row of the margin
        band = grid[k * grid.shape[0] // 3:(k + 1) * grid.shape[0] // 3, :margin]
        assert (band < 128).any(), k


def test_class_names_make_safe_file_names_and_match_in_any_case(tmp_path, capsys):
    config = AxialTransformerConfig(image_size=(4, 3), channels=1, dim=8, heads=2,
                                    encoder_layers=2, outer_layers=2, inner_layers=1,
                                    num_classes=4,
                                    class_names=["T-shirt/top", "Sneaker", "bag", "Bag"])
    export = tmp_path / "run" / "export"
    AxialTransformer(config).save_pretrained(export)
    samples = tmp_path / "run" / "samples"
    code, out, _ = run_sample(capsys, "--checkpoint", export, "--class", "T-shirt/top",
                              "--num-samples", 1)
    assert code == 0 and sorted(p.name for p in samples.iterdir()) == [
        "sample_class_T-shirt_top_n1_seed0.npy", "sample_class_T-shirt_top_n1_seed0.png"]
    code, out, _ = run_sample(capsys, "--checkpoint", export, "--class", "sneaker",
                              "--num-samples", 1)
    assert code == 0 and "sample_class_Sneaker_n1_seed0.png" in out
    code, _, err = run_sample(capsys, "--checkpoint", export, "--class", "BAG")
    assert code == 2 and "--class BAG: matches bag, Bag but for case" in error_line(err)
    assert sample_cli.class_labels("bag", config) == [2]  # exact first
    assert sample_cli.class_labels("Bag", config) == [3]


def rgb_run(directory: Path) -> Path:
    config = AxialTransformerConfig(image_size=(4, 3), channels=3, dim=8, heads=2,
                                    encoder_layers=2, outer_layers=2, inner_layers=1)
    AxialTransformer(config).save_pretrained(directory / "export")
    return directory


def test_complete_resizes_and_warns_at_run_time(run_dir, tmp_path, capsys):
    Image.fromarray(np.full((8, 6), 90, np.uint8)).save(tmp_path / "big.png")
    complete = ["--complete", tmp_path / "big.png", "--rows-given", 2, "--num-samples", 1]
    code, _, err = run_sample(capsys, "--checkpoint", run_dir, *complete, "--out",
                              tmp_path / "a.png")
    assert code == 2 and "4x3" in error_line(err)
    code, _, err = run_sample(capsys, "--checkpoint", run_dir, *complete, "--resize", "--out",
                              tmp_path / "a.png")
    assert code == 0 and err.count("approximate") == 0  # one channel: exact, no warning
    assert (np.load(tmp_path / "a.npy")[0, :2] == 90).all()
    rgb = rgb_run(tmp_path / "rgb")
    Image.fromarray(np.full((8, 6, 3), 90, np.uint8)).save(tmp_path / "big_rgb.png")
    code, _, err = run_sample(capsys, "--checkpoint", rgb, "--complete", tmp_path / "big_rgb.png",
                              "--rows-given", 2, "--num-samples", 1, "--resize")
    assert code == 0 and "warning: Completion of an RGB image is approximate" in err
    code, _, err = run_sample(capsys, "--checkpoint", run_dir, "--resize")
    assert code == 2 and "--resize" in error_line(err)


def test_unwritable_outputs_are_refused_before_the_compute(run_dir, tmp_path, capsys,
                                                           monkeypatch):
    def no_drawing(*args, **kwargs):
        raise AssertionError("sampled before the output was checked")

    monkeypatch.setattr(sample_cli, "draw", no_drawing)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file").write_text("")
    cases = [
        (tmp_path / "folder.png", "an existing folder; expected a file name"),
        (tmp_path / "file" / "grid.png", f"{tmp_path / 'file'} is a file, not a folder"),
    ]
    for out, message in cases:
        code, _, err = run_sample(capsys, "--checkpoint", run_dir, "--out", out)
        assert code == 2 and message in error_line(err), out
    from axial_transformer.cli import common

    monkeypatch.setattr(common.shutil, "disk_usage", lambda path: type("U", (), {"free": 10}))
    code, _, err = run_sample(capsys, "--checkpoint", run_dir, "--out", tmp_path / "g.png")
    assert code == 2 and "has 10 bytes free" in error_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(run_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run_sample(capsys, "--checkpoint", run_dir, "--out", locked / "g.png")
    assert code == 2 and "cannot write into" in error_line(err)


def test_a_failed_write_comes_after_the_figures(run_dir, tmp_path, capsys, monkeypatch):
    import axial_transformer.files

    def full_disk(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(axial_transformer.files, "atomic_write", full_disk)
    code, out, err = run_sample(capsys, "--checkpoint", run_dir, "--num-samples", 2, "--out",
                                tmp_path / "g.png")
    assert code == 2 and "2 images of 1x4x3 in" in out  # the figures were printed
    assert err.strip().splitlines()[-1] == (f"error: could not write {tmp_path / 'g.png'}: No "
                                            "space left on device")  # after the progress bar
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_set_of_outputs_is_written_whole_or_not_at_all(run_dir, tmp_path, capsys,
                                                         monkeypatch):
    import axial_transformer.files

    write = axial_transformer.files.atomic_write

    def full_at_the_array(path, writer):
        if Path(path).suffix == ".npy":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{path}.tmp")
        write(path, writer)

    monkeypatch.setattr(axial_transformer.files, "atomic_write", full_at_the_array)
    code, _, err = run_sample(capsys, "--checkpoint", run_dir, "--num-samples", 2, "--out",
                              tmp_path / "g.png", "--per-image")
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: could not write {tmp_path / 'g.npy'}: No space left on device")
    assert list(tmp_path.iterdir()) == []  # the grid written before it is gone again


# ---------------------------------------------------------------------------------------------
# Checkpoints that are not what they seem, and the help.


def test_damaged_run_config_is_one_line_and_runs_nothing(tmp_path, capsys):
    sentinel = tmp_path / "ran"
    contents = {
        "parse": "model: [unclosed\n",
        "tag": f"model: !!python/object/apply:os.system ['touch {sentinel}']\n",
    }
    for name, text in contents.items():
        run = export_tiny_model(tmp_path / name / "export").parent
        (run / "config.yaml").write_text(text)
        code, _, err = run_sample(capsys, "--checkpoint", run)
        assert code == 2 and f"error: {run / 'config.yaml'}: not a run config" in error_line(err)
    assert not sentinel.exists()


def test_mistyped_local_path_is_missing_at_once(run_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("asked the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr("axial_transformer.hub.hf_hub_download", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "ref").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    for checkpoint, message in [("runs/reff", "runs/reff does not exist (did you mean runs/ref?)"),
                                ("data/model", "data/model does not exist"),
                                ("runs/other", "runs/other does not exist")]:
        code, _, err = run_sample(capsys, "--checkpoint", checkpoint)
        assert code == 2 and error_line(err) == f"error: {message}"
    assert not sample_cli.Path("someone").exists()
    from axial_transformer.hub import is_hub_id

    assert is_hub_id("someone/axial-tiny") and not is_hub_id("runs/reff")
    assert not is_hub_id("data/model")  # data/ is a folder here


def test_run_without_an_export_says_so(tmp_path, capsys):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.yaml").write_text("run_dir: fresh\n")
    code, _, err = run_sample(capsys, "--checkpoint", run)
    assert code == 2 and "a run with no export yet" in error_line(err)


def test_every_option_has_help():
    parser = sample_cli.build_parser()
    assert all(action.help for action in parser._actions), [
        action.dest for action in parser._actions if not action.help]
