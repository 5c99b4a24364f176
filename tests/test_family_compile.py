"""The static-cache compiled path (``generate(cache_implementation="static")`` under ``torch.compile``,
``fullgraph=True``; see tests/test_compile.py for the graph-counting backend) on two families beyond
LLaVA: Qwen2-VL, whose decode steps carry 3-D M-RoPE positions, and Gemma 3, whose sliding layers drop
keys once the window rolls (per-key edits there are refused with a static cache; head scaling and edits
in its full layers compile)."""

import family_kit as fk
import pytest
from test_compile import GENERATE, check_compiled

from mitigate import MitigationError, mitigated

pytestmark = pytest.mark.slow

CASES = {
    "qwen2-vl": {"pai": {}},
    "gemma3": {"pai": {"layers": [1, 3]}, "vhr": {}},  # its full-attention layers
}


def prompt(processor, seed: int):
    return fk.encode(processor, [(fk.kit.PROMPTS[1], [fk.small_image(seed)])])


@pytest.mark.parametrize("family", list(CASES))
def test_static_compiled_equals_eager(family):
    model, processor = fk.tiny(family)
    first, second = prompt(processor, 2), prompt(processor, 5)  # the same shape, another image
    assert first["input_ids"].shape == second["input_ids"].shape
    check_compiled(model, processor, CASES[family], first, second)


def test_gemma3_sliding_layers_refuse_a_static_cache_longer_than_the_window():
    model, processor = fk.tiny("gemma3")
    with (
        mitigated(model, "pai", processor=processor, layers=[0, 1]),
        pytest.raises(MitigationError, match="sliding window of 24 keys in a static cache"),
    ):
        model.generate(**prompt(processor, 2), **GENERATE, cache_implementation="static")
