"""Every method through ``model.generate`` (the path users take): batched, left-padded generation equals
one-at-a-time, the edit changes something, and removal restores the plain model."""

import kit
import pytest

from mitigate import list_presets

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
    kit.check_batched_equals_single(model, padded, spec, processor)
