"""The codec's files across CPU kernels, thread counts and batch sizes: one file, any decoder.

    python bench/codec_matrix.py                                    # tests/golden's model
    python bench/codec_matrix.py --checkpoint runs/demo --images 70

Encodes the first --images of the built-in test split with compress.py under each of
{avx2, default} kernels (ATEN_CPU_CAPABILITY) x {1, 2} threads x {batch 1, 64}, each in a fresh
process, checks that the 8 files are the same bytes, and decodes the file of each combination
with decompress.py under the next one in the list (so every combination decodes once, each a
file written under another), checking the pixels. Prints whether the files agree, and a markdown
table of the decodings.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from machine import machine_line, table

from axial_transformer.data.splits import open_split
from axial_transformer.training.checkpoint import load_trained_model

ROOT = Path(__file__).resolve().parents[1]
COMBINATIONS = list(itertools.product(("avx2", "default"), (1, 2), (1, 64)))


def run(script: str, capability: str, threads: int, batch: int, *args: str) -> None:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / script), *args, "--threads", str(threads),
                    "--batch-size", str(batch)], env=env, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "tests" / "golden" / "model"))
    parser.add_argument("--images", type=int, default=70, help="test images to code")
    args = parser.parse_args()
    model, _ = load_trained_model(args.checkpoint)
    c, (h, w) = model.config.channels, model.config.image_size
    images = np.asarray(open_split("builtin", "test", (h, w), c).array)[: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "images.npy"
        np.save(source, images)
        files = {}
        for k, (capability, threads, batch) in enumerate(COMBINATIONS):
            out = Path(tmp) / f"{k}.axc"
            run("compress.py", capability, threads, batch, "--checkpoint", args.checkpoint,
                str(source), "-o", str(out))
            files[k] = out.read_bytes()
        same = len(set(files.values())) == 1
        print(f"# {machine_line('exact integer coding', threads='1 and 2')}")
        print(f"# {args.images} images of {c}x{h}x{w}, model {args.checkpoint}: the 8 files "
              f"are {'the same bytes' if same else 'NOT the same'} ({len(files[0]):,} bytes)\n")

        def rows():
            for k, encoder in enumerate(COMBINATIONS):
                decoder = COMBINATIONS[(k + 1) % len(COMBINATIONS)]
                back = Path(tmp) / f"{k}.npy"
                run("decompress.py", *decoder, str(Path(tmp) / f"{k}.axc"), "--checkpoint",
                    args.checkpoint, "--out", str(back))
                exact = np.array_equal(np.load(back), images)
                yield [", ".join(map(str, encoder)), ", ".join(map(str, decoder)),
                       "exact" if exact else "NOT exact"]

        table(["written under (kernels, threads, batch)", "decoded under (kernels, threads, batch)",
               "pixels"], rows())


if __name__ == "__main__":
    main()
