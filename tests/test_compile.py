"""HF's fast path: ``generate(cache_implementation="static")`` compiles the forward with ``torch.compile``.

For every method and for PAI+VAR+VHR, with ``fullgraph=True``: the compiled run gives the eager mitigated
run's logits, and a second prompt of the same shape adds no compiled graph. The backend is dynamo's
``eager`` one, wrapped to count graphs: it traces exactly what inductor would get (Python values baked in
are what made the first release silently wrong here) without compiling C++ on the CI machine.
"""

import kit
import pytest
import torch
from transformers import CompileConfig

from mitigate import mitigated

#: VAR on the random tiny model: its sinks are found per prompt; a lower gate makes sure it edits this one
VAR = {"sink_dims": "auto", "tau": 2.0, "min_image_mass": 0.05}
SPECS = [
    {"var": VAR},
    "gift",
    "vhr",
    "paint",
    "pai",
    "pai-released",
    "vaf",
    {"pai": {}, "var": VAR, "vhr": {}},
]
GENERATE = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}

pytestmark = pytest.mark.slow


class GraphCounter:
    """A dynamo backend that runs the captured graph as is and counts how many were compiled."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        return graph.forward

    def __deepcopy__(self, memo):  # generate() deep-copies its generation config: keep counting here
        return self


def compiled(counter: GraphCounter) -> dict:
    config = CompileConfig(fullgraph=True, backend=counter, mode=None)
    config._compile_all_devices = True  # compile on CPU too (transformers compiles on CUDA by default)
    return {"cache_implementation": "static", "compile_config": config}


def max_diff(a, b) -> float:
    """Largest logit difference; the same -inf entries (PAI's plausibility cutoff) count as equal."""
    diffs = [torch.where(x == y, 0.0, (x - y).abs()).max() for x, y in zip(a.logits, b.logits, strict=True)]
    return float(torch.stack(diffs).max().nan_to_num(float("inf")))


def check_compiled(model, processor, spec, first, second, kernel: str = "auto"):
    """Under ``spec``, the compiled static-cache run gives the eager logits on two prompts of one shape,
    compiles the decode step, and the second prompt adds no graph; returns the vanilla output."""
    counter = GraphCounter()
    torch._dynamo.reset()
    vanilla = model.generate(**first, **GENERATE)
    with mitigated(model, spec, processor=processor, kernel=kernel):
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
    return vanilla


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_static_compiled_equals_eager(tiny, spec):
    model, processor = tiny
    first = kit.batch(processor, [kit.PROMPTS[1]], [kit.image(0)])
    second = kit.batch(processor, [kit.PROMPTS[1]], [kit.image(3)])  # the same shape, another image
    vanilla = check_compiled(model, processor, spec, first, second)
    # removal: the compiled plain model is plain again
    plain = model.generate(**first, **GENERATE, **compiled(GraphCounter()))
    assert max_diff(plain, vanilla) <= 1e-4


def test_static_compiled_padded_batch(tiny, padded):
    """Left-padded rows (one without an image) through the compiled static path."""
    model, processor = tiny
    counter = GraphCounter()
    torch._dynamo.reset()
    spec = {"pai": {}, "var": VAR, "vhr": {}}
    with mitigated(model, spec, processor=processor):
        eager = model.generate(**padded, **GENERATE)
        fast = model.generate(**padded, **GENERATE, **compiled(counter))
    assert max_diff(fast, eager) <= 1e-4


@pytest.mark.parametrize("spec", [{"var": VAR}, "gift", "pai"], ids=str)
def test_static_compiled_triton_kernel(tiny, spec):
    """The fused kernel is one custom op: a compiled decode step keeps it whole (Triton's interpreter on
    CPU, see conftest)."""
    pytest.importorskip("triton")
    model, processor = tiny
    first = kit.batch(processor, [kit.PROMPTS[1]], [kit.image(0)])
    second = kit.batch(processor, [kit.PROMPTS[1]], [kit.image(3)])
    check_compiled(model, processor, spec, first, second, kernel="triton")


def test_a_model_compiled_by_the_user(tiny):
    """Compiling the forward yourself traces the prefill too, where the plans are made: with graph breaks
    allowed, dynamo runs that part eagerly (the same logits); with ``fullgraph=True`` it is refused,
    naming the reason (the first release silently generated unmitigated text here)."""
    model, processor = tiny
    inputs = kit.batch(processor, [kit.PROMPTS[1]], [kit.image(0)])
    with mitigated(model, "pai", processor=processor):
        eager = model.generate(**inputs, **GENERATE)
    forward = model.forward
    try:
        torch._dynamo.reset()
        model.forward = torch.compile(forward, backend="eager")
        with mitigated(model, "pai", processor=processor):
            traced = model.generate(**inputs, **GENERATE)
        assert max_diff(traced, eager) <= 1e-5
        torch._dynamo.reset()
        model.forward = torch.compile(forward, backend="eager", fullgraph=True)
        with (
            mitigated(model, "pai", processor=processor),
            pytest.raises(Exception, match="compiled forward over several tokens"),
        ):
            model.generate(**inputs, **GENERATE)
    finally:
        model.forward = forward
        torch._dynamo.reset()
