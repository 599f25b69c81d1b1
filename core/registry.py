"""One rule for the registries of objectives and defences: a name, its factory, its defaults."""
from __future__ import annotations

from typing import Callable


def build(kind: str, factories: dict[str, Callable], defaults: dict[str, dict], name: str, options: dict,
          called: str = "options"):
    """`factories[name]` called with `defaults[name]` updated by `options`, its `name` attribute set.
    Raises KeyError naming the known names for an unknown `name` (a `kind`: "objective", "defence"),
    and TypeError naming what it takes (its `called`: "weights", "options") for an unknown option."""
    if name not in factories:
        raise KeyError(f"unknown {kind} {name!r}; known {kind}s: {sorted(factories)}")
    taken = defaults.get(name, {})
    unknown = sorted(set(options) - set(taken))
    if unknown:
        raise TypeError(f"{kind} {name!r} takes {called} {taken or 'none'}; unknown: {unknown}")
    built = factories[name](**(taken | options))
    built.name = name
    return built
