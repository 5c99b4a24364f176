"""The ``mitigation`` request field: every form ``apply_mitigation`` takes, reduced to one canonical spec.

Accepted forms (``null`` asks for no mitigation, an absent field for the server's default)::

    "var"                                        a method or preset
    ["var", "vhr"]                               several, composed in this order
    {"var": {"tau": 10}, "vhr": {}}              several, with parameters
    {"method": "var", "params": {"tau": 10}}     one method with parameters (``method`` may be a list)

Two requests batch together exactly when their canonical specs are equal. Validation goes through the
method registry (the checks ``apply_mitigation`` makes), without touching the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from torch import nn

from ..errors import MitigationError, UnknownMethodError
from ..methods import resolve_spec
from .errors import bad_request

VANILLA_NAMES = ("none", "vanilla")


@dataclass(frozen=True)
class Spec:
    """An ordered tuple of ``(method or preset, params)``; empty means no mitigation."""

    methods: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    @property
    def vanilla(self) -> bool:
        return not self.methods

    @property
    def key(self) -> str:
        return json.dumps([[name, dict(params)] for name, params in self.methods], sort_keys=True)

    def as_apply_arg(self) -> dict[str, dict[str, Any]]:
        """The dict form ``apply_mitigation`` takes (one entry per method, in order)."""
        return {name: _unfreeze(dict(params)) for name, params in self.methods}

    def label(self) -> str:
        """Short form for logs and responses: ``var``, ``var+vhr``, ``var(tau=10)``, ``none``."""
        if self.vanilla:
            return "none"
        parts = []
        for name, params in self.methods:
            args = ",".join(f"{k}={json.dumps(_unfreeze(v))}" for k, v in params)
            parts.append(f"{name}({args})" if args else name)
        return "+".join(parts)

    def describe(self) -> Any:
        """JSON echo of the spec (``null`` for none)."""
        return None if self.vanilla else self.as_apply_arg()


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return ("__list__", *(_freeze(v) for v in value))
    return value


def _unfreeze(value: Any) -> Any:
    if isinstance(value, tuple) and value and value[0] == "__list__":
        return [_unfreeze(v) for v in value[1:]]
    if isinstance(value, tuple):
        return {k: _unfreeze(v) for k, v in value}
    if isinstance(value, dict):
        return {k: _unfreeze(v) for k, v in value.items()}
    return value


def parse(field: Any) -> Spec:
    """The canonical spec of a ``mitigation`` value; structural errors are 400s. (Names are checked by
    :func:`validate`.)"""
    param = "mitigation"
    if field is None:
        return Spec()
    if isinstance(field, str):
        names = [n.strip() for n in field.split(",") if n.strip()]
        if len(names) == 1 and names[0].lower() in VANILLA_NAMES:
            return Spec()
        return _from_items([(n, {}) for n in names])
    if isinstance(field, list):
        if not all(isinstance(n, str) for n in field):
            raise bad_request("a mitigation list holds method names", code="invalid_mitigation", param=param)
        return _from_items([(n, {}) for n in field])
    if isinstance(field, dict):
        if "method" in field:
            extra = sorted(set(field) - {"method", "params"})
            if extra:
                raise bad_request(
                    f"unknown mitigation key(s) {extra}; use method and params",
                    code="invalid_mitigation",
                    param=param,
                )
            params = field.get("params") or {}
            if not isinstance(params, dict):
                raise bad_request(
                    "mitigation.params must be an object", code="invalid_mitigation", param=param
                )
            inner = parse(field["method"])
            if params and len(inner.methods) != 1:
                raise bad_request(
                    "mitigation.params apply to a single method; for several use {name: params, ...}",
                    code="invalid_mitigation",
                    param=param,
                )
            if params:
                return _from_items([(inner.methods[0][0], params)])
            return inner
        items = []
        for name, params in field.items():
            if not isinstance(params, dict | type(None)):
                raise bad_request(
                    f"parameters of {name!r} must be an object", code="invalid_mitigation", param=param
                )
            items.append((name, params or {}))
        return _from_items(items)
    raise bad_request(
        "mitigation must be null, a method name, a list of names, or an object",
        code="invalid_mitigation",
        param=param,
    )


def _from_items(items: list[tuple[str, dict[str, Any]]]) -> Spec:
    if not items:
        raise bad_request(
            "no method given; use null for no mitigation", code="invalid_mitigation", param="mitigation"
        )
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise bad_request(
            f"a method is given twice in {names}", code="invalid_mitigation", param="mitigation"
        )
    return Spec(tuple((name, _freeze(params)) for name, params in items))


class Validator:
    """Checks specs against the served model with the method registry; remembers the answers."""

    def __init__(self, model: nn.Module, processor: Any = None):
        self._processor = processor
        self._info: Any = None
        self._unsupported: str | None = None
        try:
            self._info = model_info(model)
        except MitigationError as exc:  # the model can still be served without mitigation
            self._unsupported = str(exc)
        self._check = lru_cache(maxsize=256)(self._check_uncached)

    @property
    def supported(self) -> bool:
        return self._unsupported is None

    def validate(self, spec: Spec) -> None:
        if spec.vanilla:
            return
        error = self._check(spec)
        if error is not None:
            code, message = error
            raise bad_request(message, code=code, param="mitigation")

    def _check_uncached(self, spec: Spec) -> tuple[str, str] | None:
        if self._unsupported is not None:
            return "unsupported_model", f"this model cannot be mitigated: {self._unsupported}"
        try:
            resolve_spec(spec.as_apply_arg(), self._info, {}, self._processor)
        except UnknownMethodError as exc:
            return "unknown_method", str(exc)
        except MitigationError as exc:  # unknown parameter, bad value, incompatible methods
            return "invalid_mitigation", str(exc)
        return None


def model_info(model: nn.Module) -> Any:
    """What the method registry validates a spec against (raises ``UnsupportedModelError``).

    Taken from the model family's adapter, as ``apply_mitigation`` does: the public API has no call that
    validates a spec for a model without applying it.
    """
    from ..patches.adapters import find_adapter

    return find_adapter(model).info()
