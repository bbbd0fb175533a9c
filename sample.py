"""Draw images from a trained Axial Transformer, or complete the bottom of a real one:
`python sample.py --help`.

The command lives in axial_transformer/cli/sample.py; an installed package also has it as
`axial-sample` and `python -m axial_transformer sample`.
"""

import sys

from axial_transformer.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
