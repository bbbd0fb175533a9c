"""`python -m axial_transformer COMMAND ...`: the scripts of a clone (train.py, ...) and the axial-*
commands of an installed package."""

from __future__ import annotations

import importlib
import sys

# command -> the module whose main(argv) runs it
COMMANDS = {command: f"cli.{command}"
            for command in ("train", "sample", "evaluate", "compress", "decompress")}
COMMANDS["prepare"] = "data.__main__"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m axial_transformer {{{','.join(COMMANDS)}}} ...\n"
              "  (python -m axial_transformer COMMAND --help for its options)",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; expected one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f".{COMMANDS[command]}", __package__)
    sys.argv[0] = f"python -m axial_transformer {command}"  # what argparse shows as usage
    if command == "prepare":  # axial_transformer.data's own sub-command
        rest = ["prepare", *rest]
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
