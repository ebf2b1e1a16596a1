"""Which callback classes installed packages offer, by name, without importing them.

A package registers a driver-side callback under the entry-point group
`orchestra.callbacks` (`my_callback = my_package.module:MyCallback`); a spec
names it as `{"class_name": "my_callback", "config": {...}}`. The spec is
checked against these names with no import: importing a plugin runs its code,
which happens only on the driver (`orchestra.driver.plugins`).
"""

from __future__ import annotations

from importlib.metadata import entry_points

PLUGIN_GROUP = "orchestra.callbacks"


def registered_callbacks() -> dict[str, str]:
    """Registered name → `module:attribute`, for every installed plugin callback."""
    return {point.name: point.value for point in entry_points(group=PLUGIN_GROUP)}
