"""Train an Axial Transformer: `python train.py --help`.

The command lives in axial_transformer/cli/train.py; an installed package also has it as
`axial-train` and `python -m axial_transformer train`.
"""

import sys

from axial_transformer.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
