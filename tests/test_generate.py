"""Every method through ``model.generate`` (the path users take): batched, left-padded generation equals
one-at-a-time, the edit changes something, and removal restores the plain model."""

import kit
import pytest
import torch

from mitigate import list_presets, mitigated

SPECS = [*list_presets(), ["pai", "var", "vhr"], ["vaf", "gift"]]
UNRUNNABLE = {
    "var",
    "var-13b",
    "var-paper",
    "var-toy",
    "gift-13b",
    "gift-qwen2vl",
}  # other models only (sink dims, layers); var-toy runs on builtin:toy-llava in test_toy_llava


@pytest.mark.parametrize("spec", [s for s in SPECS if not (isinstance(s, str) and s in UNRUNNABLE)], ids=str)
def test_generate_batched_equals_single(tiny, padded, spec):
    model, processor = tiny
    settings = {
        "max_new_tokens": 4,
        "do_sample": False,
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    vanilla = model.generate(**padded, **settings)
    with mitigated(model, spec, processor=processor):
        batched = model.generate(**padded, **settings)
        singles = [model.generate(**kit.row_inputs(padded, r, processor), **settings) for r in range(3)]
    changed = max((a - b).abs().max() for a, b in zip(batched.logits, vanilla.logits, strict=True))
    assert changed > 1e-3, f"{spec} did not change the logits"
    for r, one in enumerate(singles):
        assert torch.equal(batched.sequences[r, -4:], one.sequences[0, -4:])
        for step_b, step_1 in zip(batched.logits, one.logits, strict=True):
            finite = torch.isfinite(step_1[0])
            assert torch.equal(finite, torch.isfinite(step_b[r]))
            assert (step_b[r][finite] - step_1[0][finite]).abs().max() <= 1e-4
    assert torch.equal(model.generate(**padded, **settings).sequences, vanilla.sequences)
