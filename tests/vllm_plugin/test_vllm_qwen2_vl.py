"""mitigate inside vLLM (CPU build) on a tiny random Qwen2-VL (M-RoPE positions, no CLS token): the methods
give the HF path's tokens and logprobs; PAINT is refused (its token sets come from a CLS query). The engine's
KV cache is six blocks of 32 tokens, so that longer generations get preempted and recomputed."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import runs
import tiny_models

PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>is there a cat in the image?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
METHODS = ["pai", "vaf", "var-tiny", "gift", {"method": {"vaf": {}, "gift": {}}}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_models.save_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="module")
def llm(folder):
    engine = runs.engine(
        folder, block_size=32, num_gpu_blocks_override=7, max_model_len=160, disable_log_stats=False
    )
    yield engine
    runs.close(engine)


@pytest.fixture(scope="module")
def hf(folder):
    return tiny_models.load_hf(folder)


@pytest.fixture(scope="module")
def qwen_adapter(hf):
    """mitigate's own Qwen2-VL adapter (issue 12) serves the HF side of the comparisons."""
    from mitigate.patches.adapters import find_adapter
    from mitigate.patches.families.qwen import Qwen2VLAdapter

    adapter = find_adapter(hf[0])
    assert type(adapter) is Qwen2VLAdapter, adapter
    return adapter


@pytest.fixture(scope="module")
def vanilla(llm):
    return runs.vllm_run(llm, PROMPT, tiny_models.image(0))


def test_vanilla_matches_hf(hf, vanilla):
    reference = runs.hf_run(*hf, PROMPT, tiny_models.image(0))
    assert vanilla.prompt_ids == reference.prompt_ids
    assert vanilla.close_to(reference), (vanilla, reference)


@pytest.mark.parametrize("mitigation", METHODS, ids=str)
def test_method_matches_hf(llm, hf, vanilla, qwen_adapter, mitigation):
    got = runs.vllm_run(llm, PROMPT, tiny_models.image(0), mitigation)
    reference = runs.hf_run(*hf, PROMPT, tiny_models.image(0), mitigation)
    assert got.tokens == reference.tokens, (got, reference)
    assert got.gap(reference) <= runs.TOLERANCE, (got, reference)
    assert reference.gap(vanilla) > runs.TOLERANCE, "the method should change this prompt's logprobs"


def test_batch_mixes_vanilla_var_and_pai(llm):
    prompts = [(PROMPT, tiny_models.image(i % 2)) for i in range(3)]
    mitigations = [None, "var-tiny", "pai"]
    batched = runs.vllm_runs(llm, prompts, mitigations)
    for (text, image), mitigation, together in zip(prompts, mitigations, batched, strict=True):
        alone = runs.vllm_run(llm, text, image, mitigation)
        assert together.tokens == alone.tokens and together.gap(alone) <= 1e-5, mitigation


def test_paint_is_refused(llm, vanilla):
    with pytest.raises(ValueError, match="CLS token"):
        runs.vllm_run(llm, PROMPT, tiny_models.image(0), "paint")
    assert runs.vllm_run(llm, PROMPT, tiny_models.image(0)).tokens == vanilla.tokens


def test_preempted_requests_keep_their_plans(llm):
    """Four generations of 60 tokens need twelve KV blocks: vLLM preempts some and later recomputes their
    prompt and output (in chunks, if it likes); their plans from the first prefill are kept, so every request
    still gets the answer it gets alone."""
    prompts = [(PROMPT, tiny_models.image(i)) for i in range(4)]
    mitigations = ["var-tiny", "pai", "vaf", "gift"]
    before = runs.preemptions(llm)
    batched = runs.vllm_runs(llm, prompts, mitigations, tokens=60)
    assert runs.preemptions(llm) > before
    for (text, image), mitigation, together in zip(prompts, mitigations, batched, strict=True):
        alone = runs.vllm_run(llm, text, image, mitigation, tokens=60)
        assert together.tokens == alone.tokens and together.gap(alone) <= 1e-5, mitigation
