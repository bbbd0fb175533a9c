"""The optimizer's and the random generators' state as tensors plus JSON, never as a pickle.

A pickle can run code or forge pointers when it is read, so a checkpoint holds only safetensors
and JSON: Adam's moments and step counts per parameter index (tensors) and its hyper-parameters
(JSON); each process's torch CPU and CUDA generator states (uint8 tensors) and Python's and
numpy's Mersenne Twisters (JSON). Everything read back is checked before it is used, flags
included (a seal is only a checksum, which anyone can recompute); a failed check raises a
ValueError that names the field and says what was expected.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import Tensor

from .config import OptimConfig


def adam(params, t: OptimConfig) -> torch.optim.Adam:
    """The run's optimizer: Adam as in the paper (no amsgrad), L2 weight decay."""
    return torch.optim.Adam(params, lr=t.lr, betas=(t.beta1, t.beta2),
                            weight_decay=t.weight_decay)


# The settings of a param group that are numbers, and what each must be (the learning rate is
# set anew at every step, and a cosine schedule ends at min_lr, maybe 0).
_NUMBERS = {"lr": "a finite number >= 0", "eps": "a positive finite number",
            "weight_decay": "a finite number >= 0", "betas": "two numbers in [0, 1)"}
# The rest are flags (amsgrad, capturable, fused, ...): a checkpoint's must be those of the Adam
# the run builds. torch gives a group that lacks one its default, which is the run's.
_FLAGS = {k: v for k, v in adam([torch.zeros(1)], OptimConfig()).defaults.items()
          if k not in _NUMBERS}
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _number(value, low: float, high: float = math.inf, open_low: bool = False) -> bool:
    """An int or float in [low, high), or (low, high); never NaN, for which comparisons fail."""
    return (type(value) in (int, float) and (low < value if open_low else low <= value)
            and value < high)


def optimizer_to_files(state_dict: dict) -> tuple[dict[str, Tensor], dict]:
    """An optimizer's `state_dict()` as tensors "INDEX.NAME" and a JSON-able rest."""
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": scalars}


def check_optimizer_json(info: dict, parameters: int) -> None:
    """Raise a ValueError unless `info` (the JSON half of `optimizer_to_files`) holds param groups
    of the run's Adam over the model's `parameters` parameters in order, each setting of its
    form, and a mapping of per-parameter settings."""
    groups = info.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ValueError(f"param_groups must be a list of mappings, got {groups!r}")
    for index, group in enumerate(groups):
        where = f"param_groups[{index}]"
        unknown = sorted(set(group) - set(_NUMBERS) - set(_FLAGS) - {"params"})
        missing = sorted({"params", *_NUMBERS} - set(group))
        if unknown or missing:
            what = f"a key {unknown[0]!r}" if unknown else f"no {missing[0]!r}"
            raise ValueError(f"{where} has {what}; expected the keys of torch's Adam: "
                             f"{', '.join(['params', *_NUMBERS, *_FLAGS])}")
        if not (isinstance(group["params"], list)
                and all(type(i) is int for i in group["params"])):
            raise ValueError(f"{where}.params must be a list of parameter indices, got "
                             f"{group['params']!r}")
        betas = group["betas"]
        checks = {"lr": _number(group["lr"], 0), "eps": _number(group["eps"], 0, open_low=True),
                  "weight_decay": _number(group["weight_decay"], 0),
                  "betas": isinstance(betas, list) and len(betas) == 2
                  and all(_number(b, 0, 1) for b in betas)}
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"{where}.{key} must be {_NUMBERS[key]}, got {group[key]!r}")
        for key, expected in _FLAGS.items():
            if key in group and not (type(group[key]) is type(expected)
                                     and group[key] == expected):
                shown = {None: "null", True: "true", False: "false"}.get(expected, expected)
                raise ValueError(f"{where}.{key} must be {shown} (the run's Adam), got "
                                 f"{group[key]!r}")
    indices = [i for g in groups for i in g["params"]]
    if indices != list(range(parameters)):
        raise ValueError(f"its param_groups hold {len(indices)} parameters, this model "
                         f"{parameters}")
    if not isinstance(info.get("state"), dict):
        raise ValueError(f"state must be a mapping, got {info.get('state')!r}")
    for index, entry in info["state"].items():
        if not (index.isdigit() and int(index) < parameters and isinstance(entry, dict)):
            raise ValueError(f"state entry {index!r} names no parameter of this model")


def optimizer_from_files(tensors: dict[str, Tensor], info: dict,
                         shapes: list[tuple[int, ...]]) -> dict:
    """The `state_dict()` that `optimizer_to_files` split, `info` checked already
    (`check_optimizer_json`), the tensors checked against the shapes of the model's parameters
    (in `model.parameters()` order)."""
    groups = [{**g, "betas": tuple(g["betas"])} for g in info["param_groups"]]  # as torch keeps
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(shapes) or not name:
            raise ValueError(f"tensor {key!r} names no parameter of this model")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"tensor {key} holds NaN or inf")
        state.setdefault(int(index), {})[name] = value
    for index, entry in info["state"].items():
        state.setdefault(int(index), {}).update(entry)
    for index, entry in state.items():  # Adam's: a step count >= 0 and two moments
        if sorted(entry) != sorted(("step", *_MOMENTS)):
            raise ValueError(f"the state of parameter {index} holds {sorted(entry)}, expected "
                             f"step, {', '.join(_MOMENTS)} (torch's Adam without amsgrad)")
        step = entry["step"]  # a scalar tensor, or a number as older torch kept it
        if isinstance(step, Tensor):
            step = step.item() if step.dim() == 0 and step.is_floating_point() else None
        if not _number(step, 0):
            raise ValueError(f"the step count of parameter {index} must be a finite number >= 0,"
                             f" got {entry['step']!r}")
        for name in _MOMENTS:
            if not (isinstance(entry[name], Tensor) and entry[name].is_floating_point()
                    and tuple(entry[name].shape) == shapes[index]):
                raise ValueError(f"{index}.{name} must be a floating-point tensor of its "
                                 f"parameter's shape {list(shapes[index])}")
        if (entry["exp_avg_sq"] < 0).any():
            raise ValueError(f"tensor {index}.exp_avg_sq holds negative values (a mean of "
                             "squares)")
    return {"state": state, "param_groups": groups}


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
        if "torch" not in tensors or any(k != "torch" and not k.startswith("cuda.")
                                         for k in tensors):
            raise ValueError(f"unexpected tensors {sorted(tensors)}")
        for name, value in tensors.items():
            if value.dtype != torch.uint8 or value.dim() != 1:
                raise ValueError(f"{name} is not a uint8 vector")
            if name == "torch" or torch.cuda.is_available():
                torch.Generator("cpu" if name == "torch" else "cuda").set_state(value)
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise ValueError(f"not a valid generator state ({type(e).__name__}: {e})") from None
    return {"python": python_state, "numpy": numpy_state, "torch": tensors}


def restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"]["torch"])
    cuda = [states["torch"][f"cuda.{i}"] for i in range(len(states["torch"]) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
