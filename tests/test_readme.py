"""The README's examples (and those of the docs a user copies from) run as written."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("page", ["README.md", "docs/sampling.md", "docs/layers.md"])
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a clean clone has no runs/: a block must not lean on one
    blocks = python_blocks(ROOT / page)
    assert blocks, f"{page} has no python example"
    namespace: dict = {}  # one page's blocks run in order, as a reader would paste them
    for k, block in enumerate(blocks):
        torch.manual_seed(0)
        exec(compile(block, f"{page} (python block {k + 1})", "exec"), namespace)
