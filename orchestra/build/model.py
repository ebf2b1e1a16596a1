"""Spec → Keras model: names resolved through Keras's own registries only.

Nothing here imports a module a spec names or evaluates spec text: a layer is
an attribute of `keras.layers` that is a Layer class; an optimizer, loss or
metric given by name is whatever Keras's `get` returns for the name; one in
Keras's config form (`{"class_name": ..., "config": ...}`) is a class of its
slot's Keras namespace (`keras_classes`), called with its arguments after
they are checked against the class's constructor (`object_problems`).
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any

from orchestra.build.accelerators import output_arguments, precision_policy
from orchestra.errors import FieldError
from orchestra.keras_compat import keras
from orchestra.spec import (
    SPARSE_METRICS,
    BackboneSpec,
    JobSpec,
    KerasObjectSpec,
    OptimizerSpec,
)
from orchestra.spec.keras_objects import NAMESPACES, NESTED

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
        if module is not None and isinstance(value, dict):
            problems += object_problems(f"model.layers.{index}.{key}", KerasObjectSpec.model_validate(value),
                                        module[:-1])
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
    problems += _optimizer_problems(spec)
    loss = spec.compile.loss
    if isinstance(loss, KerasObjectSpec):
        problems += object_problems("compile.loss", loss, "loss")
    elif loss not in loss_names():
        problems.append(("compile.loss", f"unknown loss '{loss}'{_suggest(loss, loss_names())} "
                                         f"(allowed: names in keras.losses){_elsewhere(loss, 'loss')}"))
    metrics = metric_names()
    for i, metric in enumerate(spec.compile.metrics):
        field = f"compile.metrics.{i}"
        if isinstance(metric, KerasObjectSpec):
            found = object_problems(field, metric, "metric")
            problems += found or _reduces_values(field, metric.class_name)
        elif metric not in metrics:
            problems.append((field, f"unknown metric '{metric}'{_suggest(metric, metrics)} "
                                    f"(allowed: names in keras.metrics){_elsewhere(metric, 'metric')}"))
        elif _metric_arguments(metric):
            problems.append((field, f"'{metric}' needs {', '.join(_metric_arguments(metric))}, which a metric "
                                    f'given by name cannot have: give it as {{"class_name": "{metric}", '
                                    '"config": {...}} with them'))
    if not any(field.startswith("compile.metrics") for field, _ in problems):
        problems += metric_shape_problems(spec)
    return problems


def _optimizer_problems(spec: JobSpec) -> list[tuple[str, str]]:
    optimizer = spec.compile.optimizer
    if isinstance(optimizer, str):
        optimizers = optimizer_names()
        if optimizer.lower() in optimizers:
            return []
        return [("compile.optimizer", f"unknown optimizer '{optimizer}'{_suggest(optimizer.lower(), optimizers)} "
                                      f"(allowed: {', '.join(optimizers)}){_elsewhere(optimizer, 'optimizer')}")]
    if isinstance(optimizer, OptimizerSpec):
        return [(field.replace("compile.optimizer.config", "compile.optimizer").replace(
                    "compile.optimizer.class_name", "compile.optimizer.type"), message)
                for field, message in object_problems("compile.optimizer", optimizer.as_object(), "optimizer")]
    return object_problems("compile.optimizer", optimizer, "optimizer")


def _reduces_values(field: str, class_name: str) -> list[tuple[str, str]]:
    """Mean, Sum and MeanTensor reduce a tensor of values, not labels against outputs."""
    metric = keras_classes("metric").get(class_name)
    if metric is not None and "y_true" not in inspect.signature(metric.update_state).parameters:
        return [(f"{field}.class_name", f"'{class_name}' reduces a tensor of values, not labels against "
                                        "outputs: compile cannot feed it; choose a metric of labels and outputs")]
    return []


# The Keras namespace of each slot (a key of orchestra.spec.keras_objects.NAMESPACES) and its base class.
def _namespace(slot: str) -> tuple[Any, type]:
    k = keras()
    return {
        "optimizer": (k.optimizers, k.optimizers.Optimizer),
        "loss": (k.losses, k.losses.Loss),
        "metric": (k.metrics, k.metrics.Metric),
        "schedule": (k.optimizers.schedules, k.optimizers.schedules.LearningRateSchedule),
        "initializer": (k.initializers, k.initializers.Initializer),
        "regularizer": (k.regularizers, k.regularizers.Regularizer),
        "constraint": (k.constraints, k.constraints.Constraint),
    }[slot]


def keras_classes(slot: str) -> dict[str, type]:
    """The classes a spec may name in `slot`: the concrete subclasses of the
    slot's base class that its Keras namespace exports (no wrappers, which
    take a Python function)."""
    module, base = _namespace(slot)
    found = {}
    for name in dir(module):
        value = getattr(module, name)
        if (not name.startswith("_") and inspect.isclass(value) and issubclass(value, base) and value is not base
                and not name.endswith("Wrapper") and not inspect.isabstract(value)):
            found[name] = value
    return found


def _class_of(slot: str, name: str) -> type | None:
    """A class of the slot's namespace; optimizers by any case, as Keras's `get` finds them."""
    classes = keras_classes(slot)
    if slot == "optimizer":
        return {key.lower(): value for key, value in classes.items()}.get(name.lower())
    return classes.get(name)


def _elsewhere(name: str, slot: str) -> str:
    """`; it is a class of keras.losses` when a name belongs to another slot."""
    for other in ("optimizer", "loss", "metric", "schedule"):
        if other != slot and _class_of(other, name) is not None and (slot, other) != ("loss", "metric"):
            return f"; '{name}' is a class of {NAMESPACES[other]}, not of {NAMESPACES[slot]}"
    return ""


def constructor_arguments(cls: type) -> tuple[list[str], list[str]]:
    """(every argument the class's constructor takes, those it needs): its
    own `__init__`'s, and those of the Keras base classes its `**kwargs`
    pass on to."""
    accepted: list[str] = []
    required: list[str] | None = None
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if not klass.__module__.startswith("tf_keras"):
            break
        parameters = list(inspect.signature(init).parameters.values())[1:]
        named = [p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        accepted += [p.name for p in named if p.name not in accepted]
        if required is None:
            required = [p.name for p in named if p.default is inspect.Parameter.empty]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return accepted, required or []


# A key of an optimizer's `get_config()`, not a constructor argument: false (current optimizers) only.
_LEGACY_FLAG = "is_legacy_optimizer"
# Arguments Keras has renamed, which old scripts still use.
_RENAMED = {"lr": "learning_rate", "beta1": "beta_1", "beta2": "beta_2"}


def object_problems(field: str, obj: KerasObjectSpec, slot: str) -> list[tuple[str, str]]:
    """A Keras object against Keras: its class in the slot's namespace, its
    arguments against the constructor's (unknown ones with the close match,
    missing required ones), a schedule inside an optimizer likewise."""
    cls = _class_of(slot, obj.class_name)
    if cls is None:
        classes = sorted(keras_classes(slot))
        function = ""
        if slot in ("loss", "metric") and obj.class_name in (loss_names() if slot == "loss" else metric_names()):
            function = (f"; '{obj.class_name}' is a function: give it as a name (\"{obj.class_name}\"), or name "
                        "its class")
        return [(f"{field}.class_name", f"unknown {slot} class '{obj.class_name}'"
                                        f"{_suggest(obj.class_name, classes)}{function}"
                                        f"{_elsewhere(obj.class_name, slot)} (allowed: classes of "
                                        f"{NAMESPACES[slot]}: {', '.join(classes)})")]
    accepted, required = constructor_arguments(cls)
    problems = []
    for key, value in obj.config.items():
        if slot == "optimizer" and key == _LEGACY_FLAG:
            if value is not False:
                problems.append((f"{field}.config.{key}", "orchestra trains with Keras's current optimizers: "
                                                          "leave it out or set it to false"))
        elif key not in accepted:
            hint = f"; did you mean '{_RENAMED[key]}'?" if _RENAMED.get(key) in accepted else _suggest(key, accepted)
            problems.append((f"{field}.config.{key}", f"{cls.__name__} takes no argument '{key}'{hint} "
                                                      f"(it takes: {', '.join(accepted)})"))
        elif (slot, key) in NESTED and isinstance(value, dict):
            problems += object_problems(f"{field}.config.{key}", KerasObjectSpec.model_validate(value),
                                        NESTED[(slot, key)])
    missing = [name for name in required if name not in obj.config]
    if missing:
        problems.append((f"{field}.config", f"{cls.__name__} needs {', '.join(missing)} (it takes: "
                                            f"{', '.join(accepted)})"))
    return problems


def make_object(obj: KerasObjectSpec, slot: str):
    """The Keras object: its class called with its arguments (a schedule
    in an optimizer's `learning_rate` built first). Raises FieldError-free
    TypeError/ValueError from Keras for values the class refuses."""
    cls = _class_of(slot, obj.class_name)
    if cls is None:
        raise ValueError(f"unknown {slot} class '{obj.class_name}'")
    config = {key: value for key, value in obj.config.items() if not (slot == "optimizer" and key == _LEGACY_FLAG)}
    for key, value in config.items():
        if (slot, key) in NESTED and isinstance(value, dict):
            config[key] = make_object(KerasObjectSpec.model_validate(value), NESTED[(slot, key)])
    return cls(**config)


# y_true and y_pred for the shape check of a metric's result: two examples.
_SHAPE_CHECK_EXAMPLES = 2


def metric_shape_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """Metrics whose result is not one number (F1Score with average=None,
    Precision at several thresholds, ...): orchestra logs, aggregates,
    monitors and charts one number a metric, so these are refused here.
    Each metric is built and updated on two examples of the model's output
    width (the last Dense's units; 3 when the spec does not say)."""
    import numpy as np

    width = spec.output_width[1] if spec.output_width else 3
    problems = []
    for i, (metric, kind) in enumerate(zip(spec.compile.metric_objects, spec.compile.metric_kinds)):
        if isinstance(spec.compile.metrics[i], str) and not kind[:1].isupper():
            continue  # a function's name: Keras wraps it in a mean, one number
        try:
            built = make_object(metric, "metric")
            classes = np.arange(_SHAPE_CHECK_EXAMPLES) % max(width, 2)
            y_pred = np.full((_SHAPE_CHECK_EXAMPLES, width), 0.25, np.float32)
            y_pred[np.arange(_SHAPE_CHECK_EXAMPLES), classes % width] = 0.75
            if kind in SPARSE_METRICS:
                y_true = classes.reshape(-1, 1).astype(np.int32)
            elif width == 1:
                y_true = (classes % 2).reshape(-1, 1).astype(np.float32)
            else:
                y_true = np.eye(width, dtype=np.float32)[classes % width]
            built.update_state(y_true, y_pred)
            shape = tuple(built.result().shape)
        except Exception:  # noqa: BLE001 - labels of another kind: the trial step judges the metric on the data
            continue
        if shape:
            problems.append((f"compile.metrics.{i}", vector_metric_message(kind, shape)))
    return problems


def vector_metric_message(kind: str, shape: tuple) -> str:
    """Why a metric whose result has `shape` is refused, and what to do."""
    hint = {"F1Score": "give config.average 'micro', 'macro' or 'weighted'",
            "FBetaScore": "give config.average 'micro', 'macro' or 'weighted'",
            "Precision": "give one threshold (config.thresholds a number), or one metric per threshold",
            "Recall": "give one threshold (config.thresholds a number), or one metric per threshold"}.get(
                kind, "choose a configuration with one number as its result")
    return (f"{kind}'s result is {len(shape)}-dimensional, shape {list(shape)}, not one number: orchestra logs, "
            f"averages over workers, monitors and charts one number a metric; {hint}")


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


def make_optimizer(spec: OptimizerSpec | KerasObjectSpec):
    """The optimizer, from the short form or Keras's config form."""
    return make_object(spec.as_object() if isinstance(spec, OptimizerSpec) else spec, "optimizer")


def build_model(spec: JobSpec, input_shape: tuple[int, ...], steps_per_execution: int = 1):
    """The Sequential model the spec describes, compiled. Call it inside a
    distribution strategy's scope to get distributed variables."""
    model = assemble_model(spec, input_shape)
    compile_spec = spec.compile
    try:
        optimizer = make_optimizer(compile_spec.optimizer_object)
    except (TypeError, ValueError) as exc:
        raise FieldError("compile.optimizer", f"{compile_spec.optimizer_object.class_name}: {exc}") from None
    loss: Any = compile_spec.loss
    if isinstance(loss, KerasObjectSpec):
        try:
            loss = make_object(loss, "loss")
        except (TypeError, ValueError) as exc:
            raise FieldError("compile.loss", f"{loss.class_name}: {exc}") from None
    metrics = []
    for i, (metric, logged) in enumerate(zip(compile_spec.metrics, compile_spec.metric_names)):
        if isinstance(metric, str) and metric in keras_classes("metric"):
            metric = KerasObjectSpec.model_construct(class_name=metric, config={})
        if isinstance(metric, KerasObjectSpec):
            # Named as the spec logs it: Keras would number a second unnamed instance in a process (auc_1).
            metric = KerasObjectSpec.model_construct(class_name=metric.class_name,
                                                     config={"name": logged, **metric.config})
        try:
            metrics.append(make_object(metric, "metric") if isinstance(metric, KerasObjectSpec) else metric)
        except (TypeError, ValueError) as exc:
            raise FieldError(f"compile.metrics.{i}", f"{metric.class_name}: {exc}") from None
    try:
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics, steps_per_execution=steps_per_execution)
    except (TypeError, ValueError) as exc:
        raise FieldError("compile", str(exc)) from None
    return model


def assemble_model(spec: JobSpec, input_shape: tuple[int, ...]):
    """The spec's layers as a model, not compiled (built in a `tf.Graph`,
    its weights are shapes only: what pre-flight sizes). Under a mixed
    precision policy its layers compute in float16 or bfloat16, the last
    one in float32."""
    with precision_policy(spec):
        return _assemble_model(spec, input_shape)


def _assemble_model(spec: JobSpec, input_shape: tuple[int, ...]):
    k = keras()
    k.utils.set_random_seed(spec.seed)
    shape = tuple(spec.model.input_shape) if spec.model.input_shape else input_shape
    layers = []
    for i, layer in enumerate(spec.model.layers):
        try:
            last = i == len(spec.model.layers) - 1
            layers.append(getattr(k.layers, layer.type)(**(output_arguments(spec, layer.arguments) if last
                                                           else layer.arguments)))
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
