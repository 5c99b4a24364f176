"""Method classes and presets by name, and the resolution of a user's method spec into method objects.

Presets live in ``configs/<method>.yaml`` (installed as ``mitigate.configs``)::

    method: var
    presets:
      var:
        summary: one line
        models: [llava-hf/llava-1.5-7b-hf]   # model ids this preset is the default for (optional)
        params: {tau: 20, ...}
        sources: {tau: "where the number comes from", ...}
      var-paper:
        base: var                            # inherit params and sources, then override
        params: {moved_fraction: 0.6}

``apply_mitigation(model, "var")`` uses the preset that lists the model's id under ``models`` if there is
one, else the preset named like the method.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..context import ModelInfo
from ..errors import ConfigError, UnknownMethodError
from .base import Method

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    _METHODS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Preset:
    name: str
    method: str
    summary: str
    params: dict[str, Any]
    sources: dict[str, str]
    models: tuple[str, ...] = field(default_factory=tuple)


def _config_dir():
    """The installed ``mitigate.configs`` package, or ``configs/`` of a source checkout on ``sys.path``."""
    try:
        return resources.files("mitigate.configs")
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parents[2] / "configs"
        if not folder.is_dir():
            raise
        return folder


def _method_classes() -> dict[str, type[Method]]:
    from . import gift, pai, paint, vaf, var, vhr  # noqa: F401  (each registers itself)

    return _METHODS


@cache
def presets() -> dict[str, Preset]:
    """All presets from the YAML files, inheritance resolved."""
    raw: dict[str, tuple[str, dict[str, Any]]] = {}
    for entry in sorted(_config_dir().iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        doc = yaml.safe_load(entry.read_text())
        for name, body in (doc.get("presets") or {}).items():
            if name in raw:
                raise RuntimeError(f"preset {name!r} defined twice (configs/{entry.name})")
            raw[name] = (doc["method"], body or {})

    resolved: dict[str, Preset] = {}

    def build(name: str, seen: tuple[str, ...] = ()) -> Preset:
        if name in resolved:
            return resolved[name]
        if name in seen:
            raise RuntimeError(f"preset inheritance cycle: {' -> '.join((*seen, name))}")
        method, body = raw[name]
        params: dict[str, Any] = {}
        sources: dict[str, str] = {}
        if "base" in body:
            base = build(body["base"], (*seen, name))
            params.update(base.params)
            sources.update(base.sources)
        params.update(body.get("params") or {})
        sources.update(body.get("sources") or {})
        resolved[name] = Preset(
            name=name,
            method=method,
            summary=body.get("summary", ""),
            params=params,
            sources=sources,
            models=tuple(body.get("models") or ()),
        )
        return resolved[name]

    for name in raw:
        build(name)
    return resolved


def method_class(name: str) -> type[Method]:
    methods = _method_classes()
    if name not in methods:
        raise UnknownMethodError(_unknown(name))
    return methods[name]


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_method_classes())


def list_presets(method: str | None = None) -> list[str]:
    return sorted(n for n, p in presets().items() if method is None or p.method == method)


def _unknown(name: str) -> str:
    names = sorted(set(list_methods()) | set(list_presets()))
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown method or preset {name!r}.{hint} Known: {', '.join(names)}"


def _matches_model(preset: Preset, info: ModelInfo) -> bool:
    name = info.name_or_path.lower().rstrip("/")
    return any(name == m.lower() or name.endswith("/" + m.lower().split("/")[-1]) for m in preset.models)


def find_preset(name: str, info: ModelInfo | None = None) -> Preset:
    """The preset for a method or preset name; a method name picks the preset made for this model if any."""
    table = presets()
    if name in _method_classes():
        if info is not None:
            for preset in table.values():
                if preset.method == name and _matches_model(preset, info):
                    return preset
        if name not in table:
            raise RuntimeError(f"method {name!r} has no default preset in configs/")
        return table[name]
    if name in table:
        return table[name]
    raise UnknownMethodError(_unknown(name))


def build_method(
    name: str, info: ModelInfo, overrides: dict[str, Any] | None = None, processor: Any = None
) -> Method:
    """A method object from a method or preset name plus parameter overrides, validated for this model."""
    preset = find_preset(name, info)
    cls = method_class(preset.method)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(cls.Config.model_fields))
    if unknown:
        raise ConfigError(
            f"{cls.name}: unknown parameter(s) {unknown}; parameters are {sorted(cls.Config.model_fields)}"
        )
    try:
        config = cls.Config(**{**preset.params, **overrides})
    except ValidationError as exc:
        raise ConfigError(f"{cls.name} ({preset.name}): {exc}") from exc
    return cls(config, info, preset=preset.name, processor=processor)


def resolve_spec(
    spec: Any, info: ModelInfo, overrides: dict[str, Any], processor: Any = None
) -> list[Method]:
    """Turn ``"var"``, ``"var-paper"``, ``["var", "vhr"]`` or ``{"var": {...}}`` into method objects."""
    if isinstance(spec, str):
        return [build_method(spec, info, overrides, processor)]
    if overrides:
        raise ConfigError(
            "keyword overrides apply to a single method; for several, use the dict form "
            "{'var': {'tau': 10}, 'vhr': {...}}"
        )
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, list | tuple):
        items = [(name, {}) for name in spec]
    else:
        raise ConfigError(
            f"method must be a name, a list of names or a dict of name -> params, not {type(spec).__name__}"
        )
    if not items:
        raise ConfigError("no method given")
    for name, params in items:
        if not isinstance(name, str) or not isinstance(params, dict):
            raise ConfigError(f"bad method entry {name!r}: {params!r}")
    kinds = [find_preset(name, info).method for name, _ in items]
    dup = sorted({k for k in kinds if kinds.count(k) > 1})
    if dup:
        raise ConfigError(f"method(s) {dup} given more than once")
    methods = [build_method(name, info, params, processor) for name, params in items]
    check_compatible(methods)
    return methods


#: pairs of methods that must not be combined, and why
INCOMPATIBLE = {
    frozenset({"pai", "paint"}): "PAINT is PAI with its image-logit boost split into local and summary "
    "token sets; together they boost the same logits twice. Use one of them.",
}


def check_compatible(methods: list[Method]) -> None:
    names = [m.name for m in methods]
    for pair, why in INCOMPATIBLE.items():
        if pair <= set(names):
            raise ConfigError(f"cannot combine {' and '.join(sorted(pair))}: {why}")
    # methods that need a probe prefill (VHR, GIFT with its saliency after an enhanced layer) share one
