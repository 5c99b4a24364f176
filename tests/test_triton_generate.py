"""Every method end to end with ``kernel="triton"`` (Triton's interpreter on CPU, see conftest): the same
greedy logits as the reference kernel, prompt and decode steps, on a left-padded batch with a text-only
row."""

import kit
import pytest
import torch

pytest.importorskip("triton")

SPECS = ["var-tiny", "gift", "vhr", "paint", "pai", "pai-released", "vaf", ["pai", "var-tiny", "vhr"]]


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("decode", ["fused", "torch"])
def test_triton_kernel_equals_reference_end_to_end(tiny, padded, spec, decode, monkeypatch):
    from mitigate.kernels import triton_plan

    monkeypatch.setattr(triton_plan, "EAGER_DECODE", decode)  # eager decode steps: fused kernel or torch's
    model, processor = tiny
    fused, _, _ = kit.mitigated_trace(model, padded, spec, steps=3, kernel="triton", processor=processor)
    reference, _, plain = kit.mitigated_trace(
        model, padded, spec, steps=3, kernel="reference", processor=processor
    )
    valid = padded["attention_mask"].bool()
    assert finite_diff(fused, reference, valid) <= 1e-4
    assert finite_diff(reference, plain, valid) > 1e-3, f"{spec} did not change the logits"


def finite_diff(a: kit.Trace, b: kit.Trace, valid: torch.Tensor) -> float:
    """:func:`kit.max_diff` where equal entries (the -inf of PAI's plausibility cutoff too) count as 0."""
    pairs = [
        (a.prefill * valid[..., None], b.prefill * valid[..., None]),
        *zip(a.steps, b.steps, strict=True),
    ]
    return max(
        float(torch.where(x == y, 0.0, (x - y).abs()).nan_to_num(float("inf")).max()) for x, y in pairs
    )
