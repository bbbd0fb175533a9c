"""Exact test bits/dim of a trained model over a whole test split: `python evaluate.py --help`.

The command lives in axial_transformer/cli/evaluate.py; an installed package also has it as
`axial-evaluate` and `python -m axial_transformer evaluate`.
"""

import sys

from axial_transformer.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
