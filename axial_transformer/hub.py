"""Saving and loading trained models: config.json + model.safetensors (+ a model card), locally
or on the Hugging Face Hub, through huggingface_hub's PyTorch mixin.

    model.save_pretrained("runs/demo/export")
    model = AxialTransformer.from_pretrained("runs/demo/export")      # or "user/axial-in32"
    model.push_to_hub("user/axial-in32")
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download

from .files import atomic_write_text, check_shapes, read_tensors, write_safetensors
from .model.config import AxialTransformerConfig

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
# owner/name, as the Hub spells repository ids.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Far above the few hundred bytes of a config.json written by save_pretrained.
MAX_CONFIG_BYTES = 2**16


def is_hub_id(source: str) -> bool:
    """owner/name, not on disk, and the owner neither `runs` nor a folder here: a mistyped
    `runs/reff` is reported missing at once instead of tried on the network."""
    if Path(source).exists() or not REPO_ID.match(source):
        return False
    owner = source.split("/")[0]
    return owner != "runs" and not Path(owner).is_dir()


MODEL_CARD = """---
{{ card_data }}
---

# Axial Transformer

An autoregressive image density model: the Axial Transformer of Ho, Kalchbrenner, Weissenborn
and Salimans, "Axial Attention in Multidimensional Transformers" ({{ paper_url }}).

```python
from axial_transformer import AxialTransformer

model = AxialTransformer.from_pretrained("{{ source }}")
images = model.sample(16)  # uint8 [16, C, H, W]
```
"""


class HubMixin(
    PyTorchModelHubMixin,
    library_name="axial-transformer",
    license="mit",
    paper_url="https://arxiv.org/abs/1912.12180",
    tags=["image-generation", "density-estimation", "axial-attention"],
    model_card_template=MODEL_CARD,
):
    config: AxialTransformerConfig

    def save_pretrained(  # type: ignore[override]
        self, save_directory: str | Path, *, config: dict | None = None,
        repo_id: str | None = None, push_to_hub: bool = False,
        model_card_kwargs: dict | None = None, **push_to_hub_kwargs,
    ) -> str | None:
        """config.json, model.safetensors and (unless there is one) a README.md model card, each
        written atomically. `config` is ignored (the mixin passes it): the model's own is saved."""
        directory = Path(save_directory)
        write_safetensors(directory / WEIGHTS, self.state_dict())
        atomic_write_text(directory / CONFIG, json.dumps(self.config.to_dict(), indent=2))
        if not (directory / CARD).exists():
            card_kwargs = {"source": repo_id or str(directory), **(model_card_kwargs or {})}
            atomic_write_text(directory / CARD, str(self.generate_model_card(**card_kwargs)))
        if push_to_hub:
            return self.push_to_hub(repo_id or directory.name,
                                    model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
        return None

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: dict | None = None, **kwargs):
        card_kwargs = {"source": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card_kwargs, **kwargs)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str | Path, *, revision: str | None = None,
        cache_dir: str | Path | None = None, force_download: bool = False,
        local_files_only: bool = False, token: str | bool | None = None,
        map_location: str | torch.device = "cpu",
    ):
        """A model in eval mode from a directory written by `save_pretrained` or a Hub repository
        id ("owner/name"). The weights file bounds what a config.json can make us allocate: the
        model's tensors are laid out on the meta device and checked against the safetensors
        header before the model itself is built."""
        source = str(pretrained_model_name_or_path)
        if Path(source).is_dir():
            config_file, weights = Path(source) / CONFIG, Path(source) / WEIGHTS
            for file in (config_file, weights):
                if not file.is_file():
                    raise FileNotFoundError(f"{file} not found: expected a directory written by "
                                            "AxialTransformer.save_pretrained")
        elif is_hub_id(source):
            config_file, weights = (
                Path(hf_hub_download(source, name, revision=revision, cache_dir=cache_dir,
                                     force_download=force_download,
                                     local_files_only=local_files_only, token=token))
                for name in (CONFIG, WEIGHTS)
            )
        else:
            raise FileNotFoundError(f"{source}: no such directory, and not a Hub repository id "
                                    "(owner/name)")
        config = read_config(config_file, f"{source}/{CONFIG}")
        model_class = cls.model_class_for(config)
        check_shapes(weights, model_class.parameter_shapes(config))
        model = model_class(config)
        try:
            model.load_state_dict(read_tensors(weights))
        except ValueError as e:
            raise ValueError(f"{weights}: {e}") from None
        return model.to(map_location).eval()

    @classmethod
    def model_class_for(cls, config: AxialTransformerConfig) -> type:
        """The class to build for a saved config (a ValueError if this class cannot load it)."""
        return cls

    @classmethod
    def parameter_shapes(cls, config: AxialTransformerConfig) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}


def read_config(file: Path, name: str) -> AxialTransformerConfig:
    """The model config of a config.json; a file too large, not JSON, nested too deeply or of
    the wrong form is a ValueError naming it."""
    size = file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{name}: {size:,} bytes; a config.json of model settings is a few "
                         f"hundred (at most {MAX_CONFIG_BYTES:,})")
    try:
        values = json.loads(file.read_bytes())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{name}: not a JSON object of model settings "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{name}: expected a JSON object of model settings, got "
                         f"{type(values).__name__}")
    return AxialTransformerConfig.from_dict(values, name)

