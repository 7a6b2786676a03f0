"""Plugin registries: methods, tasks and formulations register themselves here, by name.

A method, task or formulation is one module that calls ``register`` at import, so adding one edits nothing
else: the spec's unions and enums (``lora_exp.config.schema``), sanity's trainable-parameter rules and the
report's labels all read the registry. This module only holds them: ``lora_exp.plugins.load`` (the top layer,
called by the CLI) imports the built-in plugin packages, each of which imports its own modules, and the
third-party ones of the ``lora_exp.plugins`` entry-point group, then marks the registries loaded. Reading a
registry before that is an error that says so, never an empty list taken for the truth.

Listeners (``on_change``) hear of every registration once the registries are loaded (and once when they are):
the spec schema rebuilds its unions, so a method defined later (a test file's) validates like a built-in one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from lora_exp.core.errors import SpecError

log = logging.getLogger(__name__)

T = TypeVar("T")
ENTRY_POINT_GROUP = "lora_exp.plugins"  # each entry point names a module that registers on import

_lock = threading.RLock()
_state = {"loaded": False}
_listeners: list[Callable[[], None]] = []


class Registry(Generic[T]):
    """Name -> item. ``what`` names the kind in messages; ``package`` holds the built-in modules."""

    def __init__(self, what: str, package: str) -> None:
        self.what = what
        self.package = package  # the built-in plugins' package (lora_exp.plugins imports it)
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T, *, replace: bool = False) -> T:
        """Add ``item`` under ``name``; a different item under a taken name is refused (``replace`` to swap)."""
        with _lock:
            current = self._items.get(name)
            if current is not None and current is not item and not replace:
                raise ValueError(f"{self.what} {name!r} is already registered ({current!r})")
            self._items[name] = item
        _notify()
        return item

    def unregister(self, name: str) -> None:
        with _lock:
            self._items.pop(name, None)
        _notify()

    def get(self, name: str) -> T:
        """The item, or a SpecError that lists the known names."""
        _require_loaded()
        try:
            return self._items[name]
        except KeyError:
            raise SpecError(f"unknown {self.what} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """Registered names in registration order (the built-ins' module order, then plugins)."""
        _require_loaded()
        return list(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        _require_loaded()
        yield from list(self._items.items())

    def __contains__(self, name: object) -> bool:
        _require_loaded()
        return name in self._items


# Typed as Any-holding registries here; each layer wraps its own in a typed accessor
# (``lora_exp.methods.get_method`` ...).
METHODS: Registry[object] = Registry("method", "lora_exp.methods")
TASKS: Registry[object] = Registry("task", "lora_exp.tasks")
FORMULATIONS: Registry[object] = Registry("formulation", "lora_exp.formulations")


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener`` after each registration once the registries are loaded (and once when they are)."""
    _listeners.append(listener)


def _notify() -> None:
    if _state["loaded"]:
        for listener in list(_listeners):
            listener()


def loaded() -> bool:
    return _state["loaded"]


def mark_loaded() -> None:
    """Called by ``lora_exp.plugins.load`` once every plugin registered: listeners hear of it once."""
    with _lock:
        if _state["loaded"]:
            return
        _state["loaded"] = True
    _notify()


def _require_loaded() -> None:
    if not _state["loaded"]:
        raise RuntimeError("lora-exp's plugin registries are not loaded yet: call lora_exp.plugins.load() first "
                           "(the CLI does as it starts)")
