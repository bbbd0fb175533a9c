"""What the install promises: the floor environment holds exactly pyproject.toml's lower bounds,
and wandb is an optional extra that a run asks for by name."""

import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import pytest
from conftest import error_line
from test_train import ENV, ROOT, run_args


def floors() -> dict[str, str]:
    """pyproject.toml's lower bounds, as .ci/floors.py prints them for CI's floor environment."""
    done = subprocess.run([sys.executable, str(ROOT / ".ci" / "floors.py")], capture_output=True,
                          text=True, check=True)
    return dict(line.split("==") for line in done.stdout.split())


def off_floor(wanted: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name, installed, floor) of every package not installed at its floor."""
    off = []
    for name, floor in wanted.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed.split("+")[0] != floor:
            off.append((name, installed, floor))
    return off


def test_every_requirement_has_a_floor():
    wanted = floors()
    assert {"torch", "accelerate", "numpy", "pytest"} <= wanted.keys()
    assert "wandb" not in wanted  # an extra, not installed by the suite's environments


@pytest.mark.skipif(os.environ.get("FLOOR_ENVIRONMENT") != "1",
                    reason="CI's floor environment only (.ci/run sets FLOOR_ENVIRONMENT=1)")
def test_the_floor_environment_holds_exactly_the_floors():
    assert off_floor(floors()) == []


def test_a_package_above_its_floor_is_reported():
    """Negative control of the check above: a floor below what is installed is caught."""
    installed = version("pytest")
    assert off_floor({"pytest": "0.0.1"}) == [("pytest", installed, "0.0.1")]


def test_wandb_asked_for_without_it_installed_is_one_clear_line(data_dir, tmp_path):
    """Accelerate drops a tracker whose package is missing without a word; the run refuses."""
    hidden = ("import sys; sys.modules['wandb'] = None; sys.argv[0] = 'train.py'; "
              "import train; sys.exit(train.main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", hidden,
                           *run_args(data_dir, tmp_path / "run", "log.wandb=true")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = error_line(done.stderr.strip().splitlines()[-1])
    assert "wandb" in line and "not installed" in line and ".[wandb]" in line
