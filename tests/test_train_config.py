"""The run config: YAML presets, dotted overrides, and clear errors for bad keys and types."""

import re
from pathlib import Path

import pytest
import yaml

from axial_transformer.model.config import PRESETS
from axial_transformer.training.config import RunConfig, config_from_dict, load_config, save_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_overrides_set_typed_values():
    cfg = load_config(None, ["train.lr=1e-3", "model.image_size=[8, 12]", "train.compile=true",
                             "train.schedule=cosine", "run_dir=runs/x", "data.spec=123",
                             "model.image_size=16"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.model.image_size == (16, 16)  # the later override wins; an int means square
    assert cfg.train.compile is True and cfg.train.schedule == "cosine"
    assert cfg.data.spec == "123"  # strings are taken verbatim, not parsed as YAML numbers
    assert cfg.run_dir == "runs/x"


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("nosuch.key=1", "unknown config key 'nosuch'"),
    ("train.lr.x=1", "train.lr: expected float, got {'x': '1'}"),
    ("model=3", "model: expected a mapping of keys, got '3'"),
    ("model.gradient_checkpointing=true", "(now train.gradient_checkpointing)"),
    ("train.lr=fast", "train.lr: expected float"),
    ("train.steps=1.5", "train.steps: expected int"),
    ("train.compile=1", "train.compile: expected bool"),
    ("train.schedule=linear", "train.schedule: expected 'constant' | 'cosine'"),
    ("model.image_size=[1, 2, 3]", "model.image_size: expected tuple[int, int]"),
    ("model.outer_layers=3", "outer_layers must be a positive even number"),
    ("model.encoder_layers=5", "encoder_layers must be a positive even number"),
    ("train.steps=0", "train.steps must be at least 1"),
    ("train.ema_decay=1.0", "train.ema_decay must be in [0, 1)"),
    ("steps", "not of the form section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [override])


def test_bad_yaml_keys_are_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 10\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown config key 'train.learning_rate'"):
        load_config(path)
    path.write_text("train:\n  steps: ten\n")
    with pytest.raises(ValueError, match="train.steps: expected int, got 'ten'"):
        load_config(path)
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    save_config(cfg, tmp_path / "config.yaml")
    assert config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg


@pytest.mark.parametrize("name", ["imagenet32", "imagenet64"])
def test_paper_configs_match_the_paper(name):
    """The official models and recipe (official config_imagenet32.py, config_imagenet64.py)."""
    cfg = load_config(CONFIGS / f"{name}.yaml")
    preset = PRESETS[name]
    assert cfg.model.image_size == preset["image_size"]
    for key in ("dim", "heads", "encoder_layers", "outer_layers", "inner_layers", "dropout"):
        assert getattr(cfg.model, key) == preset[key], key
    t = cfg.train
    assert (t.beta1, t.beta2, t.warmup_steps, t.schedule, t.grad_clip, t.ema_decay,
            t.batch_size, t.objective) == (0.9, 0.999, 5000, "constant", 1.0, 0.99995, 64,
                                           "random")
    assert t.lr == {"imagenet32": 1e-4, "imagenet64": 2e-4}[name]
    assert cfg.train.gradient_checkpointing == (name == "imagenet64")


def test_defaults_are_valid():
    assert RunConfig().train.objective == "random"


def test_a_saved_config_of_an_older_version_loads():
    """Older versions saved two run-time choices with the model (now train.gradient_checkpointing
    and AxialTransformer.set_attention) and a `debug` section of test hooks (now in the tests):
    a run's config.yaml holding them still loads, for a resume. Given as a run's --config or
    override, a debug key is unknown."""
    tree = RunConfig().to_dict()
    tree["model"].update(gradient_checkpointing=True, attention="matmul")
    tree["debug"] = {"rank": -1, "kill_at_step": 0, "nan_at_steps": [], "free_bytes": -1}
    assert config_from_dict(tree) == RunConfig()
    with pytest.raises(ValueError, match="unknown config key 'debug'"):
        load_config(None, ["debug.rank=1"])
    tree["model"]["attention"] = "fast"
    with pytest.raises(ValueError, match="model: attention must be one of auto, sdpa, matmul"):
        config_from_dict(tree)
