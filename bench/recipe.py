"""Way 2: the Ray Train recipe as Ray's documentation writes it:
TensorflowTrainer, MultiWorkerMirroredStrategy with TensorFlow's default
threads, a finite dataset sharded by tf.distribute, and metrics plus a
checkpoint reported every epoch (ReportCheckpointCallback).

With `tuned`, the same recipe with orchestra's tuning written in by hand
(one thread per worker CPU, endless data with steps_per_epoch, 50 steps per
execution, validation in steps of 1024), to measure what orchestra's own
machinery costs on top."""

import json
import os
import tempfile

from bench.common import Result, emit, read_workload, scratch_dir


def train_func(config):
    import ray.train
    import tensorflow as tf
    from ray.train.tensorflow.keras import ReportCheckpointCallback

    from bench.common import Workload, build_model, load_arrays, timing_callback

    work = Workload(**config["work"])
    if work.tuned:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, y, x_val, y_val = load_arrays(work)
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=work.seed).batch(work.batch_size)
    val = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(1024 if work.tuned else work.batch_size)
    steps = len(x) // work.batch_size if work.tuned else None
    with strategy.scope():
        model = build_model(steps_per_execution=50 if work.tuned else 1)
    # Each worker notes its own epochs; the slowest sets the pace.
    timing = os.path.join(config["timing_dir"], f"rank{ray.train.get_context().get_world_rank()}.jsonl")
    model.fit(train.repeat() if work.tuned else train, steps_per_epoch=steps, validation_data=val,
              epochs=work.epochs, verbose=0, callbacks=[timing_callback(timing), ReportCheckpointCallback()])


def main() -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from orchestra.driver.ray_runtime import loopback_only

    work = read_workload()
    timing_dir = tempfile.mkdtemp(dir=scratch_dir())
    with loopback_only():  # as orchestra's embedded Ray, so the two compare on the same network path
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    TensorflowTrainer(
        train_func,
        train_loop_config={"work": work.__dict__, "timing_dir": timing_dir},
        scaling_config=ScalingConfig(num_workers=work.workers),
        run_config=RunConfig(storage_path=str(scratch_dir() / "ray"), name=os.path.basename(timing_dir),
                             worker_runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1"}}),
    ).fit()
    ranks = [[json.loads(line) for line in open(os.path.join(timing_dir, name))]
             for name in sorted(os.listdir(timing_dir))]
    epochs = list(zip(*ranks))
    emit(Result(
        "ray_recipe_tuned" if work.tuned else "ray_recipe", work.workers,
        epoch_times=[max(r["time"] for r in epoch) for epoch in epochs],
        epoch_ends=[max(r["end"] for r in epoch) for epoch in epochs],
        worker_peak_rss_mb=max(r["rss"] for rank in ranks for r in rank),
        samples_per_epoch=work.train,
        final_val_loss=epochs[-1][0]["val_loss"],
    ))


if __name__ == "__main__":
    main()
