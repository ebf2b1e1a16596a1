"""The input pipeline alone: samples per second orchestra's per-worker
training dataset delivers with no model behind it."""

import time

from bench.common import Result, emit, load_arrays, read_workload


def main() -> None:
    from orchestra.build.data import steps_per_epoch, training_dataset

    work = read_workload()
    x, y, _, _ = load_arrays(work)
    dataset = training_dataset(x, y, global_batch=work.batch_size, rank=0, world_size=work.workers,
                               shuffle=True, seed=0, initial_epoch=0, class_weight=None,
                               parallel_calls=2, prefetch=2)
    steps = steps_per_epoch(len(x), work.batch_size)
    iterator = iter(dataset)
    next(iterator)
    begun = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    elapsed = time.perf_counter() - begun
    per_worker = work.batch_size // work.workers
    emit(Result("loader", work.workers, epoch_times=[elapsed], epoch_ends=[time.time()],
                samples_per_epoch=steps * per_worker))


if __name__ == "__main__":
    main()
