"""Plugin discovery: the built-in tasks, formulations and methods, then third-party plugins.

The top of the package (the CLI calls :func:`load` as it starts; so do the tests and the benchmarks), so that
the registries in ``lora_exp.core`` are filled by imports that run downwards, as the layer contracts say:
each plugin package imports its own modules (``lora_exp.tasks`` ...), and an installed distribution adds its
own through the ``lora_exp.plugins`` entry-point group, each entry point naming a module that registers on
import.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging

from lora_exp.core import registry

log = logging.getLogger(__name__)


def load() -> None:
    """Register every built-in and entry-point plugin, once per process."""
    if registry.loaded():
        return
    import lora_exp.formulations
    import lora_exp.methods
    import lora_exp.tasks  # noqa: F401 - imported for their registrations

    for ep in importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP):
        log.debug("loading lora-exp plugin %s (%s)", ep.name, ep.value)
        importlib.import_module(ep.value)
    registry.mark_loaded()
