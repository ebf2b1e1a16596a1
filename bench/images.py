"""`python -m bench.images [--loaders 1 2 4] [--size 150] [--batch 16] [--steps 30] [--repeat 3]`:
loader threads and loader processes side by side, decoding and augmenting
images (every transform of seed 003 on).

A folder of generated images is written to a temporary directory. For each
kind (`threads`: a thread pool in the worker's process, as orchestra had;
`processes`: `LoaderPool`, what a training worker uses now) and each loader
count, one worker's pipeline (`data.training_pipeline`, `parallel_calls` =
loaders, prefetch 2, as a worker builds it) is timed twice: alone, as
images per second with no model behind it, and feeding a small conv net
trained with `train_on_batch`, as the time `next(batch)` blocked per step
next to the step itself. Also printed: how long the pool took to start,
and the CPU the loaders used while alone (this process and its loader
processes, in cores: threads cannot pass 1, the interpreter lock).
Each setting runs `--repeat` times, interleaved with the others; the table
gives the medians (and the loaders' min–max). Other processes on the
machine move every figure: the run also measures how many cores two busy
loops of its own get (with the kernel's autogroup scheduling, a session's
processes share one session's part of the CPU, however many they are).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SEED_003_AUGMENTATION = {"rotation_range": 40, "width_shift_range": 0.2, "height_shift_range": 0.2,
                         "shear_range": 0.2, "zoom_range": 0.2, "horizontal_flip": True, "fill_mode": "nearest"}
KINDS = ("threads", "processes")
DEFAULT_LOADERS = 2  # DataLoaderSpec's default `processes`


def measure(root: str, kind: str, loaders: int, size: int, batch: int, steps: int) -> dict[str, float]:
    """Start-up, loader-alone rate, and wait per step for one kind and loader count."""
    from orchestra.build import data as data_lib
    from orchestra.build.images import FolderExamples, index_folder, recipe
    from orchestra.build.loader_processes import LoaderPool
    from orchestra.keras_compat import keras
    from orchestra.spec import DataSpec

    spec = DataSpec.model_validate({
        "images": {"train_dir": root, "target_size": [size, size], "label_mode": "binary"},
        "rescale": "1/255", "augmentation": SEED_003_AUGMENTATION})
    index = index_folder(root, "data.images.train_dir")
    begun = time.perf_counter()
    pool = LoaderPool(loaders, recipe(spec, seed=0)) if kind == "processes" else None
    examples = FolderExamples(index, spec, threads=loaders, seed=0, pool=pool)
    started = time.perf_counter() - begun

    def pipeline(epoch: int):
        return iter(data_lib.training_pipeline(
            examples, global_batch=batch, rank=0, world_size=1, shuffle=True, seed=0, initial_epoch=epoch,
            class_weight=None, parallel_calls=loaders, prefetch=2))

    try:
        alone = pipeline(0)
        next(alone)
        cpu_before, begun = cpu_seconds(pool), time.perf_counter()
        for _ in range(steps):
            next(alone)
        elapsed = time.perf_counter() - begun
        rate, cores = steps * batch / elapsed, (cpu_seconds(pool) - cpu_before) / elapsed
        del alone

        k = keras()
        model = k.Sequential([k.Input((size, size, 3)), k.layers.Conv2D(16, 3, strides=2, activation="relu"),
                              k.layers.Conv2D(32, 3, strides=2, activation="relu"),
                              k.layers.GlobalAveragePooling2D(), k.layers.Dense(1, activation="sigmoid")])
        model.compile("adam", "binary_crossentropy")
        batches = pipeline(1)
        model.train_on_batch(*next(batches))  # traced once, outside the timing
        waits, step_times = [], []
        for _ in range(steps):
            begun = time.perf_counter()
            x, y = next(batches)
            fetched = time.perf_counter()
            model.train_on_batch(x, y)
            waits.append(fetched - begun)
            step_times.append(time.perf_counter() - fetched)
    finally:
        if pool is not None:
            pool.close()
    wait, step = statistics.median(waits), statistics.median(step_times)
    return {"start_s": started, "loader_images_per_s": rate, "loader_cores": cores, "wait_median_ms": 1000 * wait,
            "wait_mean_ms": 1000 * statistics.mean(waits), "step_median_ms": 1000 * step,
            "wait_share": wait / step}


def cpu_seconds(pool) -> float:
    """CPU time used so far by this process and the pool's processes."""
    import psutil

    processes = [psutil.Process()] + [psutil.Process(pid) for pid in (pool.pids if pool else [])]
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def _spin(seconds: float) -> float:
    begun, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - begun < seconds:
        pass
    return (time.process_time() - cpu) / (time.perf_counter() - begun)


def cores_available(seconds: float = 1.0) -> float:
    """How many cores two busy processes of this session get now (2.0 on an idle 2-core machine)."""
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        return sum(pool.map(_spin, [seconds, seconds]))


def main(argv: list[str] | None = None) -> None:
    from orchestra.tools.samples import write_image_tree

    parser = argparse.ArgumentParser(prog="python -m bench.images", description=__doc__.splitlines()[0])
    parser.add_argument("--loaders", type=int, nargs="+", default=[1, 2, 4], help="data_loader.processes to try")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--size", type=int, default=150, help="image height and width (seed 003: 150)")
    parser.add_argument("--batch", type=int, default=16, help="per-worker batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each setting, interleaved")
    args = parser.parse_args(argv)
    settings = [(loaders, kind) for loaders in args.loaders for kind in args.kinds]
    runs: dict[tuple[int, str], list[dict[str, float]]] = {setting: [] for setting in settings}
    with tempfile.TemporaryDirectory(prefix="bench-images-") as root:
        write_image_tree(root, per_class=args.batch * (args.steps + 1), size=args.size)
        load_before, cores_before = os.getloadavg()[0], cores_available()
        for _ in range(args.repeat):
            for loaders, kind in settings:
                runs[loaders, kind].append(measure(root, kind, loaders, args.size, args.batch, args.steps))
    results = {setting: {key: statistics.median(run[key] for run in found) for key in found[0]}
               for setting, found in runs.items()}
    print(f"{args.size}x{args.size} PNGs, batch {args.batch}, {args.steps} steps, all seed-003 augmentations, "
          f"prefetch 2, {os.cpu_count()} cores, medians of {args.repeat} runs; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after; cores two busy loops got: "
          f"{cores_before:.2f} before, {cores_available():.2f} after")
    print("| loaders | kind | start s | loaders alone img/s (min–max) | loaders' CPU, cores | wait/step median ms "
          "| wait/step mean ms | train step median ms | median wait / step |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (loaders, kind), r in results.items():
        rates = [run["loader_images_per_s"] for run in runs[loaders, kind]]
        print(f"| {loaders} | {kind} | {r['start_s']:.2f} | {r['loader_images_per_s']:.0f} "
              f"({min(rates):.0f}–{max(rates):.0f}) | {r['loader_cores']:.2f} | {r['wait_median_ms']:.1f} | {r['wait_mean_ms']:.1f} "
              f"| {r['step_median_ms']:.1f} | {100 * r['wait_share']:.0f} % |")
    for kind in args.kinds:
        if (1, kind) in results and (2, kind) in results:
            ratio = results[2, kind]["loader_images_per_s"] / results[1, kind]["loader_images_per_s"]
            print(f"{kind}: 2 loaders deliver {ratio:.2f}x what 1 delivers")
    if (DEFAULT_LOADERS, "processes") in results:
        share = results[DEFAULT_LOADERS, "processes"]["wait_share"]
        print(f"default setting ({DEFAULT_LOADERS} processes, prefetch 2): median input wait {100 * share:.0f} % "
              "of the step")


if __name__ == "__main__":
    main()
