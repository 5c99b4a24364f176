"""Composition: ``["pai", "var", "vhr"]`` equals the three reference edits applied in one eager pass in the
documented order (logit edits, then redistributions, then head scaling), with VHR's heads chosen by a
probe that has the other edits off and VAR's sinks read from the real, mitigated pass; incompatible
combinations are clear errors."""

import kit
import pytest
import torch
from oracles import ComposedOracle, PAIOracle, VAROracle, VHROracle

from mitigate import ConfigError, apply_mitigation, get_mitigation
from mitigate.methods.registry import build_method, check_compatible
from mitigate.methods.vhr import VHR as VHRMethod
from mitigate.patches.adapters import find_adapter

PAI = {"alpha": 1.0, "layers": [1, 2, 3]}
VAR = {"moved_fraction": 0.6, "min_nonsink_ratio": 0.3, "min_image_mass": 0.05, "layers": [2, 3]}
VHR = {"alpha": 2.0, "layers": [1, 2, 3], "outlier_filter": True}


@pytest.fixture(params=kit.KERNELS)
def kernel(request, monkeypatch):
    return kit.use_kernel(request.param, monkeypatch)


def sink_params(model, inputs, layers=(2, 3)):
    """Two sink dims and a tau under which some image tokens are sinks in every VAR layer (plain pass)."""
    hidden = kit.layer_inputs(model, inputs)
    valid = inputs["attention_mask"].bool()
    image = (inputs["input_ids"] == model.config.image_token_id) & valid

    def normed(layer):
        h = hidden[layer].float()
        return (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()

    dims = normed(layers[0])[valid].amax(0).topk(2).indices.tolist()
    image_max = min(float(normed(layer)[..., dims].amax(-1)[image].max()) for layer in layers)
    return {"sink_dims": dims, "tau": 0.7 * image_max}


def vhr_oracle(model, rows):
    """VHR's oracle with its heads chosen alone: the probe runs with the other methods' edits off."""
    vhr = VHROracle(model, model.config.image_token_id, **VHR)
    with vhr:
        vhr.choose(rows)
    return vhr


class PlainSinkVAR(VAROracle):
    """VAR with its sinks taken from the plain (unmitigated) pass instead of the real one."""

    def __init__(self, model, image_token_id, inputs, **params):
        super().__init__(model, image_token_id, **params)
        probe = VAROracle(model, image_token_id, **{**params, "moved_fraction": 0.0})
        with probe:
            model(**inputs)
        self.plain = probe.sinks

    def new_prompt(self):
        self.sinks = dict(self.plain)

    def observe(self, layer, hidden):
        pass


def composed(model, vhr, var, parts=("pai", "var", "vhr")):
    image = model.config.image_token_id
    make = {
        "pai": lambda: PAIOracle(model, image, **PAI),
        "var": lambda: VAROracle(model, image, **var),
        "vhr": lambda: vhr,
    }
    return ComposedOracle(model, image, [make[name]() if isinstance(name, str) else name for name in parts])


def oracle_trace(oracle, model, inputs):
    with oracle:
        return kit.greedy_trace(model, inputs)


def spec(var, order=("pai", "var", "vhr")):
    params = {"pai": PAI, "var": var, "vhr": VHR}
    return {name: params[name] for name in order}


def setup(model, processor, inputs):
    rows = [kit.row_inputs(inputs, r, processor) for r in range(inputs["input_ids"].shape[0])]
    return vhr_oracle(model, rows), {**VAR, **sink_params(model, rows[0])}


@pytest.mark.parametrize("batch", ["single", "padded"])
def test_composed_equals_reference_edits_in_order(tiny, single, padded, kernel, batch):
    model, processor = tiny
    inputs = single if batch == "single" else padded
    vhr, var = setup(model, processor, inputs)
    vanilla = kit.greedy_trace(model, inputs)
    expected = oracle_trace(composed(model, vhr, var), model, inputs)
    got, state, after = kit.mitigated_trace(model, inputs, spec(var), kernel=kernel)
    valid = inputs["attention_mask"].bool()
    assert kit.max_diff(expected, vanilla, valid) > 1e-3
    assert kit.max_diff(got, expected, valid) <= 1e-4
    assert {k: v.tolist() for k, v in state[2]["heads"].items()} == {
        k: v.tolist() for k, v in vhr.heads.items()
    }
    kit.assert_identical(after, vanilla)
    assert get_mitigation(model) is None


@pytest.mark.parametrize("batch", ["single", "padded"])
def test_every_part_of_the_composition_matters(tiny, single, padded, batch):
    """Dropping any one edit, or reading VAR's sinks from the plain pass instead of the mitigated one,
    changes the composed oracle's logits: the comparison above can see each of them."""
    model, processor = tiny
    inputs = single if batch == "single" else padded
    vhr, var = setup(model, processor, inputs)
    valid = inputs["attention_mask"].bool()
    expected = oracle_trace(composed(model, vhr, var), model, inputs)
    plain_sinks = PlainSinkVAR(model, model.config.image_token_id, inputs, **var)
    variants = {
        "no pai": ("var", "vhr"),
        "no var": ("pai", "vhr"),
        "no vhr": ("pai", "var"),
        "plain-pass sinks": ("pai", plain_sinks, "vhr"),
    }
    for name, parts in variants.items():
        other = oracle_trace(composed(model, vhr, var, parts), model, inputs)
        assert kit.max_diff(expected, other, valid) > 1e-3, name


def test_listing_order_does_not_change_the_kind_order(tiny, single):
    """Whatever order the methods are listed in, logit edits run first and head scaling last."""
    model, _ = tiny
    var = {**VAR, **sink_params(model, single)}
    forward, _, _ = kit.mitigated_trace(model, single, spec(var), kernel="torch")
    backward, _, _ = kit.mitigated_trace(model, single, spec(var, ("vhr", "var", "pai")), kernel="torch")
    assert kit.max_diff(forward, backward) <= 1e-5


def test_pai_and_paint_cannot_be_combined(tiny):
    model, _ = tiny
    with pytest.raises(ConfigError, match="cannot combine pai and paint"):
        apply_mitigation(model, ["pai", "paint"])
    assert get_mitigation(model) is None
    assert model.config.text_config._attn_implementation == "sdpa"


def test_probe_methods_share_one_probe(tiny):
    """A method is given once; two methods that need a probe prefill share one (tests/test_gift_probe.py
    counts the passes)."""
    model, _ = tiny
    with pytest.raises(ConfigError, match="more than once"):
        apply_mitigation(model, ["vhr", "vhr"])
    info = find_adapter(model).info()

    class OtherProbe(VHRMethod):  # any second method with its own extra prefill
        name = "other-probe"

    first = build_method("vhr", info)
    check_compatible([first, OtherProbe(first.config, info)])
    check_compatible([first, build_method("pai", info)])
    assert model.config.text_config._attn_implementation == "sdpa"


STATEFUL = {
    "gift": {"saliency_layers": [0, 1], "enhance_layers": [2, 3], "alpha": 5.0},
    "paint": {"alpha": 2.0, "beta": 1.0, "layers": [1, 2, 3]},
    "pai": PAI,
    "vaf": {"image_scale": 1.8, "system_scale": 0.5, "layers": [1, 2]},
}


@pytest.mark.parametrize("method", sorted(STATEFUL))
def test_state_resets_at_every_prefill(tiny, padded, method):
    """A prompt gives the same logits whether or not another prompt ran before it under the mitigation."""
    model, processor = tiny
    first, second = kit.row_inputs(padded, 0, processor), kit.row_inputs(padded, 2, processor)
    params = {"processor": processor, "kernel": "torch", **STATEFUL[method]}
    fresh, _, plain = kit.mitigated_trace(model, second, method, **params)
    handle = apply_mitigation(model, method, **params)
    try:
        kit.greedy_trace(model, first)
        after_other = kit.greedy_trace(model, second)
    finally:
        handle.remove()
    assert kit.max_diff(fresh, plain) > 1e-3
    assert kit.max_diff(fresh, after_other) == 0.0
