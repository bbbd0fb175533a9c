"""Saving and loading models: local export directories and Hub repository ids, offline."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_

from axial_transformer import AxialTransformer, AxialTransformerConfig

ROOT = Path(__file__).resolve().parents[1]


def tiny(**overrides) -> AxialTransformerConfig:
    kw = dict(image_size=(5, 7), channels=1, dim=16, heads=2,
              encoder_layers=2, outer_layers=2, inner_layers=2)
    return AxialTransformerConfig(**{**kw, **overrides})


@pytest.fixture
def export(tmp_path):
    model = randomize_(AxialTransformer(tiny()), std=0.1).eval()
    model.save_pretrained(tmp_path / "export")
    return model, tmp_path / "export"


def test_save_and_load_pretrained(export):
    model, directory = export
    loaded = AxialTransformer.from_pretrained(directory)
    assert loaded.config == model.config and not loaded.training
    x = torch.randint(0, 256, (2, 1, 5, 7))
    assert torch.equal(model(x), loaded(x))
    assert sorted(p.name for p in directory.iterdir()) == [
        "README.md", "config.json", "model.safetensors"]
    assert 'from_pretrained("' + str(directory) + '")' in (directory / "README.md").read_text()


def hub_cache(directory, cache):
    """The Hub's cache layout (models--owner--name/snapshots/REV), as a download of
    someone/axial-tiny leaves it."""
    snapshot = cache / "models--someone--axial-tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(directory, snapshot)
    (cache / "models--someone--axial-tiny" / "refs").mkdir()
    (cache / "models--someone--axial-tiny" / "refs" / "main").write_text("0" * 40)
    return cache


def test_a_hub_repository_id_loads_from_the_cache(export, tmp_path):
    # With local_files_only nothing reaches the network.
    model, directory = export
    cache = hub_cache(directory, tmp_path / "hub")
    loaded = AxialTransformer.from_pretrained("someone/axial-tiny", cache_dir=cache,
                                              local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 loaded.state_dict().values(), strict=True))


def test_what_is_not_a_model_is_refused_in_one_line(export, tmp_path):
    _, directory = export
    with pytest.raises(FileNotFoundError, match="no such directory"):
        AxialTransformer.from_pretrained(tmp_path / "nowhere" / "deeper")
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        AxialTransformer.from_pretrained(directory)


def test_config_with_an_unknown_key_names_it(export):
    _, directory = export
    config = json.loads((directory / "config.json").read_text())
    config["heads_count"] = 3
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown model setting 'heads_count'.*'heads'"):
        AxialTransformer.from_pretrained(directory)


def test_weights_that_disagree_with_the_config_are_named(export):
    _, directory = export
    config = json.loads((directory / "config.json").read_text())
    config["dim"] = 32
    (directory / "config.json").write_text(json.dumps(config))
    expected = r"parameter pos_h has shape \[5, 1, 16\], this model expects \[5, 1, 32\]"
    with pytest.raises(ValueError, match=expected) as e:
        AxialTransformer.from_pretrained(directory)
    assert "\n" not in str(e.value)


def test_nonfinite_weights_are_refused(tmp_path):
    model = AxialTransformer(tiny())
    with torch.no_grad():
        model.to_logits.bias[3] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="to_logits.bias holds NaN"):
        AxialTransformer.from_pretrained(tmp_path)


def test_sample_and_evaluate_take_a_hub_repository_id(export, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from axial_transformer.training.checkpoint import load_trained_model

    model, directory = export
    cache = hub_cache(directory, tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    loaded, run_config = load_trained_model("someone/axial-tiny")  # what evaluate.py calls
    assert run_config is None and loaded.config == model.config
    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
    sample_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_cli)
    monkeypatch.chdir(tmp_path)
    assert sample_cli.main(["--checkpoint", "someone/axial-tiny", "--num-samples", "2",
                            "--device", "cpu"]) == 0
    drawn = np.load(tmp_path / "samples" / "someone--axial-tiny" / "sample_n2_seed0.npy")
    assert drawn.shape == (2, 5, 7, 1)
