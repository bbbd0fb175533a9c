import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")

# pytest-xdist runs the tests in one worker per core: a second thread in a worker would only
# contend with the other workers for the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def randomize_(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Draw every parameter from N(0, std^2).

    At the official init every residual branch and the logits layer are ~1e-5, so the logits
    barely depend on the input and causality or cache-parity checks would pass on a broken model
    (official init, variance scale 1e-10). Property tests run on randomised weights instead.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def error_line(err: str) -> str:
    """A command line's stderr when it refuses: one `error: ...` line, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, lines
    return lines[0]


@pytest.fixture(params=["matmul", "sdpa", "chunked-sdpa"])
def attention_path(request, monkeypatch) -> str:
    """Each way the model computes attention (`AxialTransformer.set_attention`): plain matmuls,
    SDPA (what "auto" takes), and SDPA with the folded batch split into pieces (as
    CUDA's grid limit makes it at large batches) small enough to split every call here."""
    if request.param == "chunked-sdpa":
        from axial_transformer.model import attention

        monkeypatch.setattr(attention, "MAX_FOLDED_BATCH", 3)
        return "sdpa"
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cpu_without_fast_bf16(monkeypatch):
    """Every test sees a CPU without fast bf16, so that precision "auto" (and the sampler's
    default) picks fp32 on any machine; test_precision.py sets other CPUs itself."""
    from axial_transformer import precision

    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.2)


def structured_images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: learnable in a few steps, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, w)[None, None, :, None] * rng.uniform(0.5, 1, (n, 1, 1, 3))
    noise = rng.integers(0, 40, (n, h, w, 3))
    return (ramp + noise).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """40 training images and 13 test images of 6 x 7: 13 is not a multiple of any batch."""
    root = tmp_path_factory.mktemp("data")
    np.save(root / "train.npy", structured_images(40, 6, 7, seed=0))
    np.save(root / "test.npy", structured_images(13, 6, 7, seed=1))
    return root
