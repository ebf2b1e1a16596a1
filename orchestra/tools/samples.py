"""Small learnable datasets made on the spot: image folders of shapes and a
CIFAR-shaped `.npz`, for tests, benchmarks and the example jobs (nothing is
downloaded).

    python -m orchestra.tools.samples images DIR [--per-class N] [--size S]
    python -m orchestra.tools.samples cifar FILE.npz [--train N] [--test N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square")


def shape_image(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A filled circle or square of random place, size and colour on a noisy
    background, as uint8 (size, size, 3)."""
    image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    radius = rng.uniform(0.2, 0.35) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    yy, xx = np.mgrid[:size, :size]
    if kind == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    else:
        mask = (abs(yy - cy) <= radius * 0.85) & (abs(xx - cx) <= radius * 0.85)
    image[mask] = rng.integers(120, 256, 3).astype(np.uint8)
    return image


def write_image_tree(root: str | Path, per_class: int = 20, size: int = 32, seed: int = 0,
                     classes: tuple[str, ...] = SHAPES) -> Path:
    """`root/<class>/<n>.png` for each shape class.

    Args:
        root: the folder to write (made if missing).
        per_class: images per class.
        size: height and width in pixels.
        seed: seeds every image.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for kind in classes:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            Image.fromarray(shape_image(kind, size, rng)).save(root / kind / f"{n:04d}.png")
    return root


def write_cifar_like(path: str | Path, train: int = 2000, test: int = 500, classes: int = 10, seed: int = 0) -> Path:
    """A CIFAR-10-shaped `.npz`: uint8 (n, 32, 32, 3) colour images, labels
    one-hot (n, classes) as seed 001 feeds them; class c is tinted by its
    own colour, so a small MLP learns it."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (classes, 3))

    def split(n: int):
        labels = rng.integers(0, classes, n)
        noise = rng.normal(0, 60, (n, 32, 32, 3))
        images = np.clip(palette[labels][:, None, None, :] * 0.5 + 64 + noise, 0, 255).astype(np.uint8)
        return images, np.eye(classes, dtype=np.float32)[labels]

    x_train, y_train = split(train)
    x_test, y_test = split(test)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m orchestra.tools.samples", description=__doc__.splitlines()[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    images = kinds.add_parser("images", help="a class-per-subfolder tree of circles and squares")
    images.add_argument("root")
    images.add_argument("--per-class", type=int, default=100)
    images.add_argument("--size", type=int, default=64)
    images.add_argument("--seed", type=int, default=0)
    cifar = kinds.add_parser("cifar", help="a CIFAR-10-shaped .npz with one-hot labels")
    cifar.add_argument("path")
    cifar.add_argument("--train", type=int, default=5000)
    cifar.add_argument("--test", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.kind == "images":
        print(write_image_tree(args.root, args.per_class, args.size, args.seed))
    else:
        print(write_cifar_like(args.path, args.train, args.test))


if __name__ == "__main__":
    main()
