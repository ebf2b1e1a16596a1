"""Way 2: the Ray Train recipe as Ray's documentation writes it:
TensorflowTrainer, MultiWorkerMirroredStrategy with TensorFlow's default
threads, a finite dataset sharded by tf.distribute, and metrics plus a
checkpoint reported every epoch (ReportCheckpointCallback)."""

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
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, y, x_val, y_val = load_arrays(work)
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=work.seed).batch(work.batch_size)
    val = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(work.batch_size)
    with strategy.scope():
        model = build_model()
    # Each worker notes its own epochs; the slowest sets the pace.
    timing = os.path.join(config["timing_dir"], f"rank{ray.train.get_context().get_world_rank()}.jsonl")
    model.fit(train, validation_data=val, epochs=work.epochs, verbose=0,
              callbacks=[timing_callback(timing), ReportCheckpointCallback()])


def main() -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    work = read_workload()
    timing_dir = tempfile.mkdtemp(dir=scratch_dir())
    ray.init(include_dashboard=False, log_to_driver=False)
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
        "ray_recipe", work.workers,
        epoch_times=[max(r["time"] for r in epoch) for epoch in epochs],
        epoch_ends=[max(r["end"] for r in epoch) for epoch in epochs],
        worker_peak_rss_mb=max(r["rss"] for rank in ranks for r in rank),
        samples_per_epoch=work.train,
        final_val_loss=epochs[-1][0]["val_loss"],
    ))


if __name__ == "__main__":
    main()
