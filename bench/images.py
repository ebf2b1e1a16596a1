"""`python -m bench.images [--loaders 1 2 4] [--size 150] [--batch 16] [--steps 30]`:
how long a training step waits for its input when images are decoded and
augmented (every transform of seed 003 on) by 1 loader thread and by more.

A folder of generated images is written to a temporary directory; one
worker's pipeline (`data.training_pipeline` over `images.FolderExamples`,
prefetch 2) feeds a small conv net trained with `train_on_batch`. Printed
per loader count: the median and mean time `next(batch)` blocked, the
median training step, and what the loaders deliver with no model behind
them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SEED_003_AUGMENTATION = {"rotation_range": 40, "width_shift_range": 0.2, "height_shift_range": 0.2,
                         "shear_range": 0.2, "zoom_range": 0.2, "horizontal_flip": True, "fill_mode": "nearest"}


def measure(root: str, loaders: int, size: int, batch: int, steps: int) -> dict[str, float]:
    """Wait per step, step time and loader-alone rate for one loader count."""
    from orchestra.build import data as data_lib
    from orchestra.build.images import FolderExamples, index_folder
    from orchestra.keras_compat import keras
    from orchestra.spec import DataSpec

    spec = DataSpec.model_validate({
        "images": {"train_dir": root, "target_size": [size, size], "label_mode": "binary"},
        "rescale": "1/255", "augmentation": SEED_003_AUGMENTATION})
    examples = FolderExamples(index_folder(root, "data.images.train_dir"), spec, threads=loaders, seed=0)

    def pipeline():
        return iter(data_lib.training_pipeline(
            examples, global_batch=batch, rank=0, world_size=1, shuffle=True, seed=0, initial_epoch=0,
            class_weight=None, parallel_calls=1, prefetch=2))

    k = keras()
    model = k.Sequential([k.Input((size, size, 3)), k.layers.Conv2D(16, 3, strides=2, activation="relu"),
                          k.layers.Conv2D(32, 3, strides=2, activation="relu"), k.layers.GlobalAveragePooling2D(),
                          k.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy")
    batches = pipeline()
    model.train_on_batch(*next(batches))  # traced once, outside the timing
    waits, step_times = [], []
    for _ in range(steps):
        begun = time.perf_counter()
        x, y = next(batches)
        fetched = time.perf_counter()
        model.train_on_batch(x, y)
        waits.append(fetched - begun)
        step_times.append(time.perf_counter() - fetched)
    alone = pipeline()
    next(alone)
    begun = time.perf_counter()
    for _ in range(steps):
        next(alone)
    rate = steps * batch / (time.perf_counter() - begun)
    return {"wait_median_ms": 1000 * statistics.median(waits), "wait_mean_ms": 1000 * statistics.mean(waits),
            "step_median_ms": 1000 * statistics.median(step_times), "loader_images_per_s": rate}


def main(argv: list[str] | None = None) -> None:
    from orchestra.tools.samples import write_image_tree

    parser = argparse.ArgumentParser(prog="python -m bench.images", description=__doc__.splitlines()[0])
    parser.add_argument("--loaders", type=int, nargs="+", default=[1, 2, 4], help="data_loader.processes to try")
    parser.add_argument("--size", type=int, default=150, help="image height and width (seed 003: 150)")
    parser.add_argument("--batch", type=int, default=16, help="per-worker batch")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-images-") as root:
        write_image_tree(root, per_class=args.batch * args.steps, size=args.size)
        print(f"{args.size}x{args.size} PNGs, batch {args.batch}, {args.steps} steps, all seed-003 augmentations, "
              f"{os.cpu_count()} cores")
        print("| loaders | wait/step median ms | wait/step mean ms | train step median ms | loader alone img/s |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for loaders in args.loaders:
            r = measure(root, loaders, args.size, args.batch, args.steps)
            print(f"| {loaders} | {r['wait_median_ms']:.1f} | {r['wait_mean_ms']:.1f} | {r['step_median_ms']:.1f} "
                  f"| {r['loader_images_per_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
