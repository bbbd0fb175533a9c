"""keep_freed_memory: large CPU tensors freed and allocated again reuse their pages."""

import subprocess
import sys

import pytest

FAULTS = """
import resource, sys, torch
from axial_transformer.cpu_speedups import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
x = torch.ones(10 * 2**20)  # 40 MB: above glibc's largest mmap threshold (32 MB)


def step():  # activations allocated, written and freed, as in a training step
    a, b = x.clone(), x.clone()
    del a, b


for _ in range(20):  # the heap grows until it holds a step's blocks in reusable places
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def minor_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_tensors_reuse_their_pages():
    applied, faults = minor_faults("keep")
    assert applied == "True"
    assert faults < 1_000
    # Negative control: with glibc's defaults every 40 MB copy faults its 10,240 pages in again.
    _, default_faults = minor_faults("default")
    assert default_faults > 10 * 2 * 10_000
