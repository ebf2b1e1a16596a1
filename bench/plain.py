"""Way 1: plain single-process tf-keras `fit`, TensorFlow's defaults."""

from bench.common import (
    Result,
    build_model,
    emit,
    load_arrays,
    read_workload,
    timing_callback,
)


def main() -> None:
    work = read_workload()
    x, y, x_val, y_val = load_arrays(work)
    model = build_model()
    timing = timing_callback()
    history = model.fit(x, y, batch_size=work.batch_size, epochs=work.epochs, validation_data=(x_val, y_val),
                        callbacks=[timing], verbose=0)
    emit(Result("plain", 1, timing.times, timing.ends, samples_per_epoch=len(x),
                final_val_loss=history.history["val_loss"][-1]))


if __name__ == "__main__":
    main()
