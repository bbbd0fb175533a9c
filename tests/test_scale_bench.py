"""bench/scale_bench.py's own arithmetic: the attention FLOPs it counts on the CPU's fused kernel,
and the micro-batch it advises when a step does not fit a GPU."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from scale_cases import CPU_ATTENTION_FLOPS  # noqa: E402
from scale_plan import GPU_MEMORY, HEADROOM, gpu_memory, largest_fitting_micro_batch  # noqa: E402

from axial_transformer.attention import AxialSelfAttention  # noqa: E402

GiB = 2**30


def attention_layer_flops(custom_mapping: dict) -> int:
    """Forward and backward of a masked row-attention layer through SDPA: x [1, 4, 8, 32]."""
    layer = AxialSelfAttention(32, 4, "row", causal=True, path="sdpa")
    x = torch.randn(1, 4, 8, 32, requires_grad=True)
    counter = FlopCounterMode(display=False, custom_mapping=custom_mapping)
    with counter:
        layer(x).sum().backward()
    return counter.get_total_flops()


def test_attention_flops_count_the_causal_pairs():
    tokens, dim, heads, length = 4 * 8, 32, 4, 8
    rows, head_dim = 4, dim // heads
    # Forward, input gradient and weight gradient of the fused q, k, v and output projections.
    dense = 3 * 2 * tokens * dim * (3 * dim + dim)
    # q k^T and p v over the t(t+1)/2 pairs on and below the diagonal; the backward twice that.
    attention = 3 * 2 * 2 * rows * heads * head_dim * length * (length + 1) // 2
    assert attention_layer_flops(CPU_ATTENTION_FLOPS) == dense + attention
    # Without the entries for the CPU's fused kernel its attention goes uncounted.
    assert attention_layer_flops({}) == dense


@pytest.mark.parametrize("gpus, per_image, expected", [
    (1, 10 * GiB, 4),     # 64 images: 4 + 2 + 10 m <= 76 GiB gives m <= 7; 4 divides 64
    (8, 10 * GiB, 4),     # 8 images, DDP's buckets add 1 GiB: m <= 6.9; 4 divides 8
    (64, 0.5 * GiB, 1),   # one image per GPU fits
    (1, 80 * GiB, None),  # not even one image fits
])
def test_micro_batch_is_the_largest_divisor_that_fits(gpus, per_image, expected):
    params, fixed = GiB // 4, 2 * GiB  # 16 bytes of states per parameter: 4 GiB
    assert largest_fitting_micro_batch(params, fixed, per_image, gpus, 64 // gpus) == expected
    if expected is not None:
        assert gpu_memory(params, fixed, per_image, gpus, expected) <= GPU_MEMORY - HEADROOM
