"""The README's examples run as written."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def first_python_block(section: str) -> str:
    text = README.read_text()
    assert f"\n{section}\n" in text, f"README.md has no section {section!r}"
    body = text.split(f"\n{section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)
    assert blocks, f"the README section {section!r} has no python example"
    return blocks[0]


@pytest.mark.parametrize("section", ["## The model in Python", "## Axial attention in your CNN"])
def test_readme_example_runs(section):
    torch.manual_seed(0)
    exec(compile(first_python_block(section), f"README.md ({section})", "exec"), {})
