"""Spec → Keras model: names resolved through Keras's own registries only.

Nothing here imports a module a spec names or evaluates spec text: a layer is
an attribute of `keras.layers` that is a Layer class, an optimizer, loss or
metric is whatever Keras's `get` returns for the name.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any

from orchestra.errors import FieldError
from orchestra.keras_compat import keras
from orchestra.spec import BackboneSpec, JobSpec, OptimizerSpec

# Strings `compile` accepts as metrics without a registry entry.
_COMPILE_METRIC_ALIASES = ("accuracy", "acc", "crossentropy", "ce")


def _suggest(name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.6)
    if not close:
        close = [a for a in allowed if a.lower() == name.lower()]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return hint


def layer_names() -> list[str]:
    layers = keras().layers
    return sorted(
        name for name in dir(layers)
        if not name.startswith("_")
        and inspect.isclass(getattr(layers, name))
        and issubclass(getattr(layers, name), layers.Layer)
        and name not in ("Layer", "InputLayer", "AbstractRNNCell", "InputSpec")
    )


def optimizer_classes() -> dict[str, type]:
    """keras.optimizers' classes by lower-case name (`adam` → Adam)."""
    optimizers = keras().optimizers
    return {
        name.lower(): getattr(optimizers, name) for name in dir(optimizers)
        if inspect.isclass(getattr(optimizers, name)) and name != "Optimizer"
    }


def optimizer_names() -> list[str]:
    return sorted(optimizer_classes())


def loss_names() -> list[str]:
    losses = keras().losses
    return sorted(
        name for name in dir(losses)
        if not name.startswith("_") and callable(getattr(losses, name))
        and name not in ("get", "serialize", "deserialize", "Loss", "Reduction")
    )


def metric_names() -> list[str]:
    metrics = keras().metrics
    registered = [
        name for name in dir(metrics)
        if not name.startswith("_") and callable(getattr(metrics, name))
        and name not in ("get", "serialize", "deserialize", "Metric")
    ]
    return sorted(set(registered) | set(_COMPILE_METRIC_ALIASES))


# Layer arguments Keras resolves by name through a registry module's `get`,
# by the argument's name (or its ending); the module's helpers and abstract
# base classes are not values (`activation: "serialize"` crashed the build).
_NAMED_ARGUMENTS = (("activation", "activations"), ("_initializer", "initializers"),
                    ("_regularizer", "regularizers"), ("_constraint", "constraints"))
_NOT_VALUES = frozenset({"get", "serialize", "deserialize", "Initializer", "Regularizer", "Constraint"})


def registry_names(module: str) -> list[str]:
    """The names a layer argument may take from `keras.<module>`: its
    public functions and concrete classes (e.g. relu, glorot_uniform, L2)."""
    registry = getattr(keras(), module)
    return sorted(name for name in dir(registry)
                  if not name.startswith("_") and name not in _NOT_VALUES and callable(getattr(registry, name)))


def _argument_problems(index: int, arguments: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for key, value in arguments.items():
        module = next((module for ending, module in _NAMED_ARGUMENTS
                       if key == ending or (ending.startswith("_") and key.endswith(ending))), None)
        if module is None or not isinstance(value, str):
            continue
        allowed = registry_names(module)
        if value not in allowed:
            problems.append((f"model.layers.{index}.{key}", f"unknown {module[:-1]} '{value}'"
                                                            f"{_suggest(value, allowed)} (allowed: {', '.join(allowed)})"))
    return problems


def application_names() -> list[str]:
    """The model constructors of keras.applications (InceptionV3, …)."""
    applications = keras().applications
    return sorted(name for name in dir(applications)
                  if name[:1].isupper() and inspect.isfunction(getattr(applications, name)))


def build_backbone(spec: BackboneSpec):
    """The backbone model: built with random weights, then given the
    weights file's (never downloaded), frozen as asked, cut at `cut_at`.
    Returns (input tensor, output tensor)."""
    k = keras()
    try:
        model = getattr(k.applications, spec.name)(
            input_shape=tuple(spec.input_shape), include_top=spec.include_top, weights=None)
    except (TypeError, ValueError) as exc:
        raise FieldError("model.backbone", f"{spec.name}: {exc}") from None
    if spec.weights is not None:
        path = Path(spec.weights).expanduser()
        if not path.is_file():
            raise FieldError("model.backbone.weights", f"no such weights file: {path}")
        try:
            model.load_weights(str(path))
        except Exception as exc:  # noqa: BLE001 - h5py and Keras raise many kinds for a file that does not fit
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise FieldError("model.backbone.weights", f"{path} does not fit {spec.name} "
                                                       f"(include_top={spec.include_top}): {first}") from None
    names = [layer.name for layer in model.layers]
    for field, name in (("cut_at", spec.cut_at), ("trainable_from", spec.trainable_from)):
        if name is not None and name not in names:
            raise FieldError(f"model.backbone.{field}", f"{spec.name} has no layer '{name}'"
                                                        f"{_suggest(name, names)}")
    model.trainable = spec.trainable == "all" or spec.trainable_from is not None
    if spec.trainable_from is not None:
        for layer in model.layers[:names.index(spec.trainable_from)]:
            layer.trainable = False
    output = model.get_layer(spec.cut_at).output if spec.cut_at else model.output
    return model.input, output


def check_keras_names(spec: JobSpec) -> list[tuple[str, str]]:
    """Every layer, optimizer, loss and metric name the spec uses, checked
    against Keras, as (field path, message with close matches)."""
    problems = []
    layers = layer_names()
    for i, layer in enumerate(spec.model.layers):
        if layer.type not in layers:
            problems.append((
                f"model.layers.{i}.type",
                f"unknown layer '{layer.type}'{_suggest(layer.type, layers)} "
                "(allowed: any Layer class of keras.layers, e.g. Dense, Dropout, Flatten, Conv2D)",
            ))
        problems += _argument_problems(i, layer.arguments)
    backbone = spec.model.backbone
    if backbone is not None:
        applications = application_names()
        if backbone.name not in applications:
            problems.append(("model.backbone.name", f"unknown backbone '{backbone.name}'"
                                                    f"{_suggest(backbone.name, applications)} "
                                                    "(allowed: a model in keras.applications, e.g. InceptionV3, "
                                                    "MobileNetV2, ResNet50)"))
    optimizers = optimizer_names()
    name = spec.compile.optimizer_spec.type
    if name.lower() not in optimizers:
        path = "compile.optimizer" + (".type" if isinstance(spec.compile.optimizer, OptimizerSpec) else "")
        problems.append((path, f"unknown optimizer '{name}'{_suggest(name.lower(), optimizers)} "
                               f"(allowed: {', '.join(optimizers)})"))
    losses = loss_names()
    if spec.compile.loss not in losses:
        problems.append(("compile.loss", f"unknown loss '{spec.compile.loss}'"
                                         f"{_suggest(spec.compile.loss, losses)} (allowed: names in keras.losses)"))
    metrics = metric_names()
    for i, metric in enumerate(spec.compile.metrics):
        if metric not in metrics:
            problems.append((f"compile.metrics.{i}", f"unknown metric '{metric}'"
                                                     f"{_suggest(metric, metrics)} (allowed: names in keras.metrics)"))
        elif _metric_arguments(metric):
            problems.append((f"compile.metrics.{i}", f"'{metric}' needs {', '.join(_metric_arguments(metric))}, "
                                                     "which a metric given by name cannot have; choose another"))
    return problems


def _metric_arguments(name: str) -> list[str]:
    """The constructor arguments a metric class cannot do without (MeanIoU
    needs num_classes); Mean, Sum and MeanTensor, which reduce any tensor
    rather than compare labels and outputs, count as needing `values`."""
    metric = getattr(keras().metrics, name, None)
    if not inspect.isclass(metric):
        return []
    if "y_true" not in inspect.signature(metric.update_state).parameters:
        return ["values (it reduces a tensor, not labels against outputs)"]
    parameters = inspect.signature(metric.__init__).parameters.values()
    return [p.name for p in parameters if p.name != "self" and p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def make_optimizer(spec: OptimizerSpec):
    config: dict[str, Any] = {
        key: value for key, value in spec.model_dump().items() if key != "type" and value is not None
    }
    return optimizer_classes()[spec.type.lower()](**config)


def build_model(spec: JobSpec, input_shape: tuple[int, ...], steps_per_execution: int = 1):
    """The Sequential model the spec describes, compiled. Call it inside a
    distribution strategy's scope to get distributed variables."""
    model = assemble_model(spec, input_shape)
    try:
        optimizer = make_optimizer(spec.compile.optimizer_spec)
    except (TypeError, ValueError) as exc:
        raise FieldError("compile.optimizer", f"{spec.compile.optimizer_spec.type}: {exc}") from None
    try:
        model.compile(optimizer=optimizer, loss=spec.compile.loss, metrics=list(spec.compile.metrics),
                      steps_per_execution=steps_per_execution)
    except (TypeError, ValueError) as exc:
        raise FieldError("compile", str(exc)) from None
    return model


def assemble_model(spec: JobSpec, input_shape: tuple[int, ...]):
    """The spec's layers as a model, not compiled (built in a `tf.Graph`,
    its weights are shapes only: what pre-flight sizes)."""
    k = keras()
    k.utils.set_random_seed(spec.seed)
    shape = tuple(spec.model.input_shape) if spec.model.input_shape else input_shape
    layers = []
    for i, layer in enumerate(spec.model.layers):
        try:
            layers.append(getattr(k.layers, layer.type)(**layer.arguments))
        except (TypeError, ValueError) as exc:
            raise FieldError(f"model.layers.{i}", f"{layer.type}: {exc}") from None
    name = spec.name.replace("-", "_").replace(".", "_")
    if spec.model.backbone is None:
        model, inputs, x = k.Sequential([k.Input(shape=shape)], name=name), None, None
    else:
        model, (inputs, x) = None, build_backbone(spec.model.backbone)
    for i, layer in enumerate(layers):  # one at a time, so a layer that does not fit its input is named
        try:
            if model is not None:
                model.add(layer)
            else:
                x = layer(x)
        except (TypeError, ValueError) as exc:
            raise FieldError(f"model.layers.{i}", f"{spec.model.layers[i].type}: {_reason(exc)}") from None
    return model if model is not None else k.Model(inputs, x, name=name)


def _reason(exc: Exception) -> str:
    """The line of a Keras error that says why, not where."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    because = [line for line in lines if "Error:" in line or line.startswith(("total size", "Input 0"))]
    return (because or lines or [type(exc).__name__])[-1][:300]
