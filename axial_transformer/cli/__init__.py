"""The commands: train, sample, evaluate, compress and decompress, and what they share."""
