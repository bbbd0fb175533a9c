"""The benchmarks' own instruments and arithmetic: the attention FLOPs counted on the CPU's fused
kernel (bench/model_bench.py), and bench/scale_bench.py's live tensor bytes counted op by op and
the micro-batch it advises when a step does not fit a GPU."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from model_bench import CPU_FLASH_FLOPS  # noqa: E402
from scale_bench import (  # noqa: E402
    GPU_MEMORY,
    HEADROOM,
    Activation,
    LiveTensorBytes,
    gpu_memory,
    largest_fitting_micro_batch,
)

from axial_transformer.model.attention import AxialSelfAttention  # noqa: E402

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
    assert attention_layer_flops(CPU_FLASH_FLOPS) == dense + attention
    # Without the entries for the CPU's fused kernel its attention goes uncounted.
    assert attention_layer_flops({}) == dense


def test_live_tensor_bytes_peak_counts_each_storage_while_alive():
    weights = torch.ones(1000)
    tensors = LiveTensorBytes([weights])
    with tensors:
        a = weights * 2  # 4,000 bytes
        view = a[:10]  # the same storage
        view.mul_(3)  # in place: still the same storage
        b = a + 1  # 8,000 alive
        del a, view
        c = torch.zeros(3000)  # b and c: 16,000 alive, the peak
        del b
        total = c.sum()  # 4 more bytes; b's 4,000 are gone
    # A tracker that missed the frees would end at 20,004; one that counted views, higher.
    assert (tensors.peak, tensors.now) == (16_000, 12_004)
    assert float(total) == 0


@pytest.mark.parametrize("gpus, per_image, expected", [
    (1, 10 * GiB, 4),     # 64 images: 4 + 2 + 10 m <= 76 GiB gives m <= 7; 4 divides 64
    (8, 10 * GiB, 4),     # 8 images, DDP's buckets add 1 GiB: m <= 6.9; 4 divides 8
    (1, 18 * GiB, 2),     # m <= 3.9 within the 76 GiB (without the headroom, 4 would fit)
    (64, 0.5 * GiB, 1),   # one image per GPU fits
    (1, 80 * GiB, None),  # not even one image fits
])
def test_micro_batch_is_the_largest_divisor_that_fits(gpus, per_image, expected):
    params, fixed = GiB // 4, 2 * GiB  # 16 bytes of states per parameter: 4 GiB
    step = Activation([(fixed, per_image)]).at
    assert largest_fitting_micro_batch(params, step, gpus, 64 // gpus) == expected
    if expected is not None:
        assert gpu_memory(params, step(expected), gpus) <= GPU_MEMORY - HEADROOM


def toy_step(batch: int) -> LiveTensorBytes:
    """A step whose peak moves with the batch, as gradient checkpointing's does: 4,000 bytes an
    image of activations, freed before 20,000 bytes of "gradients" and 400 bytes an image."""
    tensors = LiveTensorBytes([])
    with tensors:
        activations = torch.zeros(1000 * batch)
        del activations
        gradients = torch.zeros(5000)
        last = torch.zeros(100 * batch)
        del gradients, last
        torch.zeros(1)  # an op after the frees
    return tensors


def test_activation_from_traces_follows_the_peak_to_any_batch():
    one, two, ten = toy_step(1), toy_step(2), toy_step(10)
    assert (one.peak, two.peak, ten.peak) == (20_400, 20_800, 40_000)
    activation = Activation.from_traces(one.trace, 1, two.trace, 2)
    assert activation.at(10) == ten.peak
    # The line through the two peaks puts batch 10 at the gradients' op: 24,000 bytes.
    per_image = two.peak - one.peak
    assert one.peak + 9 * per_image == 24_000 != ten.peak
