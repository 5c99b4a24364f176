"""The command line's method options, parsed and checked before any model is loaded.

``--method var`` (a method or preset), ``--method var,vhr`` (several, composed) or ``--method vanilla``;
``--set key=value`` sets a parameter of the single method, ``--set var.tau=15`` one of the method ``var``
in a composition (an unqualified key is accepted there when exactly one of the methods has it). Values are
YAML (``3``, ``[1, 2]``, ``auto``, ``null``).

:func:`method_request` turns the options into what :func:`mitigate.apply_mitigation` takes, after checking
every name and value that can be checked without the model (unknown names get a "did you mean"). What
depends on the model (layer ranges, the model family) is checked when the method is applied, right after
the model is loaded and before anything is generated.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError

VANILLA = ("none", "vanilla")


def is_vanilla(method: str) -> bool:
    return method.strip().lower() in VANILLA


def parse_sets(values: list[str] | None) -> dict[str, Any]:
    """``--set`` items as ``{key: value}``; keys may be qualified (``var.tau``)."""
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (or method.key=value), got {item!r}")
        try:
            out[key] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            where = getattr(error, "problem", None) or "not valid YAML"
            raise ConfigError(f"--set {item}: the value is not valid YAML ({where})") from None
    return out


def parse_method(spec: str) -> str | list[str]:
    """``var`` or ``var,vhr`` (several methods, composed)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else parts


@dataclass
class MethodRequest:
    """What :func:`mitigate.apply_mitigation` takes: ``apply_mitigation(model, spec, **overrides)``."""

    spec: str | dict[str, dict[str, Any]]
    overrides: dict[str, Any] = field(default_factory=dict)


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _method_of(name: str) -> tuple[str, type]:
    """(method name, method class) of a method or preset name; an unknown name fails with a suggestion."""
    from .methods import find_preset
    from .methods.registry import method_class

    preset = find_preset(name)
    return preset.method, method_class(preset.method)


def _check(name: str, params: dict[str, Any]) -> None:
    """Parameter names and values of one method, as far as they can be checked without the model."""
    from pydantic import ValidationError

    from .cli_errors import validation_message
    from .methods import find_preset

    method, cls = _method_of(name)
    fields = sorted(cls.Config.model_fields)
    for key in params:
        if key not in fields:
            raise ConfigError(
                f"{method}: unknown parameter {key!r}.{_did_you_mean(key, fields)} "
                f"Parameters of {method}: {', '.join(fields)}"
            )
    preset = find_preset(name)
    try:
        cls.Config(**{**preset.params, **params})
    except ValidationError as error:
        raise ConfigError(f"{method} ({preset.name}): {validation_message(error)}") from None


def method_request(method: str, sets: dict[str, Any] | None = None) -> MethodRequest:
    """Check ``--method`` and ``--set`` and turn them into a :class:`MethodRequest`."""
    sets = dict(sets or {})
    if is_vanilla(method):
        raise ConfigError("vanilla is not a method (it is the model without one); give a method name")
    names = [p.strip() for p in method.split(",") if p.strip()]
    if not names:
        raise ConfigError("--method is empty; give a method or preset name (see: mitigate methods)")
    if len(set(names)) != len(names):
        raise ConfigError(f"--method {method}: a method is named twice")
    methods = {name: _method_of(name)[0] for name in names}
    params: dict[str, dict[str, Any]] = {name: {} for name in names}
    for key, value in sets.items():
        target, _, param = key.rpartition(".")
        if target:
            owners = [n for n in names if target in (n, methods[n])]
            if not owners:
                raise ConfigError(
                    f"--set {key}: {target!r} is not among the methods given "
                    f"({', '.join(names)}).{_did_you_mean(target, [*names, *methods.values()])}"
                )
            params[owners[0]][param] = value
            continue
        if len(names) == 1:
            params[names[0]][key] = value
            continue
        fields = {n: set(_method_of(n)[1].Config.model_fields) for n in names}
        owners = [n for n in names if key in fields[n]]
        if len(owners) == 1:
            params[owners[0]][key] = value
        elif owners:
            raise ConfigError(
                f"--set {key}: several of the methods have {key!r} ({', '.join(owners)}); say which one, "
                f"as in --set {methods[owners[0]]}.{key}=..."
            )
        else:
            every = sorted(set().union(*fields.values()))
            raise ConfigError(
                f"--set {key}: none of the methods ({', '.join(names)}) has a parameter {key!r}."
                f"{_did_you_mean(key, every)}"
            )
    for name in names:
        _check(name, params[name])
    if len(names) == 1:
        return MethodRequest(names[0], params[names[0]])
    return MethodRequest(params)
