"""Saving and loading trained models: a directory of config.json + model.safetensors (+ a model
card), locally or on the Hugging Face Hub, through huggingface_hub's PyTorch mixin.

    model.save_pretrained("runs/demo/export")
    model = AxialTransformer.from_pretrained("runs/demo/export")      # or "user/axial-in32"
    model.push_to_hub("user/axial-in32")

Weights are read only from safetensors (never a pickle), every tensor's shape is checked against
the config before loading, and files are written atomically.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download

from .config import AxialTransformerConfig
from .io import atomic_write_text, write_safetensors
from .tensor_files import check_shapes, read_tensors

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
# owner/name, as the Hub spells repository ids.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(source: str) -> bool:
    """Whether `source` names a Hub repository rather than a local path: it has the owner/name
    form, is not on disk, and its owner is neither `runs` nor a folder here, so that a mistyped
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
    """`save_pretrained`, `from_pretrained` and `push_to_hub` for AxialTransformer."""

    config: AxialTransformerConfig

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | Path,
        *,
        config: dict | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict | None = None,
        **push_to_hub_kwargs,
    ) -> str | None:
        """Write config.json, model.safetensors and (unless there is one) a README.md model
        card into `save_directory`, each atomically: a reader sees the old file or the new one.
        With `push_to_hub=True` also upload them (`push_to_hub`). `config` is accepted for the
        mixin's sake and ignored: the model's own config is what gets saved."""
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
        """Upload config.json, model.safetensors and the model card to the Hub repository
        `repo_id` (huggingface_hub's `push_to_hub`: `private`, `token`, `commit_message`, ...)."""
        card_kwargs = {"source": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card_kwargs, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs):
        """A model in eval mode from a local directory written by `save_pretrained`, or from a
        Hub repository id ("owner/name"; downloaded once into the Hugging Face cache).
        `map_location` (default "cpu") places the weights."""
        source = str(pretrained_model_name_or_path)
        if not Path(source).is_dir() and not is_hub_id(source):
            raise FileNotFoundError(f"{source}: no such directory, and not a Hub repository id "
                                    "(owner/name)")
        return super().from_pretrained(source, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        map_location: str | torch.device = "cpu",
        config: dict | None = None,
        **unused,
    ):
        local = Path(model_id).is_dir()
        if local:
            weights = Path(model_id) / WEIGHTS
            for file in (Path(model_id) / CONFIG, weights):
                if not file.is_file():
                    raise FileNotFoundError(f"{file} not found: expected a directory written by "
                                            "AxialTransformer.save_pretrained")
        else:
            weights = Path(hf_hub_download(model_id, WEIGHTS, revision=revision,
                                           cache_dir=cache_dir, force_download=force_download,
                                           local_files_only=local_files_only, token=token))
        if not isinstance(config, dict):
            raise ValueError(f"{model_id}: {CONFIG} is missing or not a JSON object of model "
                             "settings")
        model = cls(AxialTransformerConfig.from_dict(config, f"{model_id}/{CONFIG}"))
        load_weights(model, weights)
        return model.to(map_location).eval()


def load_weights(model: torch.nn.Module, file: Path) -> None:
    """Load a safetensors file whose every tensor must match the model's, and hold finite values:
    otherwise a ValueError that names the first parameter that does not."""
    check_shapes(file, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    try:
        model.load_state_dict(read_tensors(file))
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
