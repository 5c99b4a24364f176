"""What a request asks for: the ``mitigation`` entry of ``SamplingParams.extra_args``, parsed and resolved
into mitigate's method objects, and the canonical form the frontend writes back for the engine and workers.

Accepted values (``extra_args={"mitigation": ...}`` offline; through vLLM's OpenAI server ``vllm_xargs``,
whose values must be flat, so a JSON string of the same):

* a method or preset name: ``"var"``, ``"var-paper"``;
* ``{"method": "var", "params": {"tau": 10}}`` (``params`` optional, for a single method);
* ``{"method": ["var", "vaf"]}`` or ``{"method": {"var": {...}, "vaf": {...}}}``: several methods, as
  :func:`mitigate.apply_mitigation` takes them;
* ``""``, ``"none"`` or ``None``: no mitigation (also overrides a server-wide default).

The canonical form is ``{"method": {name: every parameter}}``: it is itself an accepted value, so resolving it
again gives the same methods with the same numbers, whatever presets the model name would pick.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from ..context import ModelInfo
from ..errors import ConfigError
from ..methods import Method, resolve_spec

#: the key of ``SamplingParams.extra_args`` (and of ``--additional-config``) that selects a mitigation
KEY = "mitigation"
#: what the frontend writes for a request that asked for no mitigation
OFF = "none"

_OFF_VALUES = (None, "", OFF)


def parse(raw: Any) -> tuple[Any, dict[str, Any]] | None:
    """``(method spec, overrides)`` for :func:`mitigate.methods.resolve_spec`; ``None``: no mitigation."""
    if isinstance(raw, str):
        text = raw.strip()
        if text in _OFF_VALUES:
            return None
        if text[:1] not in '{["':
            return text, {}
        try:
            decoded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{KEY}: not valid JSON ({exc.msg} at character {exc.pos}): {text!r}") from exc
        return None if decoded in _OFF_VALUES else parse(decoded)
    if raw in _OFF_VALUES:
        return None
    if isinstance(raw, list):
        return raw, {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{KEY}: expected a method name, a JSON object or a string, not {type(raw).__name__}"
        )
    unknown = sorted(set(raw) - {"method", "params"})
    if unknown or "method" not in raw:
        raise ConfigError(
            f"{KEY}: expected {{'method': name, list or {{name: params}}, 'params': {{...}}}}, got keys "
            f"{sorted(raw)}"
        )
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{KEY}: 'params' must be an object of parameter values, not {params!r}")
    return raw["method"], params


def canonical(methods: list[Method]) -> dict[str, Any]:
    """The request's methods with every parameter spelled out (see the module docstring)."""
    return {"method": {m.name: m.config.model_dump() for m in methods}}


class MethodCache:
    """Method objects by canonical spec, shared by every request that asks for the same thing (methods keep
    per-generation state in dicts the caller owns, so sharing them is safe). Building one can be costly
    (GIFT loads the model's tokenizer), hence the cache."""

    def __init__(self, info: ModelInfo, size: int = 64):
        self.info = info
        self.size = size
        self._methods: OrderedDict[str, list[Method]] = OrderedDict()
        self._lock = threading.Lock()  # async servers run the frontend in a thread pool

    def resolve(self, raw: Any) -> list[Method] | None:
        """The methods ``raw`` asks for (validated for this model), or ``None`` for no mitigation."""
        key = raw if isinstance(raw, str) else json.dumps(raw, sort_keys=True, default=str)
        with self._lock:
            if key in self._methods:
                self._methods.move_to_end(key)
                return self._methods[key]
            parsed = parse(raw)
            if parsed is None:
                return None
            spec, overrides = parsed
            methods = resolve_spec(spec, self.info, overrides)
            self._methods[key] = methods
            if len(self._methods) > self.size:
                self._methods.popitem(last=False)
            return methods
