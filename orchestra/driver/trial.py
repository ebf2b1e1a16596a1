"""One training step and one evaluation step in the driver, before any worker
starts.

Many specs are well formed and still cannot train: a last layer narrower than
the classes, an Embedding fed pixel fractions, labels a loss cannot take, a
loss that is NaN at once. On the workers each fails minutes later, as a
TensorFlow traceback in a Ray log. Here the compiled model takes two examples
of the job's data (or generated ones of the same shape and type, where the
data is not readable) through `train_on_batch` and `test_on_batch`, under a
time limit, and a failure is one FieldError naming the spec field to change.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestra.errors import FieldError
from orchestra.spec import BINARY_LOSSES, JobSpec

TRIAL_SECONDS = 120.0
TRIAL_EXAMPLES = 2

_ERROR_LINE = re.compile(r"^\s*(?:[A-Za-z_.]*(?:Error|Exception)): (.+)$")
_LAYER_NAME = re.compile(r"""(?:layer ["'](?P<quoted>[\w.-]+)["']|(?<![\w.-])(?P<scoped>[\w.-]+)/)""")


@dataclass
class Sample:
    """Two examples as the workers' pipelines give them to the model, and
    every training label (None for generated data), which the checks of the
    model's output against the labels read.

    Args:
        x: the examples, float32, shape (2, *input_shape).
        y: their labels, as the loss gets them.
        labels: every training label, or None.
        non_finite: how many values of all the training examples are NaN or infinite.

    Example:

        >>> import numpy as np
        >>> sample = Sample.of_arrays(np.zeros((5, 3), np.float32), np.arange(5))
        >>> sample.x.shape, int(sample.labels.max())
        ((2, 3), 4)
    """

    x: np.ndarray
    y: np.ndarray
    labels: np.ndarray | None
    non_finite: int = 0

    @classmethod
    def of_arrays(cls, x: np.ndarray, y: np.ndarray) -> Sample:
        return cls(np.asarray(x[:TRIAL_EXAMPLES]), np.asarray(y[:TRIAL_EXAMPLES]), np.asarray(y),
                   int(x.size - np.count_nonzero(np.isfinite(x))))

    @classmethod
    def of_images(cls, spec: JobSpec, index) -> Sample:
        """The first two images of an image folder index (FolderIndex)."""
        from orchestra.build.images import FolderExamples

        examples = FolderExamples(index, spec.data, threads=1, seed=spec.data.seed)
        try:
            x, y = examples.load_batch(np.arange(min(TRIAL_EXAMPLES, len(examples))), np.int64(-1))
        finally:
            threads = getattr(examples, "threads", None)  # its decoding threads (none with loader processes)
            if threads is not None:
                threads.shutdown()
        return cls(x, y, examples.labels)

    @classmethod
    def generated(cls, spec: JobSpec, model) -> Sample:
        """Zeros of the model's input shape, and labels of the spec's kind:
        class 0 and 1, one-hot over `data.num_classes` when it is given
        (else over the model's outputs)."""
        x = np.zeros((TRIAL_EXAMPLES, *model.input_shape[1:]), np.float32)
        width = int(model.output_shape[-1] or 1)
        classes = np.arange(TRIAL_EXAMPLES) % max(2, width) if width > 1 else np.zeros(TRIAL_EXAMPLES, np.int64)
        kind = spec.data.label_kind
        if kind == "sparse":
            y = classes.astype(np.int32)
        elif kind == "one_hot":
            y = np.eye(spec.data.num_classes or width, dtype=np.float32)[classes % (spec.data.num_classes or width)]
        else:
            y = np.zeros((TRIAL_EXAMPLES, *model.output_shape[1:]), np.float32)
        # Only labels the spec fixes are checked against the last layer.
        return cls(x, y, y if kind == "one_hot" and spec.data.num_classes else None)


def trial_step(spec: JobSpec, model, sample: Sample, seconds: float = TRIAL_SECONDS) -> dict[str, float]:
    """Check the compiled `model` against the labels and the loss, then run
    one training and one evaluation step on `sample` within `seconds`.
    Returns the evaluation step's logs; raises FieldError naming the field."""
    fields = SpecFields(spec, model)
    check_inputs(spec, model, sample, fields)
    check_outputs(spec, model, sample, fields)
    outcome: dict[str, Any] = {}

    def step() -> None:
        try:
            outcome["train"] = model.train_on_batch(sample.x, sample.y, return_dict=True)
            outcome["test"] = model.test_on_batch(sample.x, sample.y, return_dict=True)
        except Exception as exc:  # noqa: BLE001 - TensorFlow raises many kinds; each is mapped to a field
            outcome["error"] = exc

    thread = threading.Thread(target=step, name="orchestra-trial-step", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise FieldError("model", f"one training step on {TRIAL_EXAMPLES} examples took more than {seconds:g} s "
                                  "in the pre-flight check: the model is too large for this machine")
    if "error" in outcome:
        raise failing_metric(spec, model, sample) or fields.error(outcome["error"])
    check_scalar_metrics(spec, outcome["train"])
    for phase, what in (("train", "the training step"), ("test", "the evaluation step after it")):
        loss = outcome[phase].get("loss")
        if loss is not None and not np.isfinite(loss):
            raise _non_finite(spec, sample, what, loss)
    return outcome["test"]


def failing_metric(spec: JobSpec, model, sample: Sample) -> FieldError | None:
    """When the loss takes the labels and the model's outputs but a metric
    does not (MeanIoU reading one-hot labels as class indices), the metric's
    field; else None."""
    from orchestra.build.model import make_object
    from orchestra.keras_compat import keras

    k = keras()
    try:
        y_pred = model(sample.x, training=False)
        loss = spec.compile.loss
        (make_object(loss, "loss") if not isinstance(loss, str) else k.losses.get(loss))(sample.y, y_pred)
    except Exception:  # noqa: BLE001 - the loss or the model fails: the caller's mapping names it
        return None
    for i, metric in enumerate(spec.compile.metrics):
        if isinstance(metric, str) and metric in ("accuracy", "acc", "crossentropy", "ce"):
            continue  # compile picks their kind from the labels' shape
        try:
            built = make_object(metric, "metric") if not isinstance(metric, str) else k.metrics.get(metric)
            if isinstance(built, k.metrics.Metric):
                built.update_state(sample.y, y_pred)
            else:
                built(sample.y, y_pred)
        except Exception as exc:  # noqa: BLE001 - TensorFlow raises many kinds
            return FieldError(f"compile.metrics.{i}", f"fails on {TRIAL_EXAMPLES} examples of the data's labels "
                                                      f"and the model's outputs: {error_line(exc)}")
    return None


def check_scalar_metrics(spec: JobSpec, logs: dict[str, Any]) -> None:
    """Every metric's result is one number: the driver averages, monitors
    and charts one number a metric (pre-flight's shape check refuses the
    known kinds; this catches a metric whose shape depends on the data)."""
    from orchestra.build.model import vector_metric_message

    for i, (name, kind) in enumerate(zip(spec.compile.metric_names, spec.compile.metric_kinds)):
        shape = np.shape(logs.get(name, 0.0))
        if shape and int(np.prod(shape)) != 1:
            raise FieldError(f"compile.metrics.{i}", vector_metric_message(kind, shape))


class SpecFields:
    """Which spec field a built layer comes from: the last
    `len(spec.model.layers)` layers of the model are the spec's, in order;
    those before them are the backbone's."""

    def __init__(self, spec: JobSpec, model):
        own = list(model.layers)[len(model.layers) - len(spec.model.layers):] if spec.model.layers else []
        self.own = own
        self.by_name = {layer.name: f"model.layers.{i}" for i, layer in enumerate(own)}
        for layer in list(model.layers)[:len(model.layers) - len(own)]:
            self.by_name.setdefault(layer.name, "model.backbone")
        self.last = f"model.layers.{len(own) - 1}" if own else "model.backbone"

    def of_text(self, text: str) -> str | None:
        """The field of the first layer a TensorFlow error message names."""
        for match in _LAYER_NAME.finditer(text):
            name = match.group("quoted") or match.group("scoped")
            if name in self.by_name:
                return self.by_name[name]
        return None

    def error(self, exc: BaseException) -> FieldError:
        if isinstance(exc, FieldError):
            return exc
        text = str(exc)
        field = self.of_text(text) or ("compile.loss" if "loss" in text.lower() else "model")
        return FieldError(field, f"fails in a training step on {TRIAL_EXAMPLES} examples of the data: "
                                 f"{error_line(exc)}")


def error_line(exc: BaseException) -> str:
    """The line of a TensorFlow error that says what went wrong, not where."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        match = _ERROR_LINE.match(line)
        if match:
            return match.group(1)[:300]
    for line in lines:
        if not line.startswith(("File ", "in user code", "Traceback")):
            return line[:300]
    return type(exc).__name__


def check_inputs(spec: JobSpec, model, sample: Sample, fields: SpecFields) -> None:
    """Examples with NaN or infinite values; an Embedding that takes the
    data directly needs whole numbers in [0, input_dim): Keras would cast
    0.5 to index 0 without a word."""
    if sample.non_finite:
        raise FieldError("data", f"{sample.non_finite} values of the training examples are NaN or infinite")
    if spec.model.backbone is not None or not fields.own or spec.model.layers[0].type != "Embedding":
        return
    layer, x = fields.own[0], sample.x
    if not np.all(np.isfinite(x)) or not np.array_equal(x, np.round(x)):
        odd = x[~np.isclose(x, np.round(x))] if np.all(np.isfinite(x)) else x[~np.isfinite(x)]
        raise FieldError("model.layers.0", f"Embedding takes whole-number indices but the data gives "
                                           f"{float(odd.flat[0]):g}: drop data.rescale, or use another first layer")
    if x.size and (x.min() < 0 or x.max() >= layer.input_dim):
        raise FieldError("model.layers.0", f"Embedding input_dim {layer.input_dim} does not cover the data's "
                                           f"values {x.min():g} to {x.max():g}: set input_dim to at least "
                                           f"{int(x.max()) + 1}")


def check_outputs(spec: JobSpec, model, sample: Sample, fields: SpecFields) -> None:
    """The last layer's width against the labels, as the loss reads them;
    labels a binary loss cannot take."""
    width, loss, labels = model.output_shape[-1], spec.compile.loss_name, sample.labels
    if labels is None or width is None or labels.size == 0:
        return
    kind = spec.data.label_kind
    if kind == "sparse" and loss not in BINARY_LOSSES and labels.ndim == 1:
        classes = int(labels.max()) + 1
        if classes > width:
            raise FieldError(fields.last, f"gives {width} outputs but the labels go up to {classes - 1}: "
                                          f"the last layer needs one output per class, {classes}")
    if kind == "one_hot" and labels.ndim == 2 and labels.shape[1] != width:
        raise FieldError(fields.last, f"gives {width} outputs but the labels are one-hot over {labels.shape[1]} "
                                      f"classes: the last layer needs {labels.shape[1]} outputs")
    if loss in BINARY_LOSSES and (labels.min() < 0 or labels.max() > 1):
        raise FieldError("compile.loss", f"{loss} takes labels between 0 and 1 but the training labels go from "
                                         f"{labels.min():g} to {labels.max():g}: use "
                                         "sparse_categorical_crossentropy for class indices")


def _non_finite(spec: JobSpec, sample: Sample, what: str, loss: float) -> FieldError:
    if not np.all(np.isfinite(sample.x)):
        return FieldError("data", f"the loss is {loss} in {what}: the examples hold NaN or infinite values")
    field = "compile.optimizer" if what != "the training step" else "compile.loss"
    return FieldError(field, f"the loss is {loss} in {what} on {TRIAL_EXAMPLES} examples of the data "
                             "(a learning rate too large, or a loss that does not fit the last layer's activation)")
