"""mitigate inside vLLM (CPU build) on a tiny random LLaVA: every method gives the HF path's tokens and
logprobs, requests with and without mitigation share batches, the prefix cache and chunked prefill stay exact,
and what cannot run is refused at request time while the engine keeps serving. One engine for the module."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import runs
import tiny_models

PROMPT = "USER: <image>\nis there a cat in the image? ASSISTANT:"
OTHER = "USER: <image>\ndescribe this image in detail please . ASSISTANT:"
# long enough for two full KV blocks of 32 (prefix caching) and short enough for one step of 96 tokens
FILLER = " ".join(["the red circle is on the left of the blue square and the green star"] * 4)
LONG = f"USER: <image>\n{FILLER} ? ASSISTANT:"
BLOCK, STEP = 32, 96

METHODS = [
    "pai",
    "vaf",
    "var-tiny",  # the built-in tiny model's VAR preset: sinks found per prompt
    "paint",
    "gift",
    {"method": "pai", "params": {"alpha": 2.0, "layers": [1, 3]}},
    {"method": {"var-tiny": {}, "pai": {}}},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_models.save_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def llm(folder):
    engine = runs.engine(folder, block_size=BLOCK, max_num_batched_tokens=STEP, enable_prefix_caching=True)
    yield engine
    runs.close(engine)


@pytest.fixture(scope="module")
def hf(folder):
    return tiny_models.load_hf(folder)


@pytest.fixture(scope="module")
def vanilla(llm):
    return runs.vllm_run(llm, PROMPT, tiny_models.image(0))


def test_vanilla_matches_hf(llm, hf, vanilla):
    reference = runs.hf_run(*hf, PROMPT, tiny_models.image(0))
    assert vanilla.prompt_ids == reference.prompt_ids
    assert vanilla.close_to(reference), (vanilla, reference)


@pytest.mark.parametrize("mitigation", METHODS, ids=str)
def test_method_matches_hf(llm, hf, vanilla, mitigation):
    got = runs.vllm_run(llm, PROMPT, tiny_models.image(0), mitigation)
    reference = runs.hf_run(*hf, PROMPT, tiny_models.image(0), mitigation)
    assert got.tokens == reference.tokens, (got, reference)
    assert got.gap(reference) <= runs.TOLERANCE, (got, reference)
    assert reference.gap(vanilla) > 10 * runs.TOLERANCE, "the method should change this prompt's logprobs"


def test_batch_mixes_vanilla_var_and_pai(llm):
    prompts = [
        (PROMPT, tiny_models.image(0)),
        (PROMPT, tiny_models.image(1)),
        (OTHER, tiny_models.image(0)),
        (OTHER, tiny_models.image(1)),
        (PROMPT, tiny_models.image(0)),
    ]
    mitigations = [None, "var-tiny", "pai", None, "var-tiny"]
    batched = runs.vllm_runs(llm, prompts, mitigations)
    for (text, image), mitigation, together in zip(prompts, mitigations, batched, strict=True):
        alone = runs.vllm_run(llm, text, image, mitigation)
        assert together.tokens == alone.tokens, (mitigation, together, alone)
        assert together.gap(alone) <= 1e-5, (mitigation, together, alone)
    assert batched[0].gap(batched[4]) > runs.TOLERANCE  # the same prompt, with and without VAR, in one batch


def test_spellings_of_a_request(llm, vanilla):
    as_dict = runs.vllm_run(llm, PROMPT, tiny_models.image(0), {"method": "pai", "params": {"alpha": 2.0}})
    as_json = runs.vllm_run(llm, PROMPT, tiny_models.image(0), '{"method": "pai", "params": {"alpha": 2.0}}')
    assert as_json.tokens == as_dict.tokens and as_json.gap(as_dict) <= 1e-6
    for off in ("", "none", None):
        plain = runs.vllm_run(llm, PROMPT, tiny_models.image(0), off)
        assert plain.tokens == vanilla.tokens and plain.gap(vanilla) <= 1e-6


def test_prompt_without_image_is_left_alone(llm):
    text = "USER: is there a cat in the image? ASSISTANT:"
    plain = runs.vllm_run(llm, text, None)
    mitigated = runs.vllm_run(llm, text, None, "var-tiny")
    assert mitigated.tokens == plain.tokens and mitigated.gap(plain) <= 1e-6


@pytest.mark.parametrize(
    ("mitigation", "reason"),
    [
        ("vhr", "probe pass"),
        ({"method": "pai", "params": {"cfg_gamma": 1.1}}, "contrast"),
        ("var", "sink_dims"),  # the LLaVA-7B preset's dims do not fit a 128-wide model
        ("no-such-method", "unknown method"),
        ({"method": "pai", "params": {"alpha": -1}}, "alpha"),
        ({"method": "pai", "extra": 1}, "got keys"),
        ("{not json", "not valid JSON"),
        (3, "expected a method name"),
    ],
    ids=str,
)
def test_refused_at_request_time(llm, vanilla, mitigation, reason):
    with pytest.raises(ValueError, match=reason):
        runs.vllm_run(llm, PROMPT, tiny_models.image(0), mitigation)
    again = runs.vllm_run(llm, PROMPT, tiny_models.image(0))  # the engine still serves
    assert again.tokens == vanilla.tokens


def test_prefix_cache_never_mixes_mitigated_and_vanilla_blocks(llm, hf):
    image = tiny_models.image(2)
    first = runs.vllm_run(llm, LONG, image)
    again = runs.vllm_run(llm, LONG, image)
    assert len(first.prompt_ids) >= 2 * BLOCK + 1
    assert again.cached >= 2 * BLOCK and again.gap(first) <= 1e-5  # vanilla requests share blocks
    mitigated = runs.vllm_run(llm, LONG, image, "vaf")  # VAF edits every prompt row: its KV differ
    assert mitigated.cached == 0
    assert mitigated.close_to(runs.hf_run(*hf, LONG, image, "vaf"))
    # a prompt first seen mitigated: the vanilla request after it must not read the mitigated blocks
    other = tiny_models.image(3)
    runs.vllm_run(llm, LONG, other, "vaf")
    plain = runs.vllm_run(llm, LONG, other)
    assert plain.cached == 0
    assert plain.close_to(runs.hf_run(*hf, LONG, other))


def test_mitigated_prompt_waits_instead_of_being_split(llm, hf):
    """A vanilla prompt takes most of the step's token budget: vLLM chunks vanilla prompts, but the mitigated
    one must wait for a step with room for all of it (a split first prefill would stop the engine)."""
    prompts = [
        (LONG, tiny_models.image(4)),
        (PROMPT, tiny_models.image(5)),
        (LONG + " yes", tiny_models.image(6)),
    ]
    mitigations = [None, "var-tiny", "pai"]
    batched = runs.vllm_runs(llm, prompts, mitigations)
    for (text, image), mitigation, together in zip(prompts, mitigations, batched, strict=True):
        assert together.close_to(runs.hf_run(*hf, text, image, mitigation)), mitigation


def test_prompt_longer_than_a_step_is_refused(llm):
    text = f"USER: <image>\n{FILLER} {FILLER} ? ASSISTANT:"
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        runs.vllm_run(llm, text, tiny_models.image(0), "pai")
    chunked = runs.vllm_run(llm, text, tiny_models.image(0))  # vanilla: prefilled in chunks
    assert len(chunked.prompt_ids) > STEP and len(chunked.tokens) == runs.TOKENS
