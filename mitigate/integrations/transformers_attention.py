"""``attn_implementation="mitigate"``: load a supported model already mitigated, through transformers' API.

    from mitigate.integrations.transformers_attention import enable
    enable("var")                                            # the mitigation models get by default
    model = AutoModelForImageTextToText.from_pretrained(id, attn_implementation="mitigate")
    # the model is mitigated: get_mitigation(model) is its handle

:func:`enable` registers ``"mitigate"`` with transformers' ``AttentionInterface`` (so every tool that passes
an ``attn_implementation`` through to ``from_pretrained`` accepts the name) and wraps
``PreTrainedModel.from_pretrained``: a model loaded with that name is switched back to SDPA and then
``apply_mitigation(model, default)`` is called on it, so it ends up exactly as a model mitigated by hand
(the language model's attention goes through mitigate, the vision tower's through SDPA). ``disable()``
undoes the wrapping; models already loaded keep their mitigation.

A model switched to ``"mitigate"`` some other way (``from_config``, ``set_attn_implementation``) has no
mitigation behind the name: its attention refuses to run, with an error saying so, rather than silently
run unmitigated.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..api import MethodSpec, apply_mitigation, get_mitigation

log = logging.getLogger("mitigate")

NAME = "mitigate"

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "spec", "overrides", "kernel", "original", "force"


def unmitigated_attention(module: Any, *args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(
        "this model's attention is set to 'mitigate' but no mitigation is applied to it; load it with "
        "from_pretrained(..., attn_implementation='mitigate') after "
        "mitigate.integrations.transformers_attention.enable(), or call mitigate.apply_mitigation(model, ...)"
    )


def register() -> None:
    """Make ``"mitigate"`` a valid ``attn_implementation`` (a no-op while a mitigation has it registered)."""
    if NAME not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(NAME, unmitigated_attention)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys():
        AttentionMaskInterface.register(NAME, sdpa_mask)


def unregister() -> None:
    """Withdraw the name if it is still this module's stand-in (a live mitigation's function stays)."""
    # transformers has no public call to unregister; mitigate's session removes its own the same way
    if AttentionInterface._global_mapping.get(NAME) is unmitigated_attention:
        AttentionInterface._global_mapping.pop(NAME, None)
        if AttentionMaskInterface._global_mapping.get(NAME) is sdpa_mask:
            AttentionMaskInterface._global_mapping.pop(NAME, None)


def enable(
    method: MethodSpec = "var", *, kernel: str = "auto", force: bool = False, **overrides: Any
) -> None:
    """Models loaded with ``attn_implementation="mitigate"`` get ``apply_mitigation(model, method,
    **overrides)``; with ``force``, so do models loaded with no ``attn_implementation`` (what the
    ``transformers serve`` launcher needs). Calling it again replaces the default."""
    with _lock:
        _state.update(spec=method, overrides=overrides, kernel=kernel, force=force)
        register()
        if "original" not in _state:
            _state["original"] = PreTrainedModel.__dict__["from_pretrained"]
            PreTrainedModel.from_pretrained = classmethod(_wrap(_state["original"].__func__))


def disable() -> None:
    """Stop mitigating newly loaded models (those loaded before keep their mitigation)."""
    with _lock:
        original = _state.pop("original", None)
        if original is not None:
            PreTrainedModel.from_pretrained = original
        _state.clear()
        unregister()


def enabled() -> bool:
    return "original" in _state


def _requested(kwargs: dict[str, Any]) -> Any:
    """The attention implementation a ``from_pretrained`` call asks for: its keyword, or (the Auto classes
    move it there) the one set on the config it passes."""
    if kwargs.get("attn_implementation") is not None:
        return kwargs["attn_implementation"]
    config = kwargs.get("config")
    return (
        getattr(config, "_attn_implementation", None)
        if config is not None and not isinstance(config, str)
        else None
    )


def _wrap(load: Any) -> Any:
    @functools.wraps(load)
    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        requested = _requested(kwargs)
        if requested is None and _state.get("force", False):
            requested = kwargs["attn_implementation"] = NAME
        if requested != NAME:
            return load(cls, *args, **kwargs)
        register()  # a removed mitigation unregisters the name
        model = load(cls, *args, **kwargs)
        if get_mitigation(model) is None:
            # plain attention everywhere, then mitigated as by hand
            model.set_attn_implementation("sdpa")
            apply_mitigation(model, _state["spec"], kernel=_state["kernel"], **_state["overrides"])
            log.info("mitigate: %s loaded with mitigation %r", type(model).__name__, _state["spec"])
        return model

    return from_pretrained
