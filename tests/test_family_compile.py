"""The static-cache compiled path (``generate(cache_implementation="static")`` under ``torch.compile``,
``fullgraph=True``; see tests/test_compile.py for the graph-counting backend) on two families beyond
LLaVA: Qwen2-VL, whose decode steps carry 3-D M-RoPE positions, and Gemma 3, whose sliding layers drop
keys once the window rolls (per-key edits there are refused with a static cache; head scaling and edits
in its full layers compile)."""

import family_kit as fk
import pytest
from PIL import Image
from test_compile import GENERATE, check_compiled

from mitigate import MitigationError, mitigated

pytestmark = pytest.mark.slow

CASES = {
    "qwen2-vl": {"pai": {}},
    "gemma3": {"pai": {"layers": [1, 3]}, "vhr": {}},  # its full-attention layers
}
#: PAI's image-free contrast: transformers hands these families per-layer-type masks with a static cache
CONTRAST = ["qwen2-vl", "qwen3.5"]


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


@pytest.mark.parametrize("family", CONTRAST)
def test_static_compiled_contrast_equals_eager(family):
    """The contrast's twins get their own padding in every layer type's mask (Qwen3.5: full and linear
    attention), in a left-padded batch of two."""
    model, processor = fk.tiny(family)
    rows = fk.rows_of(next(f for f in fk.FAMILIES if f.name == family))
    first = fk.encode(processor, rows)
    flipped = [
        (prompt, [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images])
        for prompt, images in rows
    ]
    second = fk.encode(processor, flipped)  # the same shapes, other pixels
    assert first["input_ids"].shape == second["input_ids"].shape
    check_compiled(model, processor, {"pai": {"cfg_gamma": 1.5}}, first, second)


def test_gemma3_contrast_with_a_static_cache_the_window_holds():
    """Sliding layers whose window covers the static cache: the twins' padding goes into their masks too."""
    model, processor = fk.tiny("gemma3")
    first, second = prompt(processor, 2), prompt(processor, 5)
    text = model.config.get_text_config()
    holders = [module for module in model.modules() if getattr(module, "sliding_window", None)] + [text]
    windows = [holder.sliding_window for holder in holders]
    try:
        for holder in holders:  # the layers and the config the static cache is built from
            holder.sliding_window = 256
        check_compiled(model, processor, {"pai": {"cfg_gamma": 1.5, "layers": [1, 3]}}, first, second)
    finally:
        for holder, window in zip(holders, windows, strict=True):
            holder.sliding_window = window


def test_gemma3_contrast_refuses_a_static_cache_longer_than_the_window():
    model, processor = fk.tiny("gemma3")
    with (
        mitigated(model, "pai", processor=processor, cfg_gamma=1.5, layers=[1, 3]),
        pytest.raises(MitigationError, match="sliding layers keep 24 keys and roll"),
    ):
        model.generate(**prompt(processor, 2), **GENERATE, cache_implementation="static")
