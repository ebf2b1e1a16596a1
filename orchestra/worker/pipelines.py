"""A worker's examples and the distributed datasets it trains on."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestra.build import data as data_lib
from orchestra.build import node_cache, shards, tuning
from orchestra.coordinator.protocol import WorkerConfig

log = logging.getLogger(__name__)


@dataclass
class JobExamples:
    """The job's examples as this worker reads them: arrays from the spec's
    source, or the image files the driver listed. Validation and test may be None."""

    train: Any
    validation: Any
    test: Any
    input_shape: tuple[int, ...]
    loaders: Any = None  # the LoaderPool of an image folder's examples

    def close(self) -> None:
        if self.loaders is not None:
            self.loaders.close()


def job_examples(config: WorkerConfig) -> JobExamples:
    spec = config.spec
    if spec.data.shards is not None:
        return JobExamples(*shards.open_examples(spec.data, Path(config.datasets_dir)))
    if config.images is None:
        arrays = job_arrays(config)
        test = None if arrays.x_test is None else data_lib.ArrayExamples(arrays.x_test, arrays.y_test)
        validation = None if arrays.x_val is None else data_lib.ArrayExamples(arrays.x_val, arrays.y_val)
        return JobExamples(data_lib.ArrayExamples(arrays.x_train, arrays.y_train), validation, test,
                           arrays.input_shape)
    from orchestra.build.images import FolderExamples, recipe
    from orchestra.build.loader_processes import LoaderPool

    # One pool of loader processes for this worker, shared by its sets.
    pool = LoaderPool(spec.data_loader.processes, recipe(spec.data, spec.seed))

    def folder(index):
        return None if index is None else FolderExamples(index, spec.data, seed=spec.seed, pool=pool)

    return JobExamples(folder(config.images.train), folder(config.images.validation), None,
                       spec.data.images.image_shape, loaders=pool)


def job_arrays(config: WorkerConfig) -> data_lib.Arrays:
    """The job's prepared arrays: the one copy of this node, memory-mapped,
    when other workers of the job share the node; else this worker's own
    (when the node's copy cannot be made, too, with a warning)."""
    spec = config.spec
    npz = Path(config.npz_path) if config.npz_path else None
    if workers_on_this_node(config) > 1:
        try:
            return node_cache.node_arrays(spec.data, npz, Path(config.datasets_dir))
        except OSError as exc:
            log.warning("the arrays are not shared with this node's other workers (%s): this worker "
                        "prepares its own copy", exc)
    return data_lib.prepare(spec.data, npz, Path(config.datasets_dir))


def workers_on_this_node(config: WorkerConfig) -> int:
    """How many of the job's workers run on this node: 1 in the in-process run."""
    if config.channel is None:
        return 1
    import ray.train

    return ray.train.get_context().get_local_world_size()


class Pipelines:
    """This worker's share of every dataset, distributed by `strategy`.

    Args:
        config: the job's worker config.
        examples: the job's examples.
        rank: this worker's rank.
        world_size: how many workers train.
        strategy: the distribution strategy the model was built under.
    """

    def __init__(self, config: WorkerConfig, examples: JobExamples, rank: int, world_size: int, strategy):
        self.spec, self.examples = config.spec, examples
        self.rank, self.world_size, self.strategy = rank, world_size, strategy
        self.global_batch = self.spec.fit.batch_size
        self.steps = self.spec.fit.steps_per_epoch or shards.training_steps(examples.train, self.global_batch,
                                                                            world_size)
        self.per_worker_batch = self.global_batch // world_size
        self.evaluation_batch = max(1, tuning.evaluation_batch_size(self.spec) // world_size)

    def training(self, initial_epoch: int):
        spec = self.spec
        return self.strategy.distribute_datasets_from_function(
            lambda _: shards.training_pipeline(
                self.examples.train,
                global_batch=self.global_batch, rank=self.rank, world_size=self.world_size,
                shuffle=spec.fit.shuffle, seed=spec.seed, initial_epoch=initial_epoch,
                class_weight=spec.fit.class_weight,
                parallel_calls=spec.data_loader.processes, prefetch=spec.data_loader.prefetch,
                declare_endless=spec.performance.skip_end_of_data_vote,
            )
        )

    def evaluation(self, examples):
        """(dataset, steps) over a whole evaluation set."""
        dataset = self.strategy.distribute_datasets_from_function(
            lambda _: shards.evaluation_pipeline(
                examples, per_worker_batch=self.evaluation_batch, rank=self.rank, world_size=self.world_size
            )
        )
        return dataset, shards.evaluation_steps(examples, self.evaluation_batch, self.world_size)

    def validation(self):
        """(dataset, steps) of the validation set, or (None, None)."""
        if self.examples.validation is None:
            return None, None
        dataset, steps = self.evaluation(self.examples.validation)
        if self.spec.fit.validation_steps:
            steps = min(steps, self.spec.fit.validation_steps)
        return dataset, steps
