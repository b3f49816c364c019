"""Task registry: every module in this package with a `run(cfg)` function, plus `saefeat.tasks` entry points."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

TaskFn = Callable[[Any], dict]


def available_tasks() -> dict[str, str]:
    """Task name -> 'module:function' for the built-in tasks and installed plugins."""
    found = {m.name: f"tasks.{m.name}:run" for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    for ep in entry_points(group="saefeat.tasks"):
        found[ep.name] = ep.value
    return found


def get_task(name: str) -> TaskFn:
    """The `run(cfg)` function of a task; an unknown name lists the valid ones."""
    tasks = available_tasks()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(tasks))}")
    module, _, fn = tasks[name].partition(":")
    return getattr(importlib.import_module(module), fn or "run")
