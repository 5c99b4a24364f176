"""The plugin's frontend and engine-core sides: what happens to a request before any worker sees it.

Frontend (``InputProcessor.process_inputs``, in the process that takes requests): the request's
``extra_args["mitigation"]`` (or the server default from ``--additional-config '{"mitigation": ...}'``) is
resolved into mitigate's methods for this model and checked against the prompt. Anything mitigate cannot do
exactly raises a ``ValueError`` there, which vLLM turns into HTTP 400, before the engine sees the request (an
exception in a worker would kill the engine). The value is then rewritten in its canonical form
(:mod:`.spec`), which is all the engine core and the workers read.

Engine core:

* **prefix caching**: a mitigated request edits the keys and values its later layers cache, so its blocks
  must never serve another request, nor it read theirs. It gets a ``cache_salt`` of its own (its request id):
  vanilla requests keep sharing the cache among themselves.
* **chunked prefill**: the methods read the whole prompt at its first prefill (VAR's sinks, GIFT's saliency,
  PAINT's image tokens), so a mitigated prompt is never split: when the scheduler would prefill only part of
  it (token or encoder budget), it waits for a step with room for all of it. Vanilla requests are still
  chunked. A request recomputed after preemption keeps its plans from the first prefill and may be chunked.
* **torch.compile** is switched off (as ``enforce_eager=True``) for the model families the plugin edits: the
  hooks that read each decoder layer's input at prefill are Python that a compiled model would bake in.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import ConfigError, MitigationError, UnsupportedModelError
from .model_info import FAMILIES, model_info
from .spec import KEY, OFF, MethodCache, canonical

log = logging.getLogger("mitigate.vllm")

#: why a method cannot run inside vLLM, by method name (refused at request time)
UNAVAILABLE = {
    "vhr": "vhr chooses its heads from an extra prefill of the prompt without its image tokens (a probe pass "
    "before the real prefill); vLLM's scheduler runs each request once per step and has no place for a "
    "second, "
    "image-free pass, so VHR cannot run inside vLLM. Use it with apply_mitigation on a Hugging Face model.",
}
CONTRAST = (
    "pai's image-free contrast (cfg_gamma) runs every step twice, with and without the image, and mixes "
    "the two next-token distributions; vLLM schedules one sequence per request, so the contrast cannot run "
    "inside vLLM. Leave cfg_gamma unset (the preset 'pai' does)."
)


def is_mitigated(sampling_params: Any) -> bool:
    """Whether a request carries a canonical mitigation (what the frontend writes)."""
    args = getattr(sampling_params, "extra_args", None) or {}
    value = args.get(KEY)
    return isinstance(value, dict) and "method" in value


class Frontend:
    """The frontend process's view of the served model: its ModelInfo, the server default and the limits a
    mitigated request must fit."""

    def __init__(self, vllm_config: Any, platform_problem: str | None = None):
        model = vllm_config.model_config
        self.default = (vllm_config.additional_config or {}).get(KEY)
        scheduler = vllm_config.scheduler_config
        # the most prompt tokens one step prefills for one request (a longer prompt would wait forever)
        self.max_prompt = scheduler.max_num_batched_tokens
        threshold = getattr(scheduler, "long_prefill_token_threshold", 0) or 0
        if threshold > 0:
            self.max_prompt = min(self.max_prompt, threshold)
        self.problem = platform_problem or _engine_problem(vllm_config)
        self.methods: MethodCache | None = None
        if self.problem is None:
            try:
                self.methods = MethodCache(model_info(model.architecture, model.hf_config, model.model))
            except UnsupportedModelError as exc:
                self.problem = str(exc)
        if self.default not in (None, "", OFF):
            # a bad server default fails at start, not on every request
            self.resolve(self.default, "the server default (--additional-config)")
            log.info("mitigate: server default mitigation %r", self.default)

    def resolve(self, raw: Any, what: str = "this request") -> list | None:
        if self.problem is not None:
            if raw in (None, "", OFF):
                return None
            raise MitigationError(f"mitigate: {what} asks for mitigation, but {self.problem}")
        methods = self.methods.resolve(raw)
        if methods is None:
            return None
        for method in methods:
            if method.name in UNAVAILABLE:
                raise ConfigError(f"mitigate: {UNAVAILABLE[method.name]}")
            if method.needs_probe():
                raise ConfigError(f"mitigate: {method.name} needs an extra probe pass, which vLLM cannot run")
            if getattr(method, "contrast", lambda: None)() is not None:
                raise ConfigError(f"mitigate: {CONTRAST}")
        return methods

    def process(self, request: Any) -> None:
        """Resolve, check and rewrite one EngineCoreRequest's mitigation in place."""
        params = request.sampling_params
        if params is None:  # pooling requests are never mitigated
            return
        args = dict(params.extra_args or {})
        raw = args.get(KEY, self.default)
        methods = self.resolve(raw)
        if methods is None:
            if KEY in args or self.default is not None:
                args[KEY] = OFF
                params.extra_args = args
            return
        _check_prompt(request, self.max_prompt)
        args[KEY] = canonical(methods)
        params.extra_args = args


def _engine_problem(vllm_config: Any) -> str | None:
    """Why this engine's configuration cannot run mitigation at all (then mitigated requests are refused)."""
    if vllm_config.speculative_config is not None:
        return (
            "speculative decoding is on, which mitigate.vllm does not support (its draft rows are untested)"
        )
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        return (
            "pipeline parallelism splits the layers over processes, while a method's observations in one "
            "layer "
            "plan edits in others (GIFT's saliency, VAR's sinks); run without pipeline parallelism"
        )
    if vllm_config.cache_config.cache_dtype not in ("auto", None):
        return f"the KV cache is stored as {vllm_config.cache_config.cache_dtype}; edits need it unquantised"
    return None


def _check_prompt(request: Any, max_prompt: int) -> None:
    if request.prompt_token_ids is None:
        raise MitigationError(
            "mitigate: a prompt given as embeddings has no token ids to find the image tokens in"
        )
    for feature in request.mm_features or []:
        if feature.modality != "image":
            raise MitigationError(
                f"mitigate: {feature.modality} inputs are not supported (the methods edit attention to image "
                "tokens); send images only, or no mitigation"
            )
    length = len(request.prompt_token_ids)
    if request.mm_features and length > max_prompt:  # without an image no method edits anything
        raise MitigationError(
            f"mitigate: this prompt has {length} tokens, more than one engine step prefills for a request "
            f"({max_prompt}: max_num_batched_tokens, or long_prefill_token_threshold if lower); the methods "
            "read the whole prompt in one prefill, so raise that limit or shorten the prompt"
        )


# -- installation ----------------------------------------------------------------------------------


def install_frontend(platform_problem: str | None) -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    class RequestRefused(VLLMValidationError, MitigationError):
        """A ValueError offline, and an HTTP 400 through vLLM's servers (which map only their own errors)."""

    init = InputProcessor.__init__
    original = InputProcessor.process_inputs

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._mitigate = Frontend(self.vllm_config, platform_problem)  # a bad server default fails here

    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        try:
            self._mitigate.process(request)
        except MitigationError as exc:
            raise RequestRefused(str(exc), parameter=f"extra_args.{KEY}") from exc
        return request

    InputProcessor.__init__ = __init__

    InputProcessor.process_inputs = process_inputs


def install_engine_core() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    make_request = Request.from_engine_core_request.__func__

    def from_engine_core_request(cls, request, block_hasher):
        if is_mitigated(request.sampling_params):
            # blocks of its own: never read by others, never reading theirs (see the module docstring)
            request.cache_salt = f"mitigate:{request.request_id}:{request.cache_salt or ''}"
        return make_request(cls, request, block_hasher)

    Request.from_engine_core_request = classmethod(from_engine_core_request)

    schedule_encoder = Scheduler._try_schedule_encoder_inputs

    def try_schedule_encoder_inputs(self, request, num_computed_tokens, num_new_tokens, *args, **kwargs):
        result = schedule_encoder(self, request, num_computed_tokens, num_new_tokens, *args, **kwargs)
        scheduled = result[1]
        if (
            scheduled > 0
            and request.num_output_tokens == 0
            and num_computed_tokens + scheduled < request.num_prompt_tokens
            and is_mitigated(request.sampling_params)
        ):
            # a first prefill that would cover part of the prompt: wait for room for all of it
            return [], 0, args[0] if args else kwargs["encoder_compute_budget"], [], []
        return result

    Scheduler._try_schedule_encoder_inputs = try_schedule_encoder_inputs


def install_eager_mode() -> None:
    """Switch torch.compile off on the CPU platform (see the module docstring), with the reason logged."""
    from vllm.config import CompilationMode
    from vllm.platforms.cpu import CpuPlatform

    check = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        check(cls, vllm_config)
        model = vllm_config.model_config
        if model is None or model.architecture not in FAMILIES:
            return  # mitigation is refused for this model anyway: leave the engine as it is
        compilation = vllm_config.compilation_config
        if compilation.mode != CompilationMode.NONE:
            log.warning(
                "mitigate: torch.compile switched off (as enforce_eager=True): the plugin reads each decoder "
                "layer's input at prefill with Python hooks, which a compiled model would bake in"
            )
            compilation.mode = CompilationMode.NONE

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
