"""The optimizer's and the random generators' state as tensors plus JSON, never as a pickle.

A pickle can run code or forge pointers when it is read, so a checkpoint holds only safetensors
(tensors behind a JSON header) and JSON. Adam's state is its moments and step count per
parameter index (tensors) and its hyper-parameters (JSON). Each process's random generators are
torch's CPU and CUDA states (uint8 tensors) and Python's and numpy's Mersenne Twisters (JSON).
Everything read back is checked before it is used; a failed check raises a ValueError that says
what is wrong.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Optimizer: state["state"][i][name] -> tensor "i.name"; the rest as JSON.


def optimizer_to_files(state_dict: dict) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer's `state_dict()` into tensors and a JSON-able rest."""
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": scalars}


def optimizer_from_files(
    tensors: dict[str, Tensor], info: dict, shapes: list[tuple[int, ...]]
) -> dict:
    """The optimizer `state_dict()` that `optimizer_to_files` split, checked against the shapes
    of the model's parameters (in `model.parameters()` order)."""
    try:
        return _optimizer_state(tensors, info, shapes)
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"not an optimizer state ({type(e).__name__}: {e})") from None


def _optimizer_state(tensors: dict[str, Tensor], info: dict, shapes: list[tuple[int, ...]]):
    groups = info["param_groups"]
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ValueError("param_groups is not a list of mappings")
    indices = [i for g in groups for i in g["params"]]
    if indices != list(range(len(shapes))):
        raise ValueError(f"its param_groups hold {len(indices)} parameters, this model "
                         f"{len(shapes)}")
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])  # JSON has no tuples; torch's Adam keeps one
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(shapes) or not name:
            raise ValueError(f"tensor {key!r} names no parameter of this model")
        if value.dim() > 0 and tuple(value.shape) != shapes[int(index)]:
            raise ValueError(f"tensor {key} has shape {list(value.shape)}, its parameter "
                             f"{list(shapes[int(index)])}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"tensor {key} holds NaN or inf")
        state.setdefault(int(index), {})[name] = value
    for index, entry in info["state"].items():
        if not (index.isdigit() and int(index) < len(shapes) and isinstance(entry, dict)):
            raise ValueError(f"state entry {index!r} names no parameter of this model")
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------
# Random generators of one process.


def rng_to_files() -> tuple[dict[str, Tensor], dict]:
    """This process's generator states: torch's as tensors, Python's and numpy's as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return tensors, {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss,
                  "cached_gaussian": cached_gaussian},
    }


def rng_from_files(tensors: dict[str, Tensor], info: dict) -> dict:
    """Checked generator states, ready for `restore_rng`: each is tried on a scratch generator,
    which validates it as the real one would."""
    try:
        python, numpy_state = info["python"], info["numpy"]
        python_state = (python["version"], tuple(python["state"]), python["gauss_next"])
        random.Random().setstate(python_state)
        numpy_state = ("MT19937", np.array(numpy_state["keys"], dtype=np.uint32),
                       numpy_state["pos"], numpy_state["has_gauss"],
                       numpy_state["cached_gaussian"])
        np.random.RandomState().set_state(numpy_state)
        torch_states = {k: v for k, v in tensors.items() if k == "torch" or k.startswith("cuda.")}
        if set(torch_states) != set(tensors) or "torch" not in torch_states:
            raise ValueError(f"unexpected tensors {sorted(tensors)}")
        for name, value in torch_states.items():
            if value.dtype != torch.uint8 or value.dim() != 1:
                raise ValueError(f"{name} is not a uint8 vector")
        torch.Generator().set_state(torch_states["torch"])
        if torch.cuda.is_available():
            for name in torch_states.keys() - {"torch"}:
                torch.Generator("cuda").set_state(torch_states[name])
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise ValueError(f"not a valid generator state ({type(e).__name__}: {e})") from None
    return {"python": python_state, "numpy": numpy_state, "torch": torch_states}


def restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"]["torch"])
    cuda = [states["torch"][f"cuda.{i}"] for i in range(len(states["torch"]) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
