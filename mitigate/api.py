"""The public entry points: apply_mitigation, remove_mitigation, mitigated, and the Mitigation handle.

Applying a mitigation to a model that already has one replaces it: the old one is removed first (its
handle becomes inert) and the model is then mitigated afresh. To combine methods, pass them together
(``["var", "vhr"]`` or ``{"var": {...}, "vhr": {...}}``), never by applying twice.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from .errors import UnsupportedModelError
from .methods import Method, resolve_spec
from .patches.adapters import find_adapter
from .patches.session import Session
from .stats import Stats

log = logging.getLogger("mitigate")

_BY_MODEL: weakref.WeakKeyDictionary[nn.Module, Mitigation] = weakref.WeakKeyDictionary()

MethodSpec = str | list[str] | tuple[str, ...] | dict[str, dict[str, Any]]


class Mitigation:
    """Handle on an applied mitigation. ``remove()`` restores the model exactly."""

    def __init__(self, model: nn.Module, session: Session):
        self._model = weakref.ref(model)
        self._session: Session | None = session

    @property
    def active(self) -> bool:
        return self._session is not None

    @property
    def kernel(self) -> str:
        return self._require().kernel_name

    @property
    def method_objects(self) -> list[Method]:
        return list(self._require().methods)

    @property
    def methods(self) -> dict[str, dict[str, Any]]:
        """The resolved parameters of each method, by method name, in application order."""
        return {m.name: m.resolved_params() for m in self._require().methods}

    @property
    def presets(self) -> dict[str, str]:
        return {m.name: m.preset for m in self._require().methods}

    def remove(self) -> None:
        """Undo everything; calling it again is a no-op."""
        session, self._session = self._session, None
        if session is None:
            return
        session.uninstall()
        model = self._model()
        if model is not None and _BY_MODEL.get(model) is self:
            del _BY_MODEL[model]

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model without edits inside the block (the hooks stay, the attention is plain SDPA)."""
        with self._require().disabled():
            yield

    @contextmanager
    def recording(self) -> Iterator[Stats]:
        """Collect per-layer statistics of the edits made inside the block (costs a little time)."""
        session = self._require()
        stats = Stats()
        previous, session.stats = session.stats, stats
        try:
            yield stats
        finally:
            session.stats = previous

    def __enter__(self) -> Mitigation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _require(self) -> Session:
        if self._session is None:
            raise RuntimeError("this mitigation was removed")
        return self._session

    def __repr__(self) -> str:
        if self._session is None:
            return "Mitigation(removed)"
        model = self._model()
        name = type(model).__name__ if model is not None else "?"
        lines = [f"Mitigation(model={name}, kernel={self.kernel!r},"]
        lines += [f"  {m!r}," for m in self._session.methods]
        return "\n".join(lines) + "\n)"


def apply_mitigation(
    model: nn.Module, method: MethodSpec, *, kernel: str = "auto", processor: Any = None, **overrides: Any
) -> Mitigation:
    """Edit ``model``'s attention with one or more methods until ``remove()``.

    ``method``: a method name (``"var"``), a preset (``"var-paper"``), a list of names, or a dict
    ``{name: {param: value}}``. ``overrides`` set parameters of a single method. ``kernel``: ``"auto"``,
    ``"reference"`` or another registered kernel. ``processor``: the model's processor (or tokenizer),
    for methods that read the prompt's words (GIFT's informative-token filter). Errors are raised before
    the model is touched.
    """
    adapter = find_adapter(model)
    refusal = adapter.refusal()
    if refusal is not None:
        name = adapter.title or adapter.family
        raise UnsupportedModelError(f"mitigate cannot edit this {name} model: {refusal}")
    methods = resolve_spec(method, adapter.info(), overrides, processor)
    session = Session(model, adapter, methods, kernel=kernel)
    previous = _BY_MODEL.get(model)
    if previous is not None:
        log.info("mitigate: replacing the mitigation already on this model")
        previous.remove()
    session.install()
    handle = Mitigation(model, session)
    _BY_MODEL[model] = handle
    return handle


def remove_mitigation(model: nn.Module) -> bool:
    """Remove the mitigation on ``model``; returns whether there was one."""
    handle = _BY_MODEL.get(model)
    if handle is None:
        return False
    handle.remove()
    return True


def get_mitigation(model: nn.Module) -> Mitigation | None:
    return _BY_MODEL.get(model)


@contextmanager
def mitigated(
    model: nn.Module, method: MethodSpec, *, kernel: str = "auto", processor: Any = None, **overrides: Any
) -> Iterator[Mitigation]:
    """``with mitigated(model, "var"): model.generate(...)`` -- removed on exit, even on error."""
    handle = apply_mitigation(model, method, kernel=kernel, processor=processor, **overrides)
    try:
        yield handle
    finally:
        handle.remove()
