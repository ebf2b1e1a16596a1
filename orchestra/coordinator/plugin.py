"""A user's callback, run by the Coordinator like orchestra's own, kept apart.

A plugin callback is someone else's code on the driver: what it adds to the
record goes under its own name (`record.plugins[name]`), checked to be plain
JSON of bounded size (the record is read back as input); its state in a
checkpoint is keyed by its name, not its class; and an exception it raises
fails the job with a reason naming the callback and its spec field, as an
exception in a Keras callback fails `fit`.
"""

from __future__ import annotations

import json
from typing import Any

from orchestra.coordinator.base import CoordinatorCallback, EpochResult
from orchestra.coordinator.protocol import CheckpointRef, Decision
from orchestra.errors import OrchestraError

MAX_RECORD_BYTES = 64_000


class PluginError(OrchestraError):
    """A plugin callback raised, or gave the record what it cannot hold."""


class PluginCallback(CoordinatorCallback):
    """Runs `inner`, registered as `name` and written at spec field `field`.

    Args:
        name: the registered name (the spec's `class_name`).
        field: the spec path of its entry, e.g. `callbacks.2`.
        inner: the plugin's callback instance.

    Example:

    >>> class Counter(CoordinatorCallback):
    ...     def __init__(self):
    ...         self.epochs = 0
    ...     def on_epoch_end(self, result, decision):
    ...         self.epochs += 1
    ...     def record_fields(self):
    ...         return {"epochs_seen": self.epochs}
    >>> plugin = PluginCallback("counter", "callbacks.0", Counter())
    >>> plugin.on_epoch_end(EpochResult(1, {"loss": 0.5}, 1.0, 10.0), Decision())
    >>> plugin.record_fields()
    {}
    >>> plugin.plugin_fields()
    {'epochs_seen': 1}
    """

    def __init__(self, name: str, field: str, inner: CoordinatorCallback):
        self.name, self.field, self.inner = name, field, inner

    @property
    def state_key(self) -> str:
        return f"plugin:{self.name}"

    def on_train_begin(self, job_id: str) -> None:
        self._run("on_train_begin", job_id)

    def on_epoch_end(self, result: EpochResult, decision: Decision) -> None:
        self._run("on_epoch_end", result, decision)

    def on_checkpoint_saved(self, checkpoint: CheckpointRef) -> None:
        self._run("on_checkpoint_saved", checkpoint)

    def on_train_end(self, final: dict[str, Any]) -> None:
        self._run("on_train_end", final)

    def state_dict(self) -> dict[str, Any]:
        return self._plain(self._run("state_dict"), "state_dict")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._run("load_state_dict", state)

    def record_fields(self) -> dict[str, Any]:
        return {}  # a plugin's fields live under record.plugins, never over orchestra's own

    def plugin_fields(self) -> dict[str, Any]:
        """What the plugin adds to the record, checked to be plain JSON."""
        return self._plain(self._run("record_fields"), "record_fields")

    def _run(self, hook: str, *args: Any) -> Any:
        try:
            return getattr(self.inner, hook)(*args)
        except OrchestraError:
            raise
        except Exception as exc:  # noqa: BLE001 - the plugin's failure becomes the job's reason
            raise PluginError(f"the callback {self.name!r} ({self.field}) raised in {hook}: "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from exc

    def _plain(self, value: Any, hook: str) -> dict[str, Any]:
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise PluginError(f"the callback {self.name!r} ({self.field}): {hook} must return plain JSON "
                              f"(numbers, strings, lists, dicts): {exc}") from None
        if not isinstance(value, dict) or len(text) > MAX_RECORD_BYTES:
            raise PluginError(f"the callback {self.name!r} ({self.field}): {hook} must return a dict of at most "
                              f"{MAX_RECORD_BYTES} bytes as JSON")
        return value
