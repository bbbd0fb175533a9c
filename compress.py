"""Compress images losslessly with a trained Axial Transformer: `python compress.py --help`.

The command lives in axial_transformer/cli/compress.py; an installed package also has it as
`axial-compress` and `python -m axial_transformer compress`.
"""

import sys

from axial_transformer.cli.compress import main

if __name__ == "__main__":
    sys.exit(main())
