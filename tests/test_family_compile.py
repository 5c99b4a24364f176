"""The static-cache compiled path (``generate(cache_implementation="static")`` under ``torch.compile``,
``fullgraph=True``; see tests/test_compile.py for the graph-counting backend) on two families beyond
LLaVA: Qwen2-VL, whose decode steps carry 3-D M-RoPE positions, and Gemma 3, whose sliding layers drop
keys once the window rolls (per-key edits there are refused with a static cache; head scaling and edits
in its full layers compile)."""

import family_kit as fk
import pytest
import torch
from test_compile import GraphCounter, compiled, max_diff

from mitigate import MitigationError, mitigated

pytestmark = pytest.mark.slow

GENERATE = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
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
    spec = CASES[family]
    counter = GraphCounter()
    torch._dynamo.reset()
    vanilla = model.generate(**first, **GENERATE)
    with mitigated(model, spec, processor=processor):
        eager = model.generate(**first, **GENERATE)
        fast = model.generate(**first, **GENERATE, **compiled(counter))
        graphs = counter.graphs
        eager_second = model.generate(**second, **GENERATE)
        fast_second = model.generate(**second, **GENERATE, **compiled(counter))
    assert max_diff(eager, vanilla) > 1e-3, f"{spec} did not change the logits"
    assert max_diff(fast, eager) <= 1e-4
    assert max_diff(fast_second, eager_second) <= 1e-4
    assert graphs >= 1, "the decode step must have been compiled"
    assert counter.graphs == graphs, "a second prompt of the same shape must reuse the compiled graph"


def test_gemma3_sliding_layers_refuse_a_static_cache_longer_than_the_window():
    model, processor = fk.tiny("gemma3")
    with (
        mitigated(model, "pai", processor=processor, layers=[0, 1]),
        pytest.raises(MitigationError, match="sliding window of 24 keys in a static cache"),
    ):
        model.generate(**prompt(processor, 2), **GENERATE, cache_implementation="static")
