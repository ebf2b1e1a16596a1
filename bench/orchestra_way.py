"""Way 3: orchestra, embedded default, full coordinator: aggregation, early
stopping armed but not triggered, a checkpoint every epoch, TensorBoard."""

import tempfile
from pathlib import Path

from bench.common import Result, WorkerMemory, emit, read_workload, scratch_dir


def spec_for(work) -> dict:
    return {
        "name": "bench", "seed": 0,
        "data": {"source": str(work.mnist), "rescale": "1/255", "labels": "sparse", "test": False,
                 "train_size": work.train, "validation_size": work.validation, "seed": work.seed},
        "model": {"input_shape": [28, 28], "layers": [
            {"type": "Flatten"}, {"type": "Dense", "units": 100, "activation": "relu"},
            {"type": "Dense", "units": 10, "activation": "softmax"}]},
        "compile": {"optimizer": "adam", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
        "fit": {"epochs": work.epochs, "batch_size": work.batch_size},
        "callbacks": [{"class_name": "EarlyStopping", "config": {"monitor": "val_loss", "patience": work.epochs}},
                      {"class_name": "ModelCheckpoint", "config": {"monitor": "val_loss", "keep": 1}},
                      {"class_name": "TensorBoard", "config": {"update_freq": "epoch"}}],
        "scaling": {"workers": work.workers},
        "performance": work.performance,
    }


def main() -> None:
    from orchestra.driver.preflight import preflight
    from orchestra.driver.run import create_job, run_job
    from orchestra.spec import JobSpec

    work = read_workload()
    storage = tempfile.mkdtemp(dir=scratch_dir())
    prepared = preflight(JobSpec.model_validate(spec_for(work)), storage=storage,
                         datasets=str(Path(work.mnist).parent))
    record = create_job(prepared)
    with WorkerMemory(lambda: record.worker_pids.values()) as memory:
        run_job(prepared, record)
    assert record.state.value == "SUCCEEDED", record.reason
    history = record.history
    emit(Result(
        "orchestra", work.workers,
        epoch_times=[h["epoch_time"] for h in history],
        epoch_ends=[h["time"] for h in history],
        worker_peak_rss_mb=max(h["worker_peak_rss_mb"] for h in history),
        samples_per_epoch=work.train - work.train % work.batch_size,
        final_val_loss=history[-1]["val_loss"],
        workers_rss_mb=memory.rss_mb, workers_pss_mb=memory.pss_mb,
    ))


if __name__ == "__main__":
    main()
