"""Task registry (the `saefeat.tasks` package): the built-in task modules and `saefeat.tasks` entry points.

Each built-in module of this package has a `run(cfg)` function and is registered in saefeat's own pyproject under
the `saefeat.tasks` entry-point group; a plugin adds its tasks to the same group in its own pyproject:

    [project.entry-points."saefeat.tasks"]
    mytask = "mypackage.mytask:run"

Built-ins are found by scanning this package too, so a source checkout whose installed metadata is stale still sees
every built-in. A name is never shadowed silently: the first registration wins (built-ins, then plugins in the order
of their 'module:function') and every other registration of that name is ignored with a `TaskNameClash` warning
naming both.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from saefeat.errors import SaefeatError

TaskFn = Callable[[Any], dict]
GROUP = "saefeat.tasks"


class TaskNameClash(UserWarning):
    """An entry point names a task that is already registered; it is ignored."""


def builtin_tasks() -> dict[str, str]:
    """Built-in task name -> 'module:function', from the modules of this package."""
    return {m.name: f"{__name__}.{m.name}:run" for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}


def _origin(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{ep.value!r} (distribution {dist.name})" if dist is not None else repr(ep.value)


def available_tasks() -> dict[str, str]:
    """Task name -> 'module:function' for the built-in tasks and installed plugins."""
    found = builtin_tasks()
    origins = {name: f"built-in {value!r}" for name, value in found.items()}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: (e.name, e.value)):
        if found.get(ep.name) == ep.value:  # a built-in's own registration (or the same plugin seen twice)
            continue
        if ep.name in found:
            warnings.warn(f"task {ep.name!r}: entry point {_origin(ep)} is ignored, the task is already registered "
                          f"as {origins[ep.name]}; rename the plugin's task", TaskNameClash, stacklevel=2)
            continue
        found[ep.name], origins[ep.name] = ep.value, f"entry point {_origin(ep)}"
    return found


def get_task(name: str) -> TaskFn:
    """The `run(cfg)` function of a task; an unknown name lists the valid ones."""
    tasks = available_tasks()
    if name not in tasks:
        raise SaefeatError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(tasks))}")
    module, _, fn = tasks[name].partition(":")
    return getattr(importlib.import_module(module), fn or "run")
