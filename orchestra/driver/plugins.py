"""The user's own driver-side callbacks, from installed packages.

A spec never holds code: it names a callback that an installed package
registered under the entry-point group `orchestra.callbacks`, with plain
arguments. This module is the only place such a class is imported, on the
driver, after the spec has passed its structural checks; pre-flight builds
every plugin callback once, so a missing package, a class that is not a
`CoordinatorCallback` or an argument its constructor does not take is
refused before any worker starts.

Example (`examples/orchestra_seed_callbacks` registers these two):

    >>> from orchestra.spec.plugins import registered_callbacks
    >>> sorted(registered_callbacks())  # doctest: +SKIP
    ['epoch_logger', 'train_summary']
"""

from __future__ import annotations

import inspect
from importlib.metadata import entry_points
from typing import Any

from orchestra.coordinator import CoordinatorCallback
from orchestra.coordinator.plugin import PluginCallback
from orchestra.errors import FieldError, close_match
from orchestra.spec import JobSpec
from orchestra.spec.plugins import PLUGIN_GROUP, registered_callbacks


def plugin_class(name: str, field: str) -> type[CoordinatorCallback]:
    """The class registered as `name`, imported. Raises FieldError naming
    `field` when nothing is registered under the name, the import fails or
    the object is not a CoordinatorCallback subclass."""
    points = [point for point in entry_points(group=PLUGIN_GROUP) if point.name == name]
    if not points:
        registered = sorted(registered_callbacks())
        close = close_match(name, registered)
        raise FieldError(field, f"no installed package registers a callback {name!r} in the entry-point group "
                                f"{PLUGIN_GROUP!r}; registered: {', '.join(registered) or 'none'}"
                                + (f" (did you mean {close!r}?)" if close else ""))
    if len({point.value for point in points}) > 1:
        raise FieldError(field, f"{name!r} is registered by more than one package "
                                f"({', '.join(sorted(point.value for point in points))}); uninstall one")
    try:
        loaded = points[0].load()
    except Exception as exc:  # noqa: BLE001 - any import error of someone else's package is the spec's problem
        raise FieldError(field, f"the callback {name!r} ({points[0].value}) cannot be imported: "
                                f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not (isinstance(loaded, type) and issubclass(loaded, CoordinatorCallback)):
        raise FieldError(field, f"{name!r} ({points[0].value}) is not a subclass of "
                                "orchestra.CoordinatorCallback")
    return loaded


def plugin_callback(name: str, config: dict[str, Any], field: str) -> CoordinatorCallback:
    """The plugin callback `name` made with `config` as keyword arguments,
    wrapped to run apart from orchestra's own (`PluginCallback`). Raises FieldError naming `field` (e.g. `callbacks.2`)
    or `field.config.<argument>` for an argument the constructor does not take."""
    cls = plugin_class(name, field)
    parameters = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = [p.name for p in parameters.values()
                if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for argument in config:
        if argument not in accepted and not takes_any:
            close = close_match(argument, accepted)
            raise FieldError(f"{field}.config.{argument}",
                             f"{name!r} takes no argument {argument!r}; it takes: {', '.join(accepted) or 'none'}"
                             + (f" (did you mean {close!r}?)" if close else ""))
    missing = [p.name for p in parameters.values() if p.name != "self" and p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in config]
    if missing:
        raise FieldError(f"{field}.config", f"{name!r} needs {', '.join(missing)}")
    try:
        inner = cls(**config)
    except Exception as exc:  # noqa: BLE001 - the plugin's own argument checks
        raise FieldError(f"{field}.config", f"{name!r} refused its arguments: "
                                            f"{type(exc).__name__}: {str(exc)[:200]}") from None
    return PluginCallback(name, field, inner)


def plugin_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """(field, message) for each plugin callback of the spec that cannot be
    made: pre-flight builds each once, and throws it away."""
    problems = []
    for index, entry in enumerate(spec.callbacks):
        if entry.is_plugin:
            try:
                plugin_callback(entry.class_name, dict(entry.config), f"callbacks.{index}")
            except FieldError as exc:
                problems.append((exc.field, str(exc)))
    return problems
