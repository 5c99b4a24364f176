"""The vLLM plugin's request handling without vLLM: the accepted spellings of a request's mitigation, the
canonical form written for the engine, the frontend's refusals, and the ModelInfo read from a config (the
same as mitigate's HF adapter gives). End-to-end tests: tests/vllm_plugin (they need vLLM's CPU build)."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from mitigate.builtin import tiny_llava
from mitigate.errors import ConfigError, MitigationError
from mitigate.patches.adapters import find_adapter
from mitigate.vllm import check_version
from mitigate.vllm.engine import Frontend, is_mitigated
from mitigate.vllm.model_info import model_info
from mitigate.vllm.spec import OFF, MethodCache, canonical, parse

ARCH = "LlavaForConditionalGeneration"


def config(default=None, **overrides):
    hf_config = tiny_llava.build_config()
    model = SimpleNamespace(architecture=ARCH, hf_config=hf_config, model="builtin:tiny-llava")
    values = {
        "model_config": model,
        "additional_config": {} if default is None else {"mitigation": default},
        "scheduler_config": SimpleNamespace(max_num_batched_tokens=64),
        "speculative_config": None,
        "parallel_config": SimpleNamespace(pipeline_parallel_size=1),
        "cache_config": SimpleNamespace(cache_dtype="auto"),
    }
    return SimpleNamespace(**{**values, **overrides})


def request(mitigation="absent", length=20, modality="image"):
    args = {} if mitigation == "absent" else {"mitigation": mitigation}
    return SimpleNamespace(
        sampling_params=SimpleNamespace(extra_args=args),
        prompt_token_ids=list(range(length)),
        mm_features=[SimpleNamespace(modality=modality)],
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("var", ("var", {})),
        (" var-paper ", ("var-paper", {})),
        ('"pai"', ("pai", {})),
        ({"method": "var", "params": {"tau": 3}}, ("var", {"tau": 3})),
        ('{"method": "var", "params": {"tau": 3}}', ("var", {"tau": 3})),
        ({"method": ["var", "vaf"]}, (["var", "vaf"], {})),
        (["var", "vaf"], (["var", "vaf"], {})),
        ({"method": {"var": {"tau": 3}}}, ({"var": {"tau": 3}}, {})),
        ("", None),
        ("none", None),
        (None, None),
        ('""', None),
    ],
)
def test_parse(raw, expected):
    assert parse(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{oops", "not valid JSON"),
        ({"params": {}}, "got keys"),
        ({"method": "var", "tau": 3}, "got keys"),
        ({"method": "var", "params": [1]}, "'params' must be an object"),
        (3.5, "expected a method name"),
    ],
)
def test_parse_refuses(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse(raw)


def test_canonical_form_resolves_to_the_same_methods():
    info = model_info(ARCH, tiny_llava.build_config(), "builtin:tiny-llava")
    cache = MethodCache(info)
    methods = cache.resolve({"method": {"var": {"tau": 3.0}, "pai": {"alpha": 0.7}}})
    elsewhere = MethodCache(replace(info, name_or_path="elsewhere"))  # no preset picked by name there
    again = elsewhere.resolve(json.loads(json.dumps(canonical(methods))))
    assert [(m.name, m.config) for m in again] == [(m.name, m.config) for m in methods]
    assert methods[0].config.sink_dims == "auto"  # var's preset for the built-in tiny model, kept explicitly


def test_model_info_matches_the_hf_adapter():
    model = tiny_llava.build_model(0)
    hf = find_adapter(model).info()
    assert model_info(ARCH, model.config, hf.name_or_path) == hf


def test_frontend_writes_the_canonical_form_and_applies_the_default():
    frontend = Frontend(config(default="pai"))
    defaulted, explicit, off = request(), request({"method": "vaf"}), request("none")
    for r in (defaulted, explicit, off):
        frontend.process(r)
    assert list(defaulted.sampling_params.extra_args["mitigation"]["method"]) == ["pai"]
    assert list(explicit.sampling_params.extra_args["mitigation"]["method"]) == ["vaf"]
    assert off.sampling_params.extra_args["mitigation"] == OFF
    assert is_mitigated(defaulted.sampling_params) and not is_mitigated(off.sampling_params)
    again = request(defaulted.sampling_params.extra_args["mitigation"])
    frontend.process(again)  # the canonical form is itself accepted, unchanged
    assert again.sampling_params.extra_args == defaulted.sampling_params.extra_args


def test_frontend_without_default_leaves_vanilla_requests_alone():
    plain = request()
    Frontend(config()).process(plain)
    assert plain.sampling_params.extra_args == {}


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (request("vhr"), "probe pass"),
        (request({"method": "pai", "params": {"cfg_gamma": 1.1}}), "contrast"),
        (request("pai", modality="video"), "video inputs"),
        (request("pai", length=65), "more than one engine step prefills for a request \\(64"),
        (request({"method": ["pai", "paint"]}), "cannot combine"),
    ],
)
def test_frontend_refuses(req, message):
    with pytest.raises(MitigationError, match=message):
        Frontend(config()).process(req)


def test_engines_that_cannot_mitigate_still_serve_vanilla_requests():
    text_only = SimpleNamespace(architecture="LlamaForCausalLM", hf_config=None, model="llama")
    frontend = Frontend(config(model_config=text_only))
    frontend.process(request())
    with pytest.raises(MitigationError, match="LlamaForCausalLM is not supported"):
        frontend.process(request("pai"))
    speculative = Frontend(config(speculative_config=object()))
    with pytest.raises(MitigationError, match="speculative decoding"):
        speculative.process(request("pai"))


def test_long_prefill_threshold_bounds_the_prompt():
    scheduler = SimpleNamespace(max_num_batched_tokens=64, long_prefill_token_threshold=16)
    frontend = Frontend(config(scheduler_config=scheduler))
    frontend.process(request("pai", length=16))
    text_only = request("pai", length=40)
    text_only.mm_features = []
    frontend.process(text_only)  # no image, no edits: any length
    with pytest.raises(MitigationError, match=r"prefills for a request \(16"):
        frontend.process(request("pai", length=17))


def test_a_bad_server_default_fails_at_start():
    with pytest.raises(MitigationError, match="sink_dims"):  # the LLaVA-7B dims do not fit this model
        Frontend(config(default={"method": "var", "params": {"sink_dims": [9999]}}))


def test_version_policy():
    check_version((0, 32, 5))
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x; this is vLLM 0\.33\.0"):
        check_version((0, 33, 0))
