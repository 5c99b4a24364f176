"""Greedy runs of a few tokens, in vLLM (with the plugin) and in transformers (with apply_mitigation), and the
comparison the tests make between them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mitigate import apply_mitigation

TOKENS = 4
#: how close vLLM's logprobs must be to the HF path's (the issue's bar; seen: ~1e-5 in fp32)
TOLERANCE = 1e-3


@dataclass
class Run:
    tokens: list[int]
    logprobs: list[float]
    prompt_ids: list[int] | None = None
    cached: int = 0

    def close_to(self, other: Run, tolerance: float = TOLERANCE) -> bool:
        return self.tokens == other.tokens and self.gap(other) <= tolerance

    def gap(self, other: Run) -> float:
        return max(abs(a - b) for a, b in zip(self.logprobs, other.logprobs, strict=True))


def engine(folder, **kwargs):
    """An offline vLLM engine on the CPU for a tiny model (fp32, eager, a 1-GiB KV cache)."""
    from vllm import LLM

    args = {
        "model": str(folder),
        "dtype": "float32",
        "max_model_len": 512,
        "max_num_seqs": 8,
        "seed": 0,
        "limit_mm_per_prompt": {"image": 1},
        "enforce_eager": True,
    }
    return LLM(**{**args, **kwargs})


def close(llm) -> None:
    """Stop the engine's processes now (at interpreter exit they would log into pytest's closed streams)."""
    llm.llm_engine.engine_core.shutdown()


def sampling(mitigation: Any = None, tokens: int = TOKENS):
    from vllm import SamplingParams

    extra = None if mitigation is None else {"mitigation": mitigation}
    return SamplingParams(temperature=0.0, max_tokens=tokens, logprobs=1, ignore_eos=True, extra_args=extra)


def vllm_runs(llm, prompts: list[tuple[str, Any]], mitigations: list[Any], tokens: int = TOKENS) -> list[Run]:
    """One ``generate`` call with every (prompt, image) and its mitigation, batched by vLLM."""
    inputs = [
        {"prompt": text} if image is None else {"prompt": text, "multi_modal_data": {"image": image}}
        for text, image in prompts
    ]
    outputs = llm.generate(inputs, [sampling(m, tokens) for m in mitigations], use_tqdm=False)
    runs = []
    for out in outputs:
        done = out.outputs[0]
        logprobs = [step[token].logprob for token, step in zip(done.token_ids, done.logprobs, strict=True)]
        runs.append(
            Run(list(done.token_ids), logprobs, list(out.prompt_token_ids), out.num_cached_tokens or 0)
        )
    return runs


def vllm_run(llm, text: str, image: Any, mitigation: Any = None, tokens: int = TOKENS) -> Run:
    return vllm_runs(llm, [(text, image)], [mitigation], tokens)[0]


def preemptions(llm) -> int:
    """How many times the engine preempted a request (needs ``disable_log_stats=False``)."""
    return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))


# -- the Hugging Face path -------------------------------------------------------------------------
def hf_spec(mitigation: Any) -> tuple[Any, dict]:
    """apply_mitigation's arguments for a request's mitigation value (the forms the tests use)."""
    if isinstance(mitigation, str):
        return mitigation, {}
    return mitigation["method"], dict(mitigation.get("params") or {})


@torch.no_grad()
def hf_run(model, processor, text: str, image: Any, mitigation: Any = None, **processor_kwargs) -> Run:
    inputs = processor(images=image, text=text, return_tensors="pt", **processor_kwargs)
    handle = None
    if mitigation is not None:
        spec, params = hf_spec(mitigation)
        handle = apply_mitigation(model, spec, processor=processor, **params)
    try:
        # raw logits, never stopped or masked by EOS: as vLLM's logprobs with ignore_eos
        out = model.generate(
            **inputs,
            max_new_tokens=TOKENS,
            do_sample=False,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
    finally:
        if handle is not None:
            handle.remove()
    tokens = out.sequences[0, -TOKENS:].tolist()
    logprobs = [
        torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens, strict=True)
    ]
    return Run(tokens, logprobs, inputs["input_ids"][0].tolist())
