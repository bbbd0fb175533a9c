"""Class-conditional generation on scikit-learn's bundled 8x8 digits (no download).

    python bench/conditional_bench.py                # ~4 minutes on 2 idle CPU cores
    python bench/conditional_bench.py --steps 200    # a quick look
    python bench/conditional_bench.py --steps 5 --per-class 2    # checks that it runs

1,797 digits with their classes, pixel values 0..16 (a model of 17 levels); a fixed 20% is held
out. Three models of the same size are trained for the same steps: unconditional, conditional
(with label dropout, so that it also models "no class" and can be guided) and, as the negative
control, conditional on labels shuffled among the training images. Reported: test bits/dim
(the conditional model given the true class, and given none), and how often a logistic
regression trained on the real training digits recognises the requested class in 100 samples
per class, at guidance 1 and 3.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from machine import machine_line, sampler_precision, table
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from axial_transformer import AxialTransformer, AxialTransformerConfig
from axial_transformer.training.ema import EMA

LEVELS, CLASSES = 17, 10


def digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images [N, 1, 8, 8] int64, train labels, test images, test labels): a fixed 20%
    held out."""
    data = load_digits()
    images = data.images.astype(np.int64)[:, None]  # values 0..16
    order = np.random.default_rng(seed).permutation(len(images))
    test = order[: round(0.2 * len(images))]
    train = order[len(test):]
    return images[train], data.target[train], images[test], data.target[test]


def train(images: np.ndarray, labels: np.ndarray | None, steps: int, args) -> AxialTransformer:
    """Adam with a short warm-up, gradient clipping and an EMA of the weights (the EMA is
    returned); a conditional model sees "no class" instead of its label with probability
    `label_dropout`."""
    torch.manual_seed(0)
    config = AxialTransformerConfig(
        image_size=(8, 8), channels=1, levels=LEVELS, dim=args.dim, heads=4, encoder_layers=2,
        outer_layers=2, inner_layers=args.inner_layers, dropout=args.dropout,
        num_classes=0 if labels is None else CLASSES)
    model = AxialTransformer(config)
    ema = EMA(model, 0.999)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    x_all, y_all = torch.from_numpy(images), None if labels is None else torch.from_numpy(labels)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 100)
        batch = torch.randint(len(x_all), (args.batch_size,), generator=g)
        y = None
        if y_all is not None:
            y = y_all[batch]
            y = torch.where(torch.rand(len(y), generator=g) < args.label_dropout, -1, y)
        loss = model.loss(x_all[batch], "all", labels=y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model, step)
    return ema.model.eval()


@torch.no_grad()
def bits_per_dim(model: AxialTransformer, images: np.ndarray, labels: np.ndarray | None) -> float:
    y = None if labels is None else torch.from_numpy(labels)
    return model.bits_per_dim(torch.from_numpy(images), y).mean().item()


def recognised(model: AxialTransformer, classifier, guidance: float, per_class: int) -> float:
    """Share of samples that the classifier assigns to the class they were drawn for."""
    requested = torch.arange(CLASSES).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(2)
    samples = model.sample(len(requested), generator=g, labels=requested, guidance=guidance)
    predicted = classifier.predict(samples.reshape(len(samples), -1).numpy())
    return float((predicted == requested.numpy()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # With residual dropout the unconditional model's test bits/dim bottom out at 600-800 steps.
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--inner-layers", type=int, default=2)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    # 1,438 digits overfit within a few hundred steps: residual dropout keeps test bits/dim down.
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--per-class", type=int, default=100, help="samples per class")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = digits()
    classifier = LogisticRegression(max_iter=5000).fit(x_train.reshape(len(x_train), -1), y_train)
    real = classifier.score(x_test.reshape(len(x_test), -1), y_test)
    shuffled = np.random.default_rng(3).permutation(y_train)

    print(f"# Class-conditional digits, "
          f"{machine_line(f'fp32 training, {sampler_precision(args.dim)} sampling')}; "
          f"{len(x_train)} train / {len(x_test)} test digits, 8x8, 17 levels; width {args.dim}, "
          f"layers 2/2/{args.inner_layers}, dropout {args.dropout}, {args.steps} steps of "
          f"{args.batch_size}, label dropout {args.label_dropout}")
    print(f"# the classifier (logistic regression) recognises {real:.1%} of the real test "
          "digits\n")

    def rows():
        unconditional = train(x_train, None, args.steps, args)
        yield ["unconditional", f"{bits_per_dim(unconditional, x_test, None):.3f}", "-", "-"]
        for name, labels in (("conditional", y_train),
                             ("conditional on shuffled labels (control)", shuffled)):
            model = train(x_train, labels, args.steps, args)
            given = bits_per_dim(model, x_test, y_test)
            no_class = bits_per_dim(model, x_test, np.full_like(y_test, -1))
            yield [name, f"{given:.3f} (no class: {no_class:.3f})",
                   *(f"{recognised(model, classifier, s, args.per_class):.1%}" for s in (1, 3))]

    table(["model", "test bits/dim", "recognised, guidance 1", "recognised, guidance 3"], rows())
    print(f"\n# {math.ceil(time.perf_counter() - start)} s in all")


if __name__ == "__main__":
    main()
