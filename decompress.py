"""Decompress an .axc file written by compress.py: `python decompress.py --help`.

The command lives in axial_transformer/cli/decompress.py; an installed package also has it as
`axial-decompress` and `python -m axial_transformer decompress`.
"""

import sys

from axial_transformer.cli.decompress import main

if __name__ == "__main__":
    sys.exit(main())
