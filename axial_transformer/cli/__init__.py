"""The commands: train, sample, evaluate, compress and decompress (each module's main), and what
they share (common.py)."""
