"""Plugin registries: methods, tasks and formulations register themselves here, by name.

A method, task or formulation is one module that calls ``register`` at import. The registries find the
built-in ones by importing every module of their package (``lora_exp.methods`` ...) and third-party ones
through the ``lora_exp.plugins`` entry-point group, so adding one edits nothing else: the spec's unions and
enums (``lora_exp.config.schema``), sanity's trainable-parameter rules and the report's labels all read the
registry. Built-ins are discovered on first use, all three packages at once, which keeps this layer free of
imports of the layers above it (discovery goes through ``importlib``, as entry points do).

Listeners (``on_change``) hear of every registration after discovery: the spec schema rebuilds its unions.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import pkgutil
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from lora_exp.core.errors import SpecError

log = logging.getLogger(__name__)

T = TypeVar("T")
ENTRY_POINT_GROUP = "lora_exp.plugins"  # each entry point names a module that registers on import

_lock = threading.RLock()
_state = {"discovered": False, "discovering": False}
_listeners: list[Callable[[], None]] = []


class Registry(Generic[T]):
    """Name -> item. ``what`` names the kind in messages; ``package`` holds the built-in modules."""

    def __init__(self, what: str, package: str) -> None:
        self.what = what
        self.package = package
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
        discover()
        try:
            return self._items[name]
        except KeyError:
            raise SpecError(f"unknown {self.what} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """Registered names in registration order (the built-ins' module order, then plugins)."""
        discover()
        return list(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        discover()
        yield from list(self._items.items())

    def __contains__(self, name: object) -> bool:
        discover()
        return name in self._items


# Typed as Any-holding registries here; each layer wraps its own in a typed accessor
# (``lora_exp.methods.get_method`` ...). The packages are imported by name only, at discovery.
METHODS: Registry[object] = Registry("method", "lora_exp.methods")
TASKS: Registry[object] = Registry("task", "lora_exp.tasks")
FORMULATIONS: Registry[object] = Registry("formulation", "lora_exp.formulations")
_PACKAGES = (TASKS.package, FORMULATIONS.package, METHODS.package)


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener`` after each registration once discovery is done (and once when it completes)."""
    _listeners.append(listener)


def _notify() -> None:
    if _state["discovered"] and not _state["discovering"]:
        for listener in list(_listeners):
            listener()


def discover() -> None:
    """Import every built-in plugin module and the entry-point plugins, once per process."""
    if _state["discovered"] or _state["discovering"]:
        return
    with _lock:
        if _state["discovered"] or _state["discovering"]:
            return
        _state["discovering"] = True
        try:
            for package in _PACKAGES:
                pkg = importlib.import_module(package)
                for mod in pkgutil.iter_modules(pkg.__path__, prefix=package + "."):
                    importlib.import_module(mod.name)
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                log.debug("loading lora-exp plugin %s (%s)", ep.name, ep.value)
                importlib.import_module(ep.value)
        finally:
            _state["discovering"] = False
        _state["discovered"] = True
    _notify()
