"""Methods by name: each module holds one method's config, state and edit (see :mod:`.base`)."""

from .base import Method, MethodConfig, PlanContext
from .registry import (
    build_method,
    find_preset,
    list_methods,
    list_presets,
    presets,
    register_method,
    resolve_spec,
)

__all__ = [
    "Method",
    "MethodConfig",
    "PlanContext",
    "build_method",
    "find_preset",
    "list_methods",
    "list_presets",
    "presets",
    "register_method",
    "resolve_spec",
]
