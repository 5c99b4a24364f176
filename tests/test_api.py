"""Public API: spec forms, presets, errors for bad input, replacement, handles."""

import kit
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mitigate import (
    ConfigError,
    UnknownMethodError,
    UnsupportedModelError,
    apply_mitigation,
    get_mitigation,
    list_methods,
    list_presets,
    mitigated,
    remove_mitigation,
)


def test_method_and_preset_names(tiny):
    model, _ = tiny
    assert "var" in list_methods()
    assert {"var", "var-paper", "var-13b"} <= set(list_presets())
    with mitigated(model, "var") as handle:  # the built-in model gets its own preset
        assert handle.presets == {"var": "var-tiny"}
        assert handle.methods["var"]["layers"] == [2, 3]
    with mitigated(model, "var-paper", sink_dims=[1, 2], tau=3) as handle:
        assert handle.methods["var"]["moved_fraction"] == 0.6
        assert handle.methods["var"]["sink_dims"] == [1, 2]
        assert "var-paper" in repr(handle) and "moved_fraction=0.6" in repr(handle)
    with mitigated(model, {"var": {"tau": 3.0, "sink_dims": "auto"}}) as handle:
        assert handle.methods["var"]["tau"] == 3.0
    with mitigated(model, ["var"]) as handle:
        assert list(handle.methods) == ["var"]


@pytest.mark.parametrize(
    ("spec", "overrides", "error", "words"),
    [
        ("vra", {}, UnknownMethodError, "did you mean"),
        ("var", {"taux": 3}, ConfigError, "unknown parameter"),
        ("var", {"layers": [1, 4]}, ConfigError, "out of range"),
        ("var", {"layers": [-1]}, ConfigError, "out of range"),
        ("var", {"moved_fraction": 1.5}, ConfigError, "moved_fraction"),
        ("var", {"sink_dims": [2533]}, ConfigError, "hidden size"),
        ("var", {"tau": "high"}, ConfigError, "tau"),
        (["var"], {"tau": 3}, ConfigError, "dict form"),
        (["var", "var-paper"], {}, ConfigError, "more than once"),
        (42, {}, ConfigError, "method must be"),
    ],
)
def test_bad_input_is_a_clear_error(tiny, spec, overrides, error, words):
    model, _ = tiny
    with pytest.raises(error) as info:
        apply_mitigation(model, spec, **overrides)
    assert words.lower() in str(info.value).lower()
    assert get_mitigation(model) is None
    assert model.config.text_config._attn_implementation == "sdpa"


def test_non_vlm_and_unsupported_models_name_the_supported_families():
    text_only = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(UnsupportedModelError, match=r"not a vision-language model.*llava"):
        apply_mitigation(text_only, "var")
    with pytest.raises(UnsupportedModelError, match="not a Hugging Face model"):
        apply_mitigation(torch.nn.Linear(2, 2), "var")


def test_unknown_kernel(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="unknown kernel"):
        apply_mitigation(model, "var", kernel="warp")


def test_applying_twice_replaces(tiny, single):
    model, _ = tiny
    first = apply_mitigation(model, "var", tau=2.0)
    second = apply_mitigation(model, "var", tau=3.0)
    assert not first.active and second.active
    assert get_mitigation(model) is second
    assert second.methods["var"]["tau"] == 3.0
    first.remove()  # inert
    assert second.active
    assert remove_mitigation(model) is True
    assert remove_mitigation(model) is False
    assert repr(second) == "Mitigation(removed)"
    with pytest.raises(RuntimeError, match="removed"):
        _ = second.methods


def test_disabled_block_runs_vanilla(tiny, single):
    model, _ = tiny
    vanilla = kit.greedy_trace(model, single, steps=2)
    with mitigated(
        model, "var", sink_dims="auto", tau=1.5, min_image_mass=0.0, min_nonsink_ratio=0.0
    ) as handle:
        edited = kit.greedy_trace(model, single, steps=2)
        with handle.disabled():
            plain = kit.greedy_trace(model, single, steps=2)
    assert kit.max_diff(vanilla, edited) > 1e-3
    assert kit.max_diff(vanilla, plain) == 0.0


def test_context_manager_removes_on_error(tiny):
    model, _ = tiny
    with pytest.raises(RuntimeError, match="boom"), mitigated(model, "var"):
        raise RuntimeError("boom")
    assert get_mitigation(model) is None


def test_two_models_at_once(single):
    (a, _), (b, _) = kit.tiny(0), kit.tiny(0)
    vanilla = kit.greedy_trace(b, single, steps=1)
    with mitigated(a, "var", sink_dims="auto", tau=1.5, min_image_mass=0.0):
        assert kit.max_diff(kit.greedy_trace(b, single, steps=1), vanilla) == 0.0
        assert kit.max_diff(kit.greedy_trace(a, single, steps=1), vanilla) > 1e-3


def test_paint_refuses_a_tower_without_cls():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from mitigate.builtin.tiny_llava import build_config

    base = build_config()
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = LlavaConfig(
        text_config=base.text_config,
        vision_config=vision,
        image_token_id=base.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    model = LlavaForConditionalGeneration(config)
    with pytest.raises(UnsupportedModelError, match="CLS token"):
        apply_mitigation(model, "paint")
    with mitigated(model, "pai") as handle:  # the method that does not need one still applies
        assert handle.methods["pai"]["alpha"] == 0.5
